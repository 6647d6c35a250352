"""A log for errors that repeat with every request or job (a missing model): once per key per window, with a count.

It lives beside the models because their errors are what repeats; the gateway and the listener each hold one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Window:
    started: float
    suppressed: int = 0


class RepeatedErrorLog:
    """`error(key, msg, *args)` logs the first occurrence of `key`, then stays quiet for `window_s`; the next
    occurrence after that logs again, saying how many were left out meanwhile (`repeats`, also in the message)."""

    def __init__(self, logger: logging.Logger, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def error(self, key: str, msg: str, *args, level: int = logging.ERROR) -> None:
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.started < self.window_s:
            window.suppressed += 1
            return
        repeats = window.suppressed if window else 0
        self._windows[key] = _Window(now)
        if repeats:
            msg += " (%d more like it since it was last logged)"
            args = (*args, repeats)
        self.logger.log(level, msg, *args, extra={"error_key": key, "repeats": repeats})
