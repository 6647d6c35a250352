"""ArcFace alignment (similarity to the 112x112 template) and raw embeddings."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tests.face_fixtures import build_recogniser, face_models  # noqa: F401

from inference.face.recognize import ARCFACE_TEMPLATE, ArcFace, alignment_matrix, norm_crop, template_for, umeyama


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def test_template_landmarks_give_the_identity():
    m = alignment_matrix(ARCFACE_TEMPLATE)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    img = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    crop = norm_crop(img, ARCFACE_TEMPLATE)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - img[:112, :112]).max() <= 1


def test_recovers_an_exact_similarity():
    want = _similarity(0.37, 0.6, -40.0, 12.5)  # image -> crop
    # landmarks in the image that this transform sends exactly onto the template
    a, t = want[:, :2], want[:, 2]
    landmarks = (np.linalg.inv(a) @ (ARCFACE_TEMPLATE.astype(np.float64) - t).T).T
    np.testing.assert_allclose(alignment_matrix(landmarks), want, atol=1e-4)


def test_is_the_least_squares_similarity():
    rng = np.random.default_rng(3)
    for _ in range(20):
        src = rng.uniform(0, 500, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))
        m = umeyama(src, dst)
        # a similarity without reflection is [[a, -b], [b, a]] + t: linear least squares in (a, b, tx, ty)
        rows = np.zeros((10, 4))
        rows[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)]
        rows[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]
        a, b, tx, ty = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], atol=1e-8)


def test_template_sizes():
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2, rtol=1e-6)
    t128 = template_for(128)
    np.testing.assert_allclose(t128[:, 0], ARCFACE_TEMPLATE[:, 0] + 8, rtol=1e-6)
    with pytest.raises(ValueError):
        template_for(100)
    with pytest.raises(ValueError):
        alignment_matrix(np.full((5, 2), 7.0))  # all points in one place


def test_embeddings_are_raw_float32_and_batched(face_models):
    rec = ArcFace(_session(face_models["rec"]), face_models["rec"])
    assert rec.input_size == 112 and rec.fixed_batch is None and (rec.input_mean, rec.input_std) == (127.5, 127.5)
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(5)]
    emb = rec.embed(crops)
    assert emb.shape == (5, 512) and emb.dtype == np.float32
    norms = np.linalg.norm(emb, axis=1)
    assert np.all(np.abs(norms - 1) > 0.05)  # not L2-normalised
    # what the network gives for the normalised RGB crop, untouched
    blob = ((crops[2].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    direct = _session(face_models["rec"]).run(None, {"input.1": blob})[0][0]
    np.testing.assert_allclose(emb[2], direct, rtol=1e-5, atol=1e-6)
    # one by one == together; identical crops, identical embeddings; different crops differ
    np.testing.assert_allclose(np.concatenate([rec.embed([c]) for c in crops]), emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rec.embed([crops[0], crops[0]])[0], rec.embed([crops[0], crops[0]])[1])
    assert np.abs(emb[0] - emb[1]).max() > 1e-2


def test_fixed_batch_of_one_is_looped(face_models):
    fixed = ArcFace(_session(face_models["rec_fixed1"]), face_models["rec_fixed1"], max_batch=64)
    free = ArcFace(_session(face_models["rec"]), face_models["rec"])
    assert fixed.fixed_batch == 1
    crops = np.random.default_rng(2).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(fixed.embed(crops), free.embed(crops), rtol=1e-5, atol=1e-6)


def test_mxnet_style_models_take_raw_pixels(tmp_path):
    path = build_recogniser(tmp_path / "mx.onnx", mxnet_style=True)
    rec = ArcFace(_session(path), path)
    assert (rec.input_mean, rec.input_std) == (0.0, 1.0)
