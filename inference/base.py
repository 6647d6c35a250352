"""The contract every model family implements so the pool can batch it."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class BatchModel(Protocol):
    """A loaded-on-demand model that processes a list of inputs at once.

    `load` and `run_batch` are blocking and are only ever called from the pool's single worker thread for this
    model, so implementations need no locking. `run_batch` returns exactly one output per input, in order; an
    input that fails on its own (e.g. a degenerate image) may yield an Exception instance in its slot instead of
    failing the whole batch.
    """

    key: str  # unique name in the pool, e.g. "ocr:PP-OCRv5_mobile" or "clip-visual:ViT-B-16"
    max_batch: int

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def run_batch(self, items: list[Any]) -> list[Any]: ...
