"""ArcFace face embeddings on ONNX Runtime, as InsightFace's `norm_crop` + `ArcFaceONNX.get_feat` produce them.

Each face is aligned by the least-squares similarity transform (Umeyama, with scale, no reflection) that maps its 5
landmarks onto the standard ArcFace template, warped to 112x112 (bilinear, black border), normalised as
(x - 127.5) / 127.5 in RGB order, and all crops go through the network together. Embeddings are returned raw, NOT
L2-normalised, exactly as Immich stores them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

ALIGNED_SIZE = 112

# Where the eyes, nose tip and mouth corners land in a 112x112 ArcFace crop (InsightFace's `arcface_dst`).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) float64 similarity transform minimising sum |s R src + t - dst|^2 (Umeyama 1991, with scale).

    Follows the estimate InsightFace gets from scikit-image's SimilarityTransform, including its handling of a
    reflection and of collinear points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    a = dst_d.T @ src_d / n
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1  # the best orthogonal map would be a reflection; take the best rotation instead
    u, s, vt = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("degenerate face landmarks: all points coincide")
    if rank == dim - 1:  # collinear points: the sign is decided by U and V alone
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            dd = d.copy()
            dd[dim - 1] = -1
            rot = u @ np.diag(dd) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    var = src_d.var(axis=0).sum()
    if var == 0:
        raise ValueError("degenerate face landmarks: all points coincide")
    scale = (s @ d) / var
    t = dst_mean - scale * (rot @ src_mean)
    return np.hstack([scale * rot, t[:, None]])


def template_for(image_size: int = ALIGNED_SIZE) -> np.ndarray:
    """The ArcFace template for a crop of `image_size` (multiples of 112 scale it; of 128, also shift it by 8)."""
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"unsupported ArcFace crop size {image_size} (must be a multiple of 112 or 128)")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += diff_x
    return dst


def alignment_matrix(landmarks: np.ndarray, image_size: int = ALIGNED_SIZE) -> np.ndarray:
    """(2, 3) matrix taking image pixels to crop pixels for a face with these (5, 2) landmarks."""
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    if not np.isfinite(landmarks).all():
        raise ValueError("face landmarks are not finite")
    return umeyama(landmarks, template_for(image_size))


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = ALIGNED_SIZE) -> np.ndarray:
    """The aligned (image_size, image_size, 3) uint8 crop of one face; outside the image is black."""
    m = alignment_matrix(landmarks, image_size)
    return cv2.warpAffine(image, m, (image_size, image_size), borderValue=0.0)


def _uses_raw_pixels(model_path: Path | None) -> bool:
    """InsightFace's test for MXNet-converted models that normalise inside the graph (a Sub and a Mul among the
    first nodes): those take raw 0-255 pixels. Needs the `onnx` package; without it, assume the usual models."""
    if model_path is None:
        return False
    try:
        import onnx
    except ImportError:
        return False
    try:
        nodes = onnx.load(str(model_path), load_external_data=False).graph.node[:8]
    except Exception as e:
        log.warning("cannot inspect %s (%s); assuming (x - 127.5) / 127.5 input", model_path, e)
        return False
    names = [node.name for node in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


class ArcFace:
    """A loaded ArcFace recogniser: aligned uint8 RGB crops in, raw embeddings out."""

    def __init__(self, session, model_path: Path | str | None = None, max_batch: int | None = 64):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        shape = list(inp.shape)
        size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0 else ALIGNED_SIZE
        self.input_size = int(size)
        # A batch dimension fixed in the graph (e.g. 1) is honoured by running that many at a time.
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.max_batch = max_batch
        raw = _uses_raw_pixels(Path(model_path) if model_path else None)
        self.input_mean, self.input_std = (0.0, 1.0) if raw else (127.5, 127.5)

    def crop(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return norm_crop(image, landmarks, self.input_size)

    def embed(self, crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops -> (N, D) float32 raw embeddings."""
        n = len(crops)
        if n == 0:
            return np.zeros((0, 512), dtype=np.float32)
        blob = np.stack(crops).astype(np.float32)
        blob -= self.input_mean
        blob /= self.input_std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        chunk = self.fixed_batch or self.max_batch or n
        outs = []
        for start in range(0, n, chunk):
            part = blob[start:start + chunk]
            count = len(part)
            if self.fixed_batch and count < self.fixed_batch:  # pad a short last chunk to the fixed size
                part = np.concatenate([part, np.zeros((self.fixed_batch - count, *part.shape[1:]), part.dtype)])
            out = self.session.run([self.output_name], {self.input_name: part})[0]
            outs.append(np.asarray(out).reshape(len(part), -1)[:count])
        return np.concatenate(outs).astype(np.float32, copy=False)
