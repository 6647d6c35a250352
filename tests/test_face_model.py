"""FaceModel: the pool's batch model for a face pack, end to end on tiny buffalo_l-shaped models."""
from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from tests.face_fixtures import ARCFACE_TEMPLATE, BLUE, canvas, face_models, score_of  # noqa: F401
from PIL import Image

from inference.face import DEFAULT_MIN_SCORE, Face, FaceModel, FacePack
from inference.runtime import ModelMissingError, RuntimeOptions


@pytest.fixture(scope="module")
def model(face_models):
    m = FaceModel(FacePack("buffalo_l", face_models["det"], face_models["rec"]), RuntimeOptions(providers=["cpu"]))
    m.load()
    return m


def _two_faces():
    # a plain blue face and one with a green-tinted top half (too dim in green to be a detection of its own)
    return canvas(1000, 600, [(100, 100, 50, 50, BLUE), (500, 250, 50, 50, BLUE), (500, 250, 50, 25, (0, 100, 255))])


def test_protocol_attributes(face_models):
    m = FaceModel(FacePack("antelopev2", face_models["det"], face_models["rec"]))
    assert m.key == "face:antelopev2" and m.max_batch == 8
    assert not m.loaded
    m.load()
    assert m.loaded
    m.unload()
    assert not m.loaded
    assert DEFAULT_MIN_SCORE == 0.7


def test_one_face_end_to_end(model, face_models):
    img = canvas(1000, 600, [(500, 250, 50, 50, BLUE)])
    [faces] = model.run_batch([(img, 0.7)])
    assert len(faces) == 1
    f = faces[0]
    assert isinstance(f, Face)
    assert (f.x1, f.y1, f.x2, f.y2) == (500.0, 250.0, 550.0, 300.0)
    assert all(isinstance(v, float) for v in (f.x1, f.y1, f.x2, f.y2, f.score))
    assert f.score == pytest.approx(score_of(255))
    np.testing.assert_allclose(f.landmarks, np.array([500, 250]) + ARCFACE_TEMPLATE * (50 / 112), atol=1e-3)
    assert f.embedding.shape == (512,) and f.embedding.dtype == np.float32
    assert abs(np.linalg.norm(f.embedding) - 1) > 0.05  # raw, as Immich stores it

    # independently: the crop is the 50x50 block scaled by 112/50, then the network on (x - 127.5) / 127.5
    m = np.array([[2.24, 0, -500 * 2.24], [0, 2.24, -250 * 2.24]])
    crop = cv2.warpAffine(img, m, (112, 112), borderValue=0.0)
    blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(face_models["rec"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(f.embedding, sess.run(None, {"input.1": blob})[0][0], atol=1e-3)


def test_boxes_may_leave_the_image_and_are_rounded(model):
    # a face cut by the top-left corner: anchor boxes reach outside, as Immich reports them
    img = canvas(640, 640, [(0, 0, 32, 32, BLUE)])
    [faces] = model.run_batch([(img, 0.5)])
    assert [(f.x1, f.y1, f.x2, f.y2) for f in faces] == [(0.0, 0.0, 32.0, 32.0)]
    img = canvas(700, 500, [(0, 0, 40, 40, BLUE)])  # scale 640/700: box edges are not whole pixels
    [faces] = model.run_batch([(img, 0.5)])
    for f in faces:
        assert all(v == round(v) for v in (f.x1, f.y1, f.x2, f.y2))


def test_different_faces_differ_and_same_faces_match(model):
    [faces] = model.run_batch([(_two_faces(), 0.7)])
    assert len(faces) == 2
    assert np.abs(faces[0].embedding - faces[1].embedding).max() > 1e-2
    # the same face elsewhere in another image gives the same embedding
    moved = canvas(800, 480, [(400, 200, 40, 40, BLUE)])  # scale 0.8: again 32 px on the detector's canvas
    [[same]] = model.run_batch([(moved, 0.7)])
    plain = next(f for f in faces if f.x1 == 100.0)
    # the same 50 px face vs a 40 px one: crops differ only by resampling
    assert np.abs(same.embedding - plain.embedding).max() < 0.05 * np.abs(plain.embedding).max()


def test_batch_equals_single_calls(model):
    items = [
        (_two_faces(), 0.7),
        (canvas(600, 1000, [(250, 500, 50, 50, BLUE)]), 0.7),
        (canvas(320, 200), 0.7),  # no face
        (canvas(640, 640, [(64, 64, 32, 32, (0, 0, 215))]), 0.6),
        (canvas(640, 640, [(64, 64, 32, 32, (0, 0, 215))]), 0.7),  # same image, stricter: nothing
    ]
    together = model.run_batch(items)
    singles = [model.run_batch([item])[0] for item in items]
    assert [len(r) for r in together] == [2, 1, 0, 1, 0]
    for a, b in zip(together, singles):
        assert len(a) == len(b)
        for fa, fb in zip(a, b):
            assert (fa.x1, fa.y1, fa.x2, fa.y2, fa.score) == (fb.x1, fb.y1, fb.x2, fb.y2, fb.score)
            np.testing.assert_allclose(fa.embedding, fb.embedding, rtol=1e-5, atol=1e-5)


def test_no_faces_is_an_empty_list(model):
    assert model.run_batch([(canvas(300, 200), 0.7)]) == [[]]
    assert model.run_batch([(np.zeros((1, 4000, 3), np.uint8), 0.7)]) == [[]]


def test_pil_and_array_inputs_agree(model):
    img = _two_faces()
    a, b, c = model.run_batch([(img, 0.7), (Image.fromarray(img), 0.7), (Image.fromarray(img).convert("RGBA"), None)])
    assert [(f.x1, f.y1) for f in a] == [(f.x1, f.y1) for f in b] == [(f.x1, f.y1) for f in c]
    np.testing.assert_array_equal(a[0].embedding, b[0].embedding)


def test_a_bad_item_fails_alone(model):
    good = canvas(1000, 600, [(500, 250, 50, 50, BLUE)])
    out = model.run_batch([(good, 0.7), (np.zeros((0, 10, 3), np.uint8), 0.7), ("not an image", 0.7),
                           (good.astype(np.float32), 0.7), (good, 0.7)])
    assert len(out[0]) == 1 and len(out[4]) == 1
    assert all(isinstance(r, Exception) for r in out[1:4])
    assert "zero" in str(out[1])


def test_recogniser_failure_is_retried_per_image(model, monkeypatch):
    real = model.recognizer.embed

    def flaky(crops):
        if len(crops) > 1:
            raise RuntimeError("simulated out-of-memory on a big batch")
        return real(crops)

    monkeypatch.setattr(model.recognizer, "embed", flaky)
    one = canvas(1000, 600, [(500, 250, 50, 50, BLUE)])
    out = model.run_batch([(one, 0.7), (one, 0.7), (_two_faces(), 0.7)])
    assert len(out[0]) == 1 and len(out[1]) == 1
    assert isinstance(out[2], RuntimeError)  # two crops in one image: still too many for the flaky recogniser


def test_fixed_batch_recogniser_and_batched_detector(face_models, model):
    other = FaceModel(FacePack("x", face_models["det_dynamic"], face_models["rec_fixed1"]))
    items = [(_two_faces(), 0.7), (canvas(600, 1000, [(250, 500, 50, 50, BLUE)]), 0.7)]
    for a, b in zip(other.run_batch(items), model.run_batch(items)):
        assert [(f.x1, f.y1, f.x2, f.y2) for f in a] == [(f.x1, f.y1, f.x2, f.y2) for f in b]
        for fa, fb in zip(a, b):
            np.testing.assert_allclose(fa.embedding, fb.embedding, rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path, face_models):
    with pytest.raises(ModelMissingError, match="buffalo_l"):
        FaceModel(FacePack("buffalo_l", tmp_path / "det_10g.onnx", face_models["rec"])).load()
    with pytest.raises(ValueError, match="landmark"):
        FaceModel(FacePack("x", face_models["det_nokps"], face_models["rec"])).load()
