"""SCRFD / RetinaFace face detection on ONNX Runtime, behaving as InsightFace's detector does for Immich.

Pre-processing: letterbox to 640x640 (scale keeping the aspect ratio, pad right and bottom with black), pixels
normalised as (x - 127.5) / 128, RGB channel order (InsightFace feeds OpenCV's BGR images with swapRB=True, so the
network sees RGB; our images are RGB already). Post-processing: per stride, anchors at (x*stride, y*stride) with
2 anchors per location (1 for 5-level models), distance-to-box and distance-to-keypoint decoding, `score >= threshold`,
scale back by the letterbox factor, greedy NMS at IoU 0.4 (InsightFace's `+1` pixel area convention).

Output layouts: 9 tensors (scores, boxes, keypoints for strides 8/16/32), 6 without keypoints, or 10/15 for 5-level
models; each tensor is (N, C) as exported by InsightFace or (batch, N, C) as in Immich's re-exported models.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (640, 640)  # (width, height), Immich's detection size
NMS_THRESHOLD = 0.4
INPUT_MEAN = 127.5
INPUT_STD = 128.0

# number of outputs -> (strides, anchors per location, has keypoints); as InsightFace's SCRFD/RetinaFace decide
_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


@dataclass
class Detections:
    """Faces of one image, best score first, in the input image's pixel coordinates (not clipped to it)."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray | None  # (N, 5, 2) float32 eyes, nose, mouth corners; None for a model without keypoints

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Letterboxed:
    canvas: np.ndarray | None  # (H, W, 3) uint8 at the detector's input size; None when nothing fits
    scale: float  # detector pixels per input pixel


def letterbox(image: np.ndarray, size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> Letterboxed:
    """Resize keeping the aspect ratio into a (width, height) canvas, padded right/bottom with zeros.

    The sizes and the single scale factor (from the height) are computed exactly as InsightFace does, so boxes come
    back identical to Immich's.
    """
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("Image has zero width or height")
    im_ratio = float(height) / width
    model_ratio = float(size[1]) / size[0]
    if im_ratio > model_ratio:
        new_height = size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = size[0]
        new_height = int(new_width * im_ratio)
    scale = float(new_height) / height
    if new_width < 1 or new_height < 1:
        # A sliver (e.g. 5000x1) shrinks to nothing; InsightFace would crash in resize. No face can be found there.
        return Letterboxed(None, scale)
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[:new_height, :new_width] = cv2.resize(image, (new_width, new_height))
    return Letterboxed(canvas, scale)


def to_blob(canvases: list[np.ndarray]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32, (x - 127.5) / 128."""
    batch = np.stack(canvases).astype(np.float32)
    batch -= INPUT_MEAN
    batch *= 1.0 / INPUT_STD  # 1/128 is exact, so this equals OpenCV's blobFromImage
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@lru_cache(maxsize=32)
def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height*width*num_anchors, 2) float32 (x, y) of each anchor: row-major cells, anchors of a cell adjacent."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape(-1, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)
    centers.setflags(write=False)  # shared through the cache
    return centers


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor points (N, 2) and distances to the left, top, right, bottom edges (N, 4) -> boxes (N, 4)."""
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor points (N, 2) and offsets (N, 2K) -> keypoints (N, K, 2)."""
    offsets = distance.reshape(distance.shape[0], -1, 2)
    return points[:, None, :] + offsets


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS on (N, 5) [x1, y1, x2, y2, score] sorted or not; returns kept indices, best first.

    Areas use InsightFace's `+1` convention; a box is dropped when its IoU with a kept one is above `threshold`.
    """
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return keep


def _empty(with_kps: bool) -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                      np.zeros((0, 5, 2), np.float32) if with_kps else None)


class SCRFD:
    """A loaded SCRFD/RetinaFace detector. `detect_many` runs images together when the model takes a batch."""

    def __init__(self, session, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
                 nms_threshold: float = NMS_THRESHOLD):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in session.get_outputs()]
        layout = _LAYOUTS.get(len(self.output_names))
        if layout is None:
            raise ValueError(f"not an SCRFD/RetinaFace detector: {len(self.output_names)} outputs "
                             f"(expected 6, 9, 10 or 15)")
        self.strides, self.num_anchors, self.use_kps = layout
        shape = list(inp.shape)
        # A model exported for a fixed size dictates it, as in InsightFace; otherwise Immich's 640x640.
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0:
            self.input_size = (shape[3], shape[2])
        else:
            self.input_size = tuple(input_size)
        self.nms_threshold = nms_threshold
        # Several images go through in one run only where the batch dimension is free; det_10g.onnx fixes it at 1.
        self.batchable = bool(shape) and not (isinstance(shape[0], int) and shape[0] > 0)

    # -- running -------------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray, threshold: float) -> Detections:
        """Faces in one HxWx3 uint8 RGB image with score >= threshold."""
        result = self.detect_many([image], [threshold])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def detect_many(self, images: list[np.ndarray], thresholds: list[float]) -> list[Detections | Exception]:
        """Like `detect` for each image; an image that fails on its own gets its Exception in its slot."""
        results: list[Detections | Exception | None] = [None] * len(images)
        boxed: dict[int, Letterboxed] = {}
        for i, image in enumerate(images):
            try:
                lb = letterbox(image, self.input_size)
            except Exception as e:
                results[i] = e
                continue
            if lb.canvas is None:
                results[i] = _empty(self.use_kps)
            else:
                boxed[i] = lb
        pending = list(boxed)
        if len(pending) > 1 and self.batchable:
            try:
                outs = self._run([boxed[i].canvas for i in pending])
                if all(o.ndim == 3 and o.shape[0] == len(pending) for o in outs):
                    for b, i in enumerate(pending):
                        results[i] = self._safe_decode([o[b] for o in outs], boxed[i].scale, thresholds[i])
                    pending = []
                else:
                    log.info("detector outputs carry no per-image batch axis; running images one at a time")
                    self.batchable = False
            except Exception as e:  # the declared free batch may not hold inside the graph
                log.info("batched face detection failed (%s); running images one at a time", e)
                self.batchable = False
        for i in pending:
            try:
                outs = self._run([boxed[i].canvas])
                outs = [o[0] if o.ndim == 3 else o for o in outs]
                results[i] = self._decode(outs, boxed[i].scale, thresholds[i])
            except Exception as e:
                results[i] = e
        return results  # type: ignore[return-value]

    def _run(self, canvases: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: to_blob(canvases)})

    def _safe_decode(self, outs, scale, threshold) -> Detections | Exception:
        try:
            return self._decode(outs, scale, threshold)
        except Exception as e:
            return e

    # -- decoding ------------------------------------------------------------------------------------------------
    def _decode(self, outs: list[np.ndarray], det_scale: float, threshold: float) -> Detections:
        """Outputs of one image (batch axis removed) -> detections in input-image pixels."""
        width, height = self.input_size
        fmc = len(self.strides)
        scores_l, boxes_l, kps_l = [], [], []
        for idx, stride in enumerate(self.strides):
            centers = anchor_centers(height // stride, width // stride, stride, self.num_anchors)
            scores = np.asarray(outs[idx]).reshape(-1)
            if scores.shape[0] != centers.shape[0]:
                raise ValueError(f"detector output {self.output_names[idx]} has {scores.shape[0]} scores, expected "
                                 f"{centers.shape[0]} for stride {stride} at {width}x{height}")
            pos = np.where(scores >= threshold)[0]
            if pos.size == 0:
                continue
            bbox = np.asarray(outs[idx + fmc]).reshape(scores.shape[0], 4)[pos] * stride
            scores_l.append(scores[pos])
            boxes_l.append(distance2bbox(centers[pos], bbox))
            if self.use_kps:
                kps = np.asarray(outs[idx + 2 * fmc]).reshape(scores.shape[0], -1)[pos] * stride
                kps_l.append(distance2kps(centers[pos], kps))
        if not scores_l:
            return _empty(self.use_kps)
        scores = np.concatenate(scores_l)
        order = np.argsort(-scores, kind="stable")
        boxes = np.concatenate(boxes_l) / det_scale
        pre_det = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)[order]
        keep = nms(pre_det, self.nms_threshold)
        det = pre_det[keep]
        landmarks = None
        if self.use_kps:
            landmarks = (np.concatenate(kps_l) / det_scale).astype(np.float32, copy=False)[order][keep]
        return Detections(np.ascontiguousarray(det[:, :4]), np.ascontiguousarray(det[:, 4]), landmarks)
