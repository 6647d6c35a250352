#!/usr/bin/env python
"""GPU benchmark: cn-clip ViT-B-16 image and text encoders on ONNX Runtime's CPU, CUDA and TensorRT providers, at
batch 1, 8 and 32, in fp32 and fp16, printed beside Chinese-CLIP's own deployment table (T4, batch 1: image
4.92 ms with ONNX, 3.58 ms with TensorRT; see its deployment.md for the rest).

    python bench/gpu.py [--models-dir DIR] [--iters N] [--batches 1,8,32]

Runs anywhere: a provider this machine lacks is said so and skipped (ONNX Runtime would silently fall back to the
CPU, which would print CPU figures under a GPU's name), and the CPU row is always measured, side by side in the same
run, so each GPU figure comes with its ratio to the CPU here. fp16 means a model converted to float16 for CPU and
CUDA (inputs and outputs stay float32), and TensorRT's own fp16 mode (trt_fp16_enable) on the fp32 model.

The model is the real ViT-B-16 architecture, imported by `cnai models import-clip` into --models-dir (random
weights, built once, a few minutes; speed does not depend on the weights) unless an imported one is already there.

On a GPU machine: `pip install onnxruntime-gpu` (cnai's `gpu` extra) in place of onnxruntime. It needs CUDA and
cuDNN libraries; torch's CUDA wheels already bring them (the nvidia-*-cu12 packages), and onnxruntime-gpu loads
those (`onnxruntime.preload_dlls()`, called here), so check what the machine already has before installing a CUDA
toolkit. TensorRT needs the `tensorrt` wheel (or its libraries) as well; its first run builds an engine (minutes),
cached under --models-dir, which the warm-up absorbs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# run as a script: import the project, and don't let bench/queue.py or bench/inference.py shadow a module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import onnxruntime as ort  # noqa: E402

# Chinese-CLIP deployment.md, ViT-B-16 on a T4, batch 1 (ms): the figures this run is read against
T4_IMAGE_MS = {"CUDA": 4.92, "TensorRT": 3.58}


def _bench_inference():
    spec = importlib.util.spec_from_file_location("bench_inference", _HERE / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_files(model_dir: Path) -> tuple[dict[str, Path], int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    files = {part: model_dir / cfg.get(part, {}).get("file", f"{part}/model.onnx") for part in ("visual", "textual")}
    return files, int(cfg.get("context_length", 52))


def fp16_copy(path: Path) -> Path:
    """The model in float16, inputs and outputs kept float32 (what a caller hands it), written once beside it."""
    out = path.with_name(path.stem + ".fp16.onnx")
    if not out.exists():
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = onnx.load(str(path))
        onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out))
    return out


def providers_for(name: str, fp16: bool, cache: Path) -> list:
    cpu = "CPUExecutionProvider"
    if name == "CPU":
        return [cpu]
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if name == "CUDA":
        return [cuda, cpu]
    trt = ("TensorrtExecutionProvider", {"device_id": 0, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                                         "trt_engine_cache_path": str(cache)})
    return [trt, cuda, cpu]


PROVIDER_NAMES = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider",
                  "TensorRT": "TensorrtExecutionProvider"}


def inputs(session: ort.InferenceSession, part: str, batch: int, context_length: int) -> dict:
    meta = session.get_inputs()[0]
    rng = np.random.default_rng(0)
    if part == "visual":
        side = next((d for d in meta.shape[2:] if isinstance(d, int)), 224)
        return {meta.name: rng.standard_normal((batch, 3, side, side), dtype=np.float32)}
    dtype = np.int32 if meta.type == "tensor(int32)" else np.int64
    tokens = rng.integers(1000, 20000, (batch, context_length)).astype(dtype)
    tokens[:, 0], tokens[:, 20:] = 101, 0  # [CLS] ... then padding, like a short query
    return {meta.name: tokens}


def median_ms(session: ort.InferenceSession, feed: dict, iters: int) -> float:
    for _ in range(3):  # warm-up: allocations, cuDNN algorithm search, a TensorRT engine build
        session.run(None, feed)
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "cnai-bench-models")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", default="1,8,32")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from torch's nvidia-* wheels, where they are installed
        except Exception as e:  # noqa: BLE001 - a CPU-only machine has none; the provider check below says so
            print(f"(no CUDA libraries preloaded: {e})")
    available = ort.get_available_providers()
    print(f"ONNX Runtime {ort.__version__}; providers here: {', '.join(available)}")
    wanted = [name for name in PROVIDER_NAMES if PROVIDER_NAMES[name] in available]
    for name in PROVIDER_NAMES:
        if name not in wanted:
            print(f"{name}: not available on this machine; skipped (ONNX Runtime would fall back to the CPU)")

    model_dir = _bench_inference().ensure_vit_b_16(args.models_dir)
    files, context_length = model_files(model_dir)
    cache = args.models_dir / ".trt-cache"
    cache.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3

    results: dict[tuple, float] = {}
    for part, path in files.items():
        for precision in ("fp32", "fp16"):
            for name in wanted:
                # TensorRT makes its own fp16 engine from the fp32 graph; the others run a converted model
                model = fp16_copy(path) if precision == "fp16" and name != "TensorRT" else path
                try:
                    session = ort.InferenceSession(str(model), options,
                                                   providers=providers_for(name, precision == "fp16", cache))
                    if PROVIDER_NAMES[name] not in session.get_providers():
                        print(f"{name} {part} {precision}: the session fell back to {session.get_providers()}; skipped")
                        continue
                    for batch in batches:
                        results[part, precision, name, batch] = median_ms(
                            session, inputs(session, part, batch, context_length), args.iters)
                except Exception as e:  # noqa: BLE001 - e.g. an op without an fp16 kernel on this provider
                    print(f"{name} {part} {precision}: failed: {type(e).__name__}: {str(e)[:200]}")

    print(f"\nViT-B-16, median of {args.iters} runs per row; ms per batch, ms per item, ratio to the CPU here (same "
          "batch and precision), and to Chinese-CLIP's T4 figure (batch 1 image)")
    print(f"{'part':8s} {'prec':5s} {'provider':9s} {'batch':>5s} {'ms/batch':>9s} {'ms/item':>8s} {'vs CPU':>7s} "
          f"{'vs T4':>7s}")
    for (part, precision, name, batch), ms in results.items():
        cpu = results.get((part, precision, "CPU", batch))
        t4 = T4_IMAGE_MS.get(name) if part == "visual" and batch == 1 else None
        print(f"{part:8s} {precision:5s} {name:9s} {batch:5d} {ms:9.2f} {ms / batch:8.2f} "
              f"{(f'{cpu / ms:6.2f}x' if cpu and name != 'CPU' else '-'):>7s} "
              f"{(f'{ms / t4:6.2f}x' if t4 else '-'):>7s}")
    print(f"\nChinese-CLIP deployment table (T4, ViT-B-16 image, batch 1): ONNX {T4_IMAGE_MS['CUDA']} ms, TensorRT "
          f"{T4_IMAGE_MS['TensorRT']} ms; 'vs T4' above is this machine's time over that (below 1: faster)")


if __name__ == "__main__":
    main()
