"""What every model family is: the pool's contract (`BatchModel`) and the base that fulfils it (`InferenceModel`)."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Hashable, Protocol, runtime_checkable

import onnxruntime as ort

from .runtime import RuntimeOptions, create_session

log = logging.getLogger(__name__)


@runtime_checkable
class BatchModel(Protocol):
    """A loaded-on-demand model that processes a list of inputs at once.

    `load` and `run_batch` are blocking and are only ever called from the pool's single worker thread for this
    model, so implementations need no locking. `run_batch` loads the model first if it isn't loaded (`load` is
    for loading ahead of use), and returns exactly one output per input, in order; an input that fails on its own
    (e.g. a degenerate image) may yield an Exception instance in its slot instead of failing the whole batch.
    """

    key: str  # unique name in the pool, e.g. "ocr:PP-OCRv5_mobile" or "clip-visual:ViT-B-16"
    max_batch: int

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def run_batch(self, items: list[Any]) -> list[Any]: ...

    def options_key(self, item: Any) -> Hashable | None:
        """Everything in `item` besides its content that changes the output (thresholds, sizes), so the pool can
        share results between equal requests; None: this item's result is never shared."""
        ...


class InferenceModel(ABC):
    """The base of every model family (as Immich ML's `InferenceModel`).

    `load()` and `run_batch()` are template methods: they do the work common to all families once — loading on
    first use, sessions from the one factory with this model's runtime options — and call `_load()` /
    `_predict_batch()`, which each family fills in. A family never builds sessions or provider options itself.
    """

    key: str
    max_batch: int

    def __init__(self, runtime: RuntimeOptions | None = None, max_batch: int = 1):
        self.runtime = runtime or RuntimeOptions()
        self.max_batch = max_batch
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        if self._loaded:
            return
        self._load()
        self._loaded = True

    def unload(self) -> None:
        self._unload()
        self._loaded = False

    def run_batch(self, items: list[Any]) -> list[Any]:
        self.load()
        return self._predict_batch(items)

    def options_key(self, item: Any) -> Hashable | None:
        # a family that does not say which options matter never has its results shared
        return None

    def session(self, path: Path | str, missing_hint: str) -> ort.InferenceSession:
        """An ONNX Runtime session for one of this model's files, created by the shared factory."""
        return create_session(path, self.runtime, missing_hint)

    @abstractmethod
    def _load(self) -> None:
        """Create the sessions and whatever else inference needs; raise ModelMissingError for an absent file."""

    @abstractmethod
    def _unload(self) -> None:
        """Drop what `_load` created, so its memory can be freed."""

    @abstractmethod
    def _predict_batch(self, items: list[Any]) -> list[Any]:
        """One output (or the Exception that item alone raised) per item, in order; the model is loaded."""
