"""Tiny ONNX stand-ins for InsightFace's buffalo_l models, with the real files' input/output names and shapes.

Detector (like det_10g.onnx): input "input.1" float [1, 3, ?, ?]; 9 outputs, scores for strides 8/16/32, then boxes,
then keypoints, named "448", "471", "494", "451", "474", "497", "454", "477", "500", shaped (12800, 1) (3200, 1)
(800, 1) (12800, 4) ... (800, 10) at 640x640 — no batch axis, as InsightFace exported it. Variants add a batch axis
(Immich's re-exports) or a free batch dimension.

What it computes, so tests know where faces must appear: stride 8 looks at the red channel, 16 at green, 32 at blue.
The score of a cell is relu(mean of that channel's normalised pixels over the cell), so a pure-blue 32x32 block on
the 640 canvas, aligned to the 32-pixel grid, scores 0.99609375 at stride 32 and nothing elsewhere. Anchor 0 of a
cell predicts exactly the cell as its box and the ArcFace template scaled into the cell as its 5 landmarks; anchor 1
predicts the same shifted by 1/8 cell with 0.95 times the score, so NMS must remove it.

Recogniser (like w600k_r50.onnx): input "input.1" float [None, 3, 112, 112], output "683" float [1, 512]; a fixed
random projection of the 8x8-average-pooled crop, so equal crops give equal embeddings, others differ, and the
vectors are not unit length.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

DET_OUTPUT_NAMES = ["448", "471", "494", "451", "474", "497", "454", "477", "500"]
REC_OUTPUT_NAME = "683"
INPUT_NAME = "input.1"
STRIDES = (8, 16, 32)
STRIDE_CHANNEL = {8: 0, 16: 1, 32: 2}  # R, G, B of the network's RGB input
ANCHOR1_SHIFT = 0.125  # in cells
ANCHOR1_FACTOR = 0.95

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def score_of(value: int) -> float:
    """Stride score for a block whose channel is `value` everywhere."""
    return max(0.0, (value - 127.5) / 128.0)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def _save(graph, path: Path) -> Path:
    """Opset 11 / IR 6, like the InsightFace exports, checked, then written."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_detector(path: Path, *, kps: bool = True, layout: str = "insightface") -> Path:
    """layout: "insightface" (N, C) outputs, fixed batch 1; "batched" (1, N, C) outputs; "dynamic" free batch."""
    batch = "batch" if layout == "dynamic" else 1
    nodes: list = []
    outputs: dict[str, object] = {}
    anchor_box = np.array([0, 0, 1, 1], np.float32)
    shifted_box = anchor_box + np.array([-ANCHOR1_SHIFT, -ANCHOR1_SHIFT, ANCHOR1_SHIFT, ANCHOR1_SHIFT], np.float32)
    kps0 = (ARCFACE_TEMPLATE / 112.0).reshape(-1)
    kps1 = kps0 + ANCHOR1_SHIFT
    consts = {
        "box": np.concatenate([anchor_box, shifted_box]).reshape(1, 8, 1, 1),
        "kps": np.concatenate([kps0, kps1]).astype(np.float32).reshape(1, 20, 1, 1),
    }
    nodes.append(_const("box_const", consts["box"]))
    nodes.append(_const("kps_const", consts["kps"]))
    nodes.append(_const("zero", np.array(0.0, np.float32)))
    nodes.append(_const("anchor1_factor", np.array(ANCHOR1_FACTOR, np.float32)))
    kinds = [("score", 1), ("box", 4)] + ([("kps", 10)] if kps else [])
    per_kind_names = {"score": DET_OUTPUT_NAMES[0:3], "box": DET_OUTPUT_NAMES[3:6], "kps": DET_OUTPUT_NAMES[6:9]}
    for c in sorted({w for _, w in kinds}):
        shape = [0, -1, c] if layout in ("batched", "dynamic") else [-1, c]
        nodes.append(_const(f"shape{c}", np.array(shape, np.int64)))
    for level, stride in enumerate(STRIDES):
        s = f"s{stride}"
        nodes += [
            _const(f"{s}_ch", np.array([STRIDE_CHANNEL[stride]], np.int64)),
            helper.make_node("Gather", [INPUT_NAME, f"{s}_ch"], [f"{s}_plane"], axis=1),
            helper.make_node("AveragePool", [f"{s}_plane"], [f"{s}_pool"], kernel_shape=[stride, stride],
                             strides=[stride, stride]),
            helper.make_node("Relu", [f"{s}_pool"], [f"{s}_a0"]),
            helper.make_node("Mul", [f"{s}_a0", "anchor1_factor"], [f"{s}_a1"]),
            helper.make_node("Concat", [f"{s}_a0", f"{s}_a1"], [f"{s}_score_map"], axis=1),
            helper.make_node("Mul", [f"{s}_pool", "zero"], [f"{s}_zeros"]),
            helper.make_node("Add", [f"{s}_zeros", "box_const"], [f"{s}_box_map"]),
            helper.make_node("Add", [f"{s}_zeros", "kps_const"], [f"{s}_kps_map"]),
        ]
        cells = (640 // stride) ** 2 * 2
        for kind, width in kinds:
            name = per_kind_names[kind][level]
            nodes += [
                helper.make_node("Transpose", [f"{s}_{kind}_map"], [f"{s}_{kind}_nhwc"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{s}_{kind}_nhwc", f"shape{width}"], [name]),
            ]
            shape = [batch, cells, width] if layout in ("batched", "dynamic") else [cells, width]
            outputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    order = DET_OUTPUT_NAMES if kps else DET_OUTPUT_NAMES[:6]
    graph = helper.make_graph(
        nodes, "tiny-scrfd",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, "?", "?"])],
        [outputs[n] for n in order],
    )
    return _save(graph, path)


def recogniser_weights(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)) * 0.05).astype(np.float32)


def build_recogniser(path: Path, *, batch: object = "None", output_batch: object = 1, seed: int = 0,
                     mxnet_style: bool = False) -> Path:
    """batch "None" mirrors w600k_r50's free batch; 1 fixes it. mxnet_style puts Sub/Mul nodes first (as MXNet
    conversions do), which InsightFace takes to mean the graph normalises its input itself."""
    nodes = []
    src = INPUT_NAME
    if mxnet_style:
        nodes += [_const("mean", np.array(127.5, np.float32)), _const("scale", np.array(1 / 127.5, np.float32)),
                  helper.make_node("Sub", [src, "mean"], ["centred"], name="_minusscalar0"),
                  helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mulscalar0")]
        src = "scaled"
    nodes += [
        helper.make_node("AveragePool", [src], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        _const("proj", recogniser_weights(seed)),
        helper.make_node("MatMul", ["flat", "proj"], [REC_OUTPUT_NAME], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-arcface",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info(REC_OUTPUT_NAME, TensorProto.FLOAT, [output_batch, 512])],
    )
    return _save(graph, path)


def canvas(width: int, height: int, blocks: list[tuple[int, int, int, int, tuple[int, int, int]]] = ()) -> np.ndarray:
    """HxWx3 uint8 RGB black image with (x, y, w, h, rgb) filled rectangles."""
    img = np.zeros((height, width, 3), np.uint8)
    for x, y, w, h, rgb in blocks:
        img[y:y + h, x:x + w] = rgb
    return img


BLUE = (0, 0, 255)


# -- pytest fixtures (imported by the test modules) -------------------------------------------------------------------


def install_buffalo_l(models_dir: Path, face_models: dict[str, Path]) -> Path:
    """The tiny detector and recogniser as a buffalo_l pack in `models_dir` (its file names and layout)."""
    pack = models_dir / "face" / "buffalo_l"
    pack.mkdir(parents=True)
    shutil.copy(face_models["det"], pack / "det_10g.onnx")
    shutil.copy(face_models["rec"], pack / "w600k_r50.onnx")
    return models_dir


@pytest.fixture(scope="session")
def face_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny models, built once: det (det_10g layout), det_batched, det_dynamic, det_nokps, rec (w600k_r50
    layout), rec_fixed1 (batch fixed at 1), rec_other (different weights)."""
    d = tmp_path_factory.mktemp("face-models")
    return {
        "det": build_detector(d / "det_10g.onnx"),
        "det_batched": build_detector(d / "det_batched.onnx", layout="batched"),
        "det_dynamic": build_detector(d / "det_dynamic.onnx", layout="dynamic"),
        "det_nokps": build_detector(d / "det_nokps.onnx", kps=False),
        "rec": build_recogniser(d / "w600k_r50.onnx"),
        "rec_fixed1": build_recogniser(d / "w600k_fixed1.onnx", batch=1),
        "rec_other": build_recogniser(d / "w600k_other.onnx", seed=1),
    }
