"""The pool's shared results: one computation per (model, options, input content), kept for a while.

The gateway gets a preview's bytes from Immich and the listener reads the same file, so a digest of the encoded
bytes (taken before decoding) lets both meet on one result. Results are bounded by an estimate of their memory
(least recently used go first) and by age. Exceptions are never stored: a failure is retried by the next caller.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import sys
import time
from typing import Any, Callable, Hashable

import numpy as np


def content_digest(data: bytes) -> str:
    """The cache's name for an input's encoded bytes (the file as stored, before any decoding)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def estimated_size(obj: Any, _depth: int = 0) -> int:
    """Bytes a result holds, roughly: arrays by their buffers, containers and dataclasses by their contents."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 128
    if _depth > 6:
        return sys.getsizeof(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sys.getsizeof(obj) + sum(estimated_size(x, _depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(estimated_size(k, _depth + 1) + estimated_size(v, _depth + 1)
                                        for k, v in obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sys.getsizeof(obj) + sum(estimated_size(getattr(obj, f.name), _depth + 1)
                                        for f in dataclasses.fields(obj))
    return sys.getsizeof(obj)


class ResultCache:
    """LRU by estimated bytes, with a time limit. Not thread-safe: used from the pool's event loop only."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if max_bytes < 0:
            raise ValueError(f"result cache size must be 0 (off) or more bytes, got {max_bytes}")
        if ttl_s <= 0:
            raise ValueError(f"result cache time limit must be more than 0 seconds, got {ttl_s}")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.bytes = 0
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int, float]] = collections.OrderedDict()
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bool, Any]:
        """(True, result) for a fresh stored result, else (False, None)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        value, _size, expires = entry
        if self.clock() >= expires:
            self._drop(key)
            return False, None
        self._entries.move_to_end(key)
        return True, value

    def put(self, key: Hashable, value: Any) -> None:
        if not self.enabled:
            return
        size = estimated_size(value)
        if size > self.max_bytes:
            return  # would evict everything else and still not fit
        if key in self._entries:
            self._drop(key)
        now = self.clock()
        self._entries[key] = (value, size, now + self.ttl_s)
        self.bytes += size
        if now - self._last_sweep > min(self.ttl_s / 4, 60):
            self._sweep(now)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _sweep(self, now: float) -> None:
        """Free expired results nobody asks for again; otherwise they would wait for the LRU to push them out."""
        self._last_sweep = now
        for key in [k for k, (_, _, expires) in self._entries.items() if now >= expires]:
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        _value, size, _ = self._entries.pop(key)
        self.bytes -= size
