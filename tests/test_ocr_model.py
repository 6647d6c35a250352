"""OcrModel is built like every other model: its ONNX Runtime sessions come from the shared factory, with the
service's runtime options, and RapidOCR runs on them."""
from __future__ import annotations

import re

from inference.ocr import OcrModel, OcrRequest
from inference.runtime import RuntimeOptions
from tests.conftest import render_text


def test_rapidocr_runs_on_sessions_from_the_shared_factory():
    model = OcrModel(RuntimeOptions(providers=["cpu"], intra_op_threads=1), max_batch=2)
    assert not model.loaded
    [result] = model.run_batch([OcrRequest(render_text(["增值税发票"]))])  # loads on first use
    assert model.loaded and "增值税发票" in result.text
    # the stored model name reads as people write it, e.g. rapidocr-3.10.0/PP-OCRv6-small
    assert re.fullmatch(r"rapidocr-[0-9.]+/PP-OCRv[0-9]+-(mobile|small|server|tiny)", result.model), result.model
    engine = model._engine
    for stage, runner in ((engine.cfg.Det, engine.text_det), (engine.cfg.Rec, engine.text_rec)):
        assert runner.session.session is stage.session  # RapidOCR did not build a session of its own
        options = stage.session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    model.unload()
    assert not model.loaded


def test_tensorrt_is_replaced_by_cuda_for_ocr():
    # detection sees every image at its own size: TensorRT would build an engine per size
    assert OcrModel(RuntimeOptions(providers=["tensorrt", "cuda", "cpu"])).runtime.providers == ["cuda", "cpu"]
    assert OcrModel(RuntimeOptions(providers=["trt"])).runtime.providers == ["cuda"]
