"""Image preprocessing identical to cn-clip's `image_transform`, with PIL and numpy only.

cn-clip does `Resize((s, s), BICUBIC)` on the PIL image (torchvision hands PIL images to `Image.resize`, which
always antialiases, so torchvision's `antialias` flag plays no part), then `convert("RGB")`, `ToTensor` (uint8 /
255 as float32, HWC → CHW) and `Normalize(mean, std)`. The aspect ratio is not kept and nothing is cropped: the
model was trained on squashed squares. Resizing happens before the RGB conversion, in the image's own mode, and
EXIF orientation is not applied — callers pass images that are already upright (Immich's previews are).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation constants, which cn-clip reuses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(item: Any) -> Image.Image:
    """A PIL image from a PIL image or an HxWx3 (RGB) / HxW (grey) uint8 array."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {item.dtype}")
        if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(item))
        raise ValueError(f"image arrays must be HxW, HxWx3 or HxWx4, got shape {item.shape}")
    raise TypeError(f"expected a PIL image or a uint8 array, got {type(item).__name__}")


def preprocess_image(item: Any, size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """float32 [3, size, size], normalised exactly as cn-clip's transform does."""
    img = to_pil(item)
    # Same order as cn-clip: resize in the source mode, then drop to RGB (PIL itself uses NEAREST for P/1 modes).
    img = img.resize((size, size), Image.BICUBIC).convert("RGB")
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_batch(items: Sequence[Any], size: int, mean: Sequence[float] = MEAN,
                     std: Sequence[float] = STD) -> np.ndarray:
    """float32 [N, 3, size, size]."""
    out = np.empty((len(items), 3, size, size), dtype=np.float32)
    for i, item in enumerate(items):
        out[i] = preprocess_image(item, size, mean, std)
    return out
