"""SCRFD decoding: letterbox, anchors, thresholds, NMS, and boxes back in the input image's pixels."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tests.face_fixtures import ANCHOR1_FACTOR, ARCFACE_TEMPLATE, BLUE, canvas, face_models, score_of  # noqa: F401

from inference.face.detect import SCRFD, anchor_centers, distance2bbox, distance2kps, letterbox, nms


def _detector(path) -> SCRFD:
    return SCRFD(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def detector(face_models):
    return _detector(face_models["det"])


def _expected_landmarks(x, y, size):
    return np.array([x, y], np.float32) + ARCFACE_TEMPLATE * (size / 112.0)


def test_letterbox_keeps_aspect_and_pads_right_bottom():
    lb = letterbox(np.full((600, 1000, 3), 200, np.uint8))
    assert lb.scale == pytest.approx(0.64)
    assert lb.canvas.shape == (640, 640, 3)
    assert (lb.canvas[:384] == 200).all() and (lb.canvas[384:] == 0).all()
    lb = letterbox(np.full((1000, 600, 3), 200, np.uint8))
    assert lb.scale == pytest.approx(0.64)
    assert (lb.canvas[:, :384] == 200).all() and (lb.canvas[:, 384:] == 0).all()
    assert letterbox(np.zeros((1, 5000, 3), np.uint8)).canvas is None  # shrinks to nothing
    with pytest.raises(ValueError):
        letterbox(np.zeros((0, 10, 3), np.uint8))


def test_anchor_and_distance_decoding():
    c = anchor_centers(2, 3, 16, 2)
    # row-major cells at (x*stride, y*stride), the two anchors of a cell next to each other
    assert c.tolist() == [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0],
                          [0, 16], [0, 16], [16, 16], [16, 16], [32, 16], [32, 16]]
    pts = np.array([[100.0, 50.0]], np.float32)
    assert distance2bbox(pts, np.array([[10, 20, 30, 40]], np.float32)).tolist() == [[90, 30, 130, 90]]
    kps = distance2kps(pts, np.arange(10, dtype=np.float32)[None])
    assert kps.shape == (1, 5, 2)
    assert kps[0, 4].tolist() == [108, 59]


@pytest.mark.parametrize("width,height,x,y,size", [
    (1000, 600, 500, 250, 50),  # landscape: scale 0.64, 32-px cells are 50 px here
    (600, 1000, 250, 500, 50),  # portrait
    (1280, 768, 640, 320, 64),  # landscape, scale 0.5
    (640, 640, 320, 96, 32),  # square, scale 1
])
def test_boxes_come_back_in_input_pixels(detector, width, height, x, y, size):
    det = detector.detect(canvas(width, height, [(x, y, size, size, BLUE)]), 0.7)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0], [x, y, x + size, y + size], atol=1e-3)
    assert det.scores[0] == pytest.approx(score_of(255))
    np.testing.assert_allclose(det.landmarks[0], _expected_landmarks(x, y, size), atol=1e-3)
    assert det.boxes.dtype == np.float32 and det.landmarks.shape == (1, 5, 2)


def test_one_scale_factor_from_the_height_as_insightface(detector):
    # 999x600: the canvas is 640x384, so x really shrinks by 640/999 but InsightFace (and Immich) divide both axes
    # by 384/600 = 0.64. A block wide enough to cover canvas cell x 320..352 must come back as x 500..550.
    det = detector.detect(canvas(999, 600, [(495, 250, 60, 50, BLUE)]), 0.7)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0], [500, 250, 550, 300], atol=1e-3)


def test_every_stride_and_rgb_channel_order(detector):
    # stride 8 reads red, 16 green, 32 blue: a swapped channel order would find other boxes
    img = canvas(640, 640, [(80, 40, 8, 8, (255, 0, 0)), (160, 320, 16, 16, (0, 255, 0)),
                            (320, 480, 32, 32, BLUE)])
    det = detector.detect(img, 0.7)
    boxes = sorted(det.boxes.round().astype(int).tolist())
    assert boxes == [[80, 40, 88, 48], [160, 320, 176, 336], [320, 480, 352, 512]]


def test_min_score_filters(detector):
    img = canvas(640, 640, [(64, 64, 32, 32, BLUE), (320, 320, 32, 32, (0, 0, 215))])
    dim = score_of(215)  # 0.68359375; its shifted anchor scores 0.95x that
    assert len(detector.detect(img, 0.7)) == 1
    det = detector.detect(img, 0.6)
    assert len(det) == 2
    assert det.scores.tolist() == pytest.approx([score_of(255), dim])  # best first
    assert len(detector.detect(img, 0.999)) == 0
    # the threshold is inclusive, as InsightFace's `scores >= threshold`
    assert len(detector.detect(img, dim)) == 2
    assert len(detector.detect(img, np.nextafter(np.float32(dim), np.float32(1)))) == 1


def test_nms_removes_overlaps_only(detector):
    # each bright cell yields two candidates (anchor 1 shifted by 4 px, IoU 0.63): NMS keeps the better one
    img = canvas(640, 640, [(64, 64, 32, 32, BLUE), (96, 64, 32, 32, BLUE)])
    det = detector.detect(img, 0.5)
    assert sorted(det.boxes.round().astype(int).tolist()) == [[64, 64, 96, 96], [96, 64, 128, 96]]
    assert det.scores.tolist() == pytest.approx([score_of(255)] * 2)
    assert ANCHOR1_FACTOR * score_of(255) > 0.5  # so the suppressed candidates did pass the threshold

    dets = np.array([[0, 0, 100, 100, 0.9], [10, 10, 110, 110, 0.8], [50, 0, 150, 100, 0.7],
                     [200, 200, 220, 220, 0.95]], np.float32)
    # IoU(0,1) = 0.68 > 0.4: dropped; IoU(0,2) = 0.34 <= 0.4: kept
    assert nms(dets, 0.4) == [3, 0, 2]
    assert nms(dets, 0.3) == [3, 0]


def test_no_faces(detector):
    det = detector.detect(canvas(800, 600), 0.7)
    assert len(det) == 0 and det.boxes.shape == (0, 4) and det.landmarks.shape == (0, 5, 2)
    det = detector.detect(np.zeros((1, 5000, 3), np.uint8), 0.7)
    assert len(det) == 0


@pytest.mark.parametrize("layout", ["det_batched", "det_dynamic"])
def test_batch_axis_layouts_give_the_same_faces(face_models, detector, layout):
    other = _detector(face_models[layout])
    images = [canvas(1000, 600, [(500, 250, 50, 50, BLUE)]), canvas(600, 1000, [(0, 0, 50, 50, BLUE)]),
              canvas(300, 300)]
    got = other.detect_many(images, [0.7] * 3)
    want = [detector.detect(img, 0.7) for img in images]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.boxes, w.boxes)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_array_equal(g.landmarks, w.landmarks)
    assert other.batchable == (layout == "det_dynamic")  # the free-batch model really ran the images together


def test_without_keypoints(face_models):
    det = _detector(face_models["det_nokps"])
    assert not det.use_kps
    found = det.detect(canvas(640, 640, [(0, 0, 32, 32, BLUE)]), 0.7)
    assert len(found) == 1 and found.landmarks is None


def test_a_recogniser_is_not_a_detector(face_models):
    with pytest.raises(ValueError, match="outputs"):
        _detector(face_models["rec"])
