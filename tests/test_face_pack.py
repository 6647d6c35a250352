"""Finding a face pack by name in the models folder, in InsightFace's and Immich's layouts."""
from __future__ import annotations

import shutil

import pytest
from tests.face_fixtures import face_models  # noqa: F401  (fixture)

from inference.face.pack import FacePack, find_face_pack
from inference.runtime import ModelMissingError

BUFFALO_L = ["1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"]
ANTELOPEV2 = ["1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"]


def _touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"not inspected: the name says what it is")


@pytest.mark.parametrize("sub", ["face/buffalo_l", "face/buffalo_l/buffalo_l", "buffalo_l", "buffalo_l/buffalo_l",
                                 "models/buffalo_l"])
def test_insightface_layouts(tmp_path, sub):
    _touch(tmp_path / sub, BUFFALO_L)
    pack = find_face_pack(tmp_path, "buffalo_l")
    assert pack == FacePack("buffalo_l", tmp_path / sub / "det_10g.onnx", tmp_path / sub / "w600k_r50.onnx")


def test_antelopev2_names(tmp_path):
    _touch(tmp_path / "face" / "antelopev2", ANTELOPEV2)
    pack = find_face_pack(tmp_path, "antelopev2")
    assert pack.detection.name == "scrfd_10g_bnkps.onnx"
    assert pack.recognition.name == "glintr100.onnx"


def test_buffalo_s_and_m_names(tmp_path):
    _touch(tmp_path / "face" / "buffalo_s", ["det_500m.onnx", "w600k_mbf.onnx", "2d106det.onnx"])
    _touch(tmp_path / "face" / "buffalo_m", ["det_2.5g.onnx", "w600k_r50.onnx", "genderage.onnx"])
    assert find_face_pack(tmp_path, "buffalo_s").detection.name == "det_500m.onnx"
    assert find_face_pack(tmp_path, "buffalo_m").recognition.name == "w600k_r50.onnx"


def test_immich_cache_layout(tmp_path):
    base = tmp_path / "facial-recognition" / "buffalo_l"
    _touch(base / "detection", ["model.onnx"])
    _touch(base / "recognition", ["model.onnx"])
    pack = find_face_pack(tmp_path, "buffalo_l")
    assert pack.detection == base / "detection" / "model.onnx"
    assert pack.recognition == base / "recognition" / "model.onnx"
    # a path is not a pack name: Immich's own spelling (immich-app/buffalo_l) is cleaned before, by clean_name
    with pytest.raises(ValueError, match="immich-app/buffalo_l"):
        find_face_pack(tmp_path, "immich-app/buffalo_l")


def test_unknown_names_are_told_apart_by_their_graphs(tmp_path, face_models):
    folder = tmp_path / "face" / "custom"
    folder.mkdir(parents=True)
    # sorted order puts the recogniser first, so only the graphs can tell which is which
    shutil.copy(face_models["rec"], folder / "model_a.onnx")
    shutil.copy(face_models["det"], folder / "model_b.onnx")
    pack = find_face_pack(tmp_path, "custom")
    assert pack.detection.name == "model_b.onnx"
    assert pack.recognition.name == "model_a.onnx"


def test_missing_pack_names_the_places_and_what_to_do(tmp_path):
    with pytest.raises(ModelMissingError) as info:
        find_face_pack(tmp_path, "buffalo_l")
    msg = str(info.value)
    assert str(tmp_path / "face" / "buffalo_l") in msg
    assert str(tmp_path / "facial-recognition" / "buffalo_l") in msg
    assert "buffalo_l.zip" in msg
    assert "detection/model.onnx" in msg
    assert info.value.path == tmp_path / "face" / "buffalo_l"


def test_incomplete_pack_says_which_half_is_missing(tmp_path):
    _touch(tmp_path / "face" / "buffalo_l", ["det_10g.onnx", "genderage.onnx"])
    with pytest.raises(ModelMissingError) as info:
        find_face_pack(tmp_path, "buffalo_l")
    assert "recogniser" in str(info.value)
    assert info.value.path == tmp_path / "face" / "buffalo_l"


def test_other_packs_do_not_satisfy_the_name(tmp_path):
    _touch(tmp_path / "face" / "buffalo_s", ["det_500m.onnx", "w600k_mbf.onnx"])
    with pytest.raises(ModelMissingError):
        find_face_pack(tmp_path, "buffalo_l")
    with pytest.raises(ValueError):
        find_face_pack(tmp_path, "..")
