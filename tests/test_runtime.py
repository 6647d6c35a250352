"""Provider selection from settings, and the missing-model error."""
from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from inference.runtime import ModelMissingError, RuntimeOptions, create_session


def test_unavailable_providers_fall_back_to_cpu(caplog):
    caplog.set_level(logging.WARNING)
    chosen = RuntimeOptions(providers=["tensorrt", "cuda", "cpu"]).ort_providers()
    names = [p if isinstance(p, str) else p[0] for p in chosen]
    available = set(ort.get_available_providers())
    assert names[-1] == "CPUExecutionProvider"
    assert set(names) <= available
    if "CUDAExecutionProvider" not in available:
        assert "CUDAExecutionProvider is not available" in caplog.text


def test_gpu_provider_options_when_available():
    opts = RuntimeOptions(providers=["tensorrt"], fp16=True)
    chosen = opts.ort_providers()
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        assert chosen[0][1]["trt_fp16_enable"] is True
    else:
        assert chosen == ["CPUExecutionProvider"]


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(ModelMissingError, match=str(tmp_path / "nope.onnx")) as e:
        create_session(tmp_path / "nope.onnx", missing_hint="put it there")
    assert "put it there" in str(e.value)


def test_threads_come_from_the_options_only(tmp_path, monkeypatch):
    from tests.face_fixtures import build_recogniser
    path = build_recogniser(tmp_path / "rec.onnx")
    monkeypatch.setenv("CNAI_INTRA_OP_THREADS", "3")  # read once, by the settings; never behind their back
    assert create_session(path).get_session_options().intra_op_num_threads == 0
    assert create_session(path, RuntimeOptions(intra_op_threads=2)).get_session_options().intra_op_num_threads == 2
