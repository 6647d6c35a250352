"""ONNX Runtime session creation shared by every model family."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

# Short names accepted in CNAI_PROVIDERS, mapped to ONNX Runtime's provider names.
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelMissingError(RuntimeError):
    """A model file is not where it must be. The message names the file and how to get it there."""

    def __init__(self, path: Path | str, hint: str):
        self.path = Path(path)
        super().__init__(f"model file not found: {self.path} — {hint}")


@dataclass
class RuntimeOptions:
    """How sessions are created. Built from settings by the composition root."""

    providers: list[str] = field(default_factory=lambda: ["cpu"])
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    fp16: bool = True  # TensorRT only: let it build fp16 engines
    cache_dir: Path | None = None  # TensorRT engine cache
    device_id: int = 0

    def ort_providers(self) -> list:
        available = set(ort.get_available_providers())
        chosen: list = []
        for name in self.providers:
            full = PROVIDER_ALIASES.get(name.lower(), name)
            if full not in available:
                log.warning("ONNX Runtime provider %s is not available here (have %s); skipping it",
                            full, ", ".join(sorted(available)))
                continue
            if full == "TensorrtExecutionProvider":
                opts = {"device_id": self.device_id, "trt_fp16_enable": self.fp16}
                if self.cache_dir:
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.cache_dir))
                chosen.append((full, opts))
            elif full == "CUDAExecutionProvider":
                chosen.append((full, {"device_id": self.device_id}))
            else:
                chosen.append(full)
        if not any((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in chosen):
            chosen.append("CPUExecutionProvider")  # always a fallback for ops the GPU providers lack
        return chosen

    def for_varying_shapes(self) -> RuntimeOptions:
        """These options with TensorRT replaced by CUDA, for models whose input size changes from call to call:
        TensorRT builds an engine per new shape, which costs far more than it saves."""
        providers: list[str] = []
        for name in self.providers:
            full = PROVIDER_ALIASES.get(name.lower(), name)
            name = "cuda" if full == "TensorrtExecutionProvider" else name
            if name not in providers:
                providers.append(name)
        return replace(self, providers=providers)


def create_session(path: Path | str, options: RuntimeOptions | None = None,
                   missing_hint: str = "see the README's Models section") -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise ModelMissingError(path, missing_hint)
    options = options or RuntimeOptions()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.intra_op_threads > 0:
        so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    # errors only: models with a fixed batch in their declared output shape warn on every batched run
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=so, providers=options.ort_providers())
    log.info("loaded %s on %s", path, ", ".join(session.get_providers()))
    return session
