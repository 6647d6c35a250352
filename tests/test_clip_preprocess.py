"""Our PIL + numpy preprocessing against cn-clip's torchvision transform."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.clip.preprocess import MEAN, STD, preprocess_batch, preprocess_image, to_pil
from tests.clip_fixtures import sample_images

cn_clip = pytest.importorskip("cn_clip.clip")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (301, 199, 3), dtype=np.uint8))
    extra = [base.convert(m) for m in ("RGBA", "L", "LA", "P", "CMYK", "1", "I", "F")]
    extra.append(Image.fromarray(rng.integers(0, 65535, (40, 70), dtype=np.uint16)))  # 16-bit grey
    extra.append(Image.new("RGB", (1, 1), (255, 0, 0)))  # upscaled from one pixel
    extra.append(Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)))  # big downscale
    return sample_images() + [base] + extra


@pytest.mark.parametrize("size", [224, 336, 64])
def test_matches_cn_clip_transform(size):
    transform = cn_clip.image_transform(size)
    for img in _images():
        ref = transform(img).numpy()
        ours = preprocess_image(img, size)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() < 1e-5, img.mode


def test_constants_are_cn_clips():
    norm = cn_clip.image_transform(224).transforms[-1]
    assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD


def test_numpy_input_equals_pil_input():
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)
    assert np.array_equal(preprocess_image(arr, 64), preprocess_image(Image.fromarray(arr), 64))
    grey = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    assert np.array_equal(preprocess_image(grey, 64), preprocess_image(Image.fromarray(grey).convert("RGB"), 64))


def test_batch_stacks_items():
    imgs = sample_images()
    batch = preprocess_batch(imgs, 64)
    assert batch.shape == (len(imgs), 3, 64, 64) and batch.flags.c_contiguous
    for i, img in enumerate(imgs):
        assert np.array_equal(batch[i], preprocess_image(img, 64))


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError):
        to_pil(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        to_pil(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError):
        to_pil("photo.jpg")
