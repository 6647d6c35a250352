"""Chinese-CLIP image and text encoders on ONNX Runtime.

The models are exported once from official cn-clip checkpoints (`export.import_checkpoint`, reached through
`cnai models import-clip CHECKPOINT --arch ViT-B-16`) into `CNAI_MODELS_DIR/clip/<name>/`. Serving needs neither
torch nor cn_clip: preprocessing and tokenisation are reimplemented here and the graphs return L2-normalised
embeddings, so an image and a text can be compared with a dot product.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..base import InferenceModel
from ..defaults import CLIP_MODEL as DEFAULT_ARCH
from ..runtime import ModelMissingError, RuntimeOptions
from .preprocess import MEAN, STD, preprocess_image
from .tokenizer import ClipTokenizer

__all__ = ["ClipVisual", "ClipTextual", "find_clip_model", "list_clip_models", "import_checkpoint",
           "ModelMissingError", "DEFAULT_ARCH"]

log = logging.getLogger(__name__)

_ARCH_NAMES = ("ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50")  # kept in step with export.ARCHES


def import_checkpoint(*args, **kwargs) -> Path:
    """See `export.import_checkpoint`. Imported on call so that this package stays free of torch."""
    from .export import import_checkpoint as _impl

    return _impl(*args, **kwargs)


def _hint(models_dir: Path, name: str) -> str:
    arch = name if name in _ARCH_NAMES else DEFAULT_ARCH
    return (f"import the official Chinese-CLIP checkpoint first: run `cnai models import-clip CHECKPOINT --arch "
            f"{arch}` with CNAI_MODELS_DIR={models_dir} (it writes {models_dir / 'clip' / name}/)")


def list_clip_models(models_dir: Path | str) -> list[str]:
    """Names of the imported models (folders with a config.json) under `models_dir/clip/`."""
    root = Path(models_dir) / "clip"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file())


def find_clip_model(models_dir: Path | str, name: str = DEFAULT_ARCH) -> Path:
    """The folder of model `name` under `models_dir/clip/`; the name is matched case-insensitively as a
    fallback (people type vit-b-16). Raises ModelMissingError naming the config file it looked for."""
    models_dir = Path(models_dir)
    direct = models_dir / "clip" / name
    if (direct / "config.json").is_file():
        return direct
    for other in list_clip_models(models_dir):
        if other.lower() == name.lower():
            return models_dir / "clip" / other
    raise ModelMissingError(direct / "config.json", _hint(models_dir, name))


class _ClipEncoder(InferenceModel):
    """Shared loading logic: config.json is read lazily, the ONNX session is created in `_load()`."""

    part = ""  # "visual" or "textual": the sub-folder and the key prefix

    def __init__(self, model_dir: Path | str, runtime: RuntimeOptions | None = None, max_batch: int = 32):
        super().__init__(runtime, max_batch)
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.key = f"clip-{self.part}:{self.name}"
        self._config: dict | None = None
        self._session = None
        self._input = ""

    def options_key(self, item: Any) -> tuple:
        return ()  # the output depends on the input alone

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            path = self.model_dir / "config.json"
            if not path.is_file():
                raise ModelMissingError(path, _hint(self.model_dir.parent.parent, self.name))
            self._config = json.loads(path.read_text(encoding="utf-8"))
        return self._config

    @property
    def embed_dim(self) -> int:
        """The embedding size, from config.json; once loaded, the graph's output agrees with it."""
        return int(self.config["embed_dim"])

    def _load(self) -> None:
        cfg = self.config
        rel = cfg.get(self.part, {}).get("file", f"{self.part}/model.onnx")
        self._prepare(cfg)
        session = self.session(self.model_dir / rel, _hint(self.model_dir.parent.parent, self.name))
        graph_dim = session.get_outputs()[0].shape[-1]
        if isinstance(graph_dim, int) and graph_dim != self.embed_dim:
            raise ValueError(f"{self.model_dir / rel} returns {graph_dim}-d embeddings but "
                             f"{self.model_dir / 'config.json'} says embed_dim {self.embed_dim}: re-import the model")
        self._session = session
        self._input = session.get_inputs()[0].name

    def _prepare(self, cfg: dict) -> None:
        pass

    def _unload(self) -> None:
        self._session = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def _encode_all(self, inputs: list, encode) -> list:
        """One output per input: an embedding, or the Exception that input alone raised."""
        results: list = [None] * len(inputs)
        ok: list[int] = []
        prepared: list = []
        for i, item in enumerate(inputs):
            try:
                prepared.append(self._prep_item(item))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - a bad input fails alone, not the whole batch
                results[i] = e
        for start in range(0, len(ok), max(1, self.max_batch)):
            idx = ok[start:start + self.max_batch]
            emb = encode(prepared[start:start + self.max_batch])
            for j, i in enumerate(idx):
                results[i] = emb[j].copy()  # own the row, so the batch buffer can be freed
        return results

    def _prep_item(self, item: Any) -> Any:
        raise NotImplementedError


class ClipVisual(_ClipEncoder):
    """Image → embedding. `run_batch` takes PIL images or HxWx3 uint8 RGB arrays (already upright)."""

    part = "visual"

    def _prepare(self, cfg: dict) -> None:
        self.image_size = int(cfg["image_size"])
        self.mean = tuple(cfg.get("mean", MEAN))
        self.std = tuple(cfg.get("std", STD))

    def _prep_item(self, item: Any) -> np.ndarray:
        return preprocess_image(item, self.image_size, self.mean, self.std)

    def _predict_batch(self, items: list[Any]) -> list:
        return self._encode_all(items, lambda arrs: self._run(np.stack(arrs)))


class ClipTextual(_ClipEncoder):
    """Text → embedding. Whitespace is collapsed; sequences are padded only to the batch's longest."""

    part = "textual"

    def _prepare(self, cfg: dict) -> None:
        vocab = self.model_dir / "textual" / cfg.get("vocab", "vocab.txt")
        if not vocab.is_file():
            raise ModelMissingError(vocab, _hint(self.model_dir.parent.parent, self.name))
        self.tokenizer = ClipTokenizer(vocab, int(cfg.get("context_length", 52)), bool(cfg.get("lowercase", True)))

    def _prep_item(self, item: Any) -> list[int]:
        if not isinstance(item, str):
            raise TypeError(f"expected text, got {type(item).__name__}")
        return self.tokenizer.encode(" ".join(item.split()))

    def _batch(self, rows: list[list[int]]) -> np.ndarray:
        out = np.full((len(rows), max(len(r) for r in rows)), self.tokenizer.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _predict_batch(self, items: list[str]) -> list:
        return self._encode_all(items, lambda rows: self._run(self._batch(rows)))
