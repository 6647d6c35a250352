"""Face detection + recognition (InsightFace packs such as buffalo_l) as one batch model for the pool.

`FaceModel.run_batch([(image, min_score), ...])` returns, per image, the faces Immich ML would return for
`{"facial-recognition": {"detection": {"options": {"minScore": min_score}}, "recognition": {}}}`: boxes in the
image's pixels (rounded like Immich's, possibly outside the image), the detector's score, and the raw 512-d ArcFace
embedding. Crops of all images of a batch go through the recogniser together.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import InferenceModel
from ..defaults import FACE_MIN_SCORE as DEFAULT_MIN_SCORE
from ..runtime import RuntimeOptions
from .detect import SCRFD, Detections
from .pack import FacePack, find_face_pack
from .recognize import ArcFace

__all__ = ["Face", "FaceModel", "FacePack", "find_face_pack", "DEFAULT_MIN_SCORE"]

log = logging.getLogger(__name__)


@dataclass
class Face:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: np.ndarray = field(repr=False)  # (5, 2) float32, image pixels: eyes, nose, mouth corners
    embedding: np.ndarray = field(repr=False)  # (512,) float32, raw (not L2-normalised), as Immich stores it


def _to_rgb_array(image: Any) -> np.ndarray:
    """PIL image or HxWx3 uint8 RGB array -> contiguous HxWx3 uint8 RGB. No EXIF rotation, as in Immich."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image without importing PIL here
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(image)
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise TypeError(f"expected a PIL image or an ndarray, got {type(image).__name__}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # an RGBA array: drop alpha, as PIL's convert("RGB") does
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError("Image has zero width or height")
    return np.ascontiguousarray(arr)


def _parse_item(item: Any) -> tuple[np.ndarray, float]:
    if isinstance(item, tuple):
        image, min_score = item
    else:
        image, min_score = item, None
    return _to_rgb_array(image), DEFAULT_MIN_SCORE if min_score is None else float(min_score)


class FaceModel(InferenceModel):
    """BatchModel for one face pack: items are `(image, min_score)`, outputs are `list[Face]` per item."""

    def __init__(self, pack: FacePack, runtime: RuntimeOptions | None = None, max_batch: int = 8, *,
                 round_boxes: bool = True, rec_batch: int | None = 64):
        super().__init__(runtime, max_batch)
        self.pack = pack
        self.key = f"face:{pack.name}"
        self.round_boxes = round_boxes  # Immich ML rounds boxes to whole pixels (still emitted as floats)
        self.rec_batch = rec_batch  # crops per recogniser run, bounds memory on crowded batches
        self.detector: SCRFD | None = None
        self.recognizer: ArcFace | None = None

    def _load(self) -> None:
        hint = (f"face pack {self.pack.name!r} is incomplete; unzip InsightFace's {self.pack.name}.zip into "
                f"$CNAI_MODELS_DIR/face/{self.pack.name}/")
        detector = SCRFD(self.session(self.pack.detection, hint))
        if not detector.use_kps:
            raise ValueError(f"{self.pack.detection}: the detector has no landmark outputs, which face "
                             f"recognition needs for alignment")
        recognizer = ArcFace(self.session(self.pack.recognition, hint),
                             model_path=self.pack.recognition, max_batch=self.rec_batch)
        self.detector, self.recognizer = detector, recognizer

    def _unload(self) -> None:
        self.detector = None
        self.recognizer = None

    def options_key(self, item: Any) -> float:
        min_score = item[1] if isinstance(item, tuple) else None
        return DEFAULT_MIN_SCORE if min_score is None else float(min_score)

    def _predict_batch(self, items: list[Any]) -> list[list[Face] | Exception]:
        assert self.detector is not None and self.recognizer is not None
        results: list[list[Face] | Exception | None] = [None] * len(items)

        images: dict[int, np.ndarray] = {}
        thresholds: dict[int, float] = {}
        for i, item in enumerate(items):
            try:
                images[i], thresholds[i] = _parse_item(item)
            except Exception as e:
                results[i] = e
        order = list(images)
        found = self.detector.detect_many([images[i] for i in order], [thresholds[i] for i in order])

        detections: dict[int, Detections] = {}
        crops: dict[int, list[np.ndarray]] = {}
        for i, det in zip(order, found):
            if isinstance(det, Exception):
                results[i] = det
                continue
            try:
                crops[i] = [self.recognizer.crop(images[i], lm) for lm in det.landmarks]
                detections[i] = det
            except Exception as e:
                results[i] = e

        embeddings = self._embed_all(crops)
        for i, det in detections.items():
            emb = embeddings[i]
            if isinstance(emb, Exception):
                results[i] = emb
            else:
                results[i] = self._faces(det, emb)
        return results  # type: ignore[return-value]

    def _embed_all(self, crops: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray | Exception]:
        """Embed every image's crops in one go; if that fails, per image, so one bad image can't sink the rest."""
        assert self.recognizer is not None
        out: dict[int, np.ndarray | Exception] = {i: np.zeros((0, 512), np.float32) for i in crops}
        owners = [i for i in crops if crops[i]]
        if not owners:
            return out
        try:
            emb = self.recognizer.embed([c for i in owners for c in crops[i]])
        except Exception as e:
            if len(owners) == 1:
                out[owners[0]] = e
                return out
            log.warning("face recognition failed for a batch (%s); retrying image by image", e)
            for i in owners:
                try:
                    out[i] = self.recognizer.embed(crops[i])
                except Exception as e2:
                    out[i] = e2
            return out
        start = 0
        for i in owners:
            out[i] = emb[start:start + len(crops[i])]
            start += len(crops[i])
        return out

    def _faces(self, det: Detections, embeddings: np.ndarray) -> list[Face]:
        boxes = np.round(det.boxes) if self.round_boxes else det.boxes
        assert det.landmarks is not None
        return [Face(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s),
                     np.array(lm, dtype=np.float32), np.array(e, dtype=np.float32))
                for b, s, lm, e in zip(boxes, det.scores, det.landmarks, embeddings)]
