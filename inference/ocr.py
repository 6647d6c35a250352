"""OCR with RapidOCR on ONNX Runtime, using the Chinese/English detection and recognition models its wheel ships.

Behaves like Immich ML's OCR: the shorter side is scaled down (never up) to `max_resolution`, detection keeps
boxes scoring at least `det_min_score`, recognition keeps lines with text score above `rec_min_score`, boxes come
back flat and normalised (x1,y1..x4,y4 clockwise from top-left) in reading order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .base import InferenceModel
from .defaults import OCR_DET_MIN_SCORE, OCR_MAX_RESOLUTION, OCR_REC_MIN_SCORE_CONFIGURED
from .runtime import RuntimeOptions

log = logging.getLogger(__name__)

MIN_SIDE = 32  # Immich ML returns nothing for images narrower or shorter than this


@dataclass
class OcrRequest:
    image: Image.Image
    det_min_score: float = OCR_DET_MIN_SCORE
    rec_min_score: float = OCR_REC_MIN_SCORE_CONFIGURED
    max_resolution: int = OCR_MAX_RESOLUTION


@dataclass
class OcrLine:
    text: str
    box: list[float]  # 8 floats, normalised to 0-1 by the image's width and height
    box_score: float
    text_score: float


@dataclass
class OcrResult:
    lines: list[OcrLine] = field(default_factory=list)
    model: str = ""

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)


def _rapidocr_model_path(cfg, stage) -> Path:
    """Where RapidOCR keeps the ONNX file of one stage (Det, Rec): its own choice of file for the configured
    version, language and size, in its model folder (the wheel ships the default ones)."""
    if stage.get("model_path"):
        return Path(stage.model_path)
    from rapidocr.inference_engine.base import FileInfo, InferSession

    info = InferSession.get_model_url(FileInfo(engine_type=stage.engine_type, ocr_version=stage.ocr_version,
                                               task_type=stage.task_type, lang_type=stage.lang_type,
                                               model_type=stage.model_type))
    return Path(cfg.Global.model_root_dir) / Path(info["model_dir"]).name


def _rapidocr_version() -> str:
    try:
        from importlib.metadata import version
        return version("rapidocr")
    except Exception:  # pragma: no cover
        return "unknown"


class OcrModel(InferenceModel):
    """BatchModel for OCR. Images of a batch run one after another (RapidOCR batches text lines, not images).

    RapidOCR drives the pre/post-processing; its detection and recognition sessions come from our session factory
    (RapidOCR's onnxruntime engine takes a ready session in its `session` setting), so OCR runs on the same
    providers and threads as every other model.
    """

    def __init__(self, runtime: RuntimeOptions | None = None, max_batch: int = 4, name: str = "PP-OCRv5_mobile"):
        # the input size follows each image, which TensorRT would rebuild an engine for
        super().__init__((runtime or RuntimeOptions()).for_varying_shapes(), max_batch)
        self.requested_name = name
        self.key = f"ocr:{name}"
        self._engine = None
        self.model_id = ""

    def _load(self) -> None:
        from omegaconf import flag_override
        from rapidocr import RapidOCR

        params = {
            "Global.log_level": "warning",
            "Global.use_cls": False,             # Immich ML doesn't classify orientation; crops of tall lines rotate
            "Global.use_preprocess_img": False,  # we resize ourselves (never upscale, like Immich 3.x)
            "Global.text_score": 0.0,            # filtered here with Immich's strict '>' rule
            "Global.use_vertical_padding": False,  # keeps detection boxes in the input image's coordinates
            "Det.limit_type": "max",
            "Det.limit_side_len": 1 << 20,       # only the multiple-of-32 rounding remains
            "Det.thresh": 0.3,
            "Det.unclip_ratio": 1.6,
            "Det.max_candidates": 1000,
        }
        engine = RapidOCR(params=params)
        for stage in (engine.cfg.Det, engine.cfg.Rec):
            session = self.session(_rapidocr_model_path(engine.cfg, stage),
                                   "RapidOCR's bundled model is missing: reinstall the rapidocr package")
            with flag_override(stage, "allow_objects", True):  # RapidOCR's config holds plain values otherwise
                stage.session = session
        self._engine = engine
        det = engine.cfg.Det
        # the enums' values ('PP-OCRv6', 'small'), not their Python names
        self.model_id = (f"rapidocr-{_rapidocr_version()}/{getattr(det.ocr_version, 'value', det.ocr_version)}-"
                         f"{getattr(det.model_type, 'value', det.model_type)}")
        log.info("OCR ready: %s (serving requests for %s)", self.model_id, self.requested_name)

    def _unload(self) -> None:
        self._engine = None

    def options_key(self, item: OcrRequest) -> tuple:
        return (float(item.det_min_score), float(item.rec_min_score), int(item.max_resolution))

    def _predict_batch(self, items: list[OcrRequest]) -> list[OcrResult | Exception]:
        out: list[OcrResult | Exception] = []
        for item in items:
            try:
                out.append(self._run_one(item))
            except Exception as e:  # one bad image must not fail its batch-mates
                log.exception("OCR failed on one image")
                out.append(e)
        return out

    def _run_one(self, req: OcrRequest) -> OcrResult:
        img = req.image
        if img.width < MIN_SIDE or img.height < MIN_SIDE:
            return OcrResult(model=self.model_id)
        shorter = min(img.width, img.height)
        if req.max_resolution and shorter > req.max_resolution:
            scale = req.max_resolution / shorter
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        w, h = img.width, img.height
        bgr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, ::-1])
        # RapidOCR's stages driven one by one: its combined output drops the detection scores Immich returns
        self._engine.update_params(box_thresh=req.det_min_score)
        try:
            crops, det = self._engine.detect_and_crop(bgr, {"preprocess": {"ratio_h": 1.0, "ratio_w": 1.0}})
        except Exception as e:
            if type(e).__name__ == "RapidOCRError":  # "detection result is empty": no text, not an error
                return OcrResult(model=self.model_id)
            raise
        if det.boxes is None or len(det.boxes) == 0:
            return OcrResult(model=self.model_id)
        rec = self._engine.recognize_txt(crops)
        lines = []
        for box, box_score, text, text_score in zip(det.boxes, det.scores, rec.txts, rec.scores):
            text = text.strip()
            if not text or not float(text_score) > req.rec_min_score:
                continue
            flat: list[float] = []
            for x, y in np.asarray(box, dtype=np.float64).reshape(4, 2):
                flat += [round(min(max(float(x) / w, 0.0), 1.0), 6), round(min(max(float(y) / h, 0.0), 1.0), 6)]
            lines.append(OcrLine(text=text, box=flat, box_score=round(float(box_score), 6),
                                 text_score=round(float(text_score), 6)))
        return OcrResult(lines=_reading_order(lines, h), model=self.model_id)


def _reading_order(lines: list[OcrLine], height: int) -> list[OcrLine]:
    """Top to bottom; a new row starts where the top edge drops by 10 px or more; left to right within a row."""
    lines = sorted(lines, key=lambda ln: (ln.box[1], ln.box[0]))
    rows: list[list[OcrLine]] = []
    last_y = None
    for ln in lines:
        y = ln.box[1] * height
        if last_y is None or y - last_y >= 10:
            rows.append([])
            last_y = y
        rows[-1].append(ln)
    return [ln for row in rows for ln in sorted(row, key=lambda ln: ln.box[0])]
