"""Failure classes the listener distinguishes: permanent ones fail a job at once, storage outages make it wait
without spending an attempt, the rest retry with backoff."""
from __future__ import annotations

from pathlib import Path


class PermanentJobError(Exception):
    """Retrying cannot help (missing or unreadable image, path outside the mapped roots, missing model)."""


class StorageUnavailableError(Exception):
    """The mapped root the previews live under is not there (an unmounted share): not the job's fault. Its jobs
    wait without spending an attempt, and the listener claims nothing until the root is back."""

    def __init__(self, root: Path):
        self.root = root
        super().__init__(f"mapped root {root} is missing or empty (unmounted?)")
