"""One pool of models shared by the gateway and the listener, with dynamic batching and two priorities.

Each model has a lane: callers `await pool.run(key, item, priority)`; the lane's worker collects up to
`max_batch` waiting items (after at most `max_wait_s` for stragglers), interactive ones first, and runs them in
the model's own thread. So a person's search never waits behind a backfill for more than the batch in flight,
each model is loaded once, and models of different families run in parallel.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable

from .base import BatchModel

log = logging.getLogger(__name__)


class Priority(IntEnum):
    INTERACTIVE = 0  # live Immich traffic, a person waiting
    BACKGROUND = 1   # queue work


@dataclass
class PoolStats:
    batches: int = 0
    items: int = 0
    busy_s: float = 0.0


class _Lane:
    def __init__(self, model: BatchModel, max_wait_s: float, queue_limit: int):
        self.model = model
        self.max_wait_s = max_wait_s
        self.queues = {p: collections.deque() for p in Priority}
        # back-pressure: a caller waits here when too much is already queued at its priority
        self.slots = {p: asyncio.Semaphore(queue_limit) for p in Priority}
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model.key}")
        self.loaded = False
        self.last_used = time.monotonic()
        self.in_flight = 0
        self.stats = PoolStats()
        self.task: asyncio.Task | None = None

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def take_batch(self) -> list[tuple[Any, asyncio.Future, Priority]]:
        # interactive items go alone: a small batch finishes sooner than one topped up with background work
        for p in Priority:
            q = self.queues[p]
            batch = []
            while q and len(batch) < self.model.max_batch:
                item, fut = q.popleft()
                if not fut.cancelled():
                    batch.append((item, fut, p))
            if batch:
                return batch
        return []


class ModelPool:
    def __init__(self, max_wait_s: float = 0.003, queue_limit: int = 512, idle_unload_s: float = 0):
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self.idle_unload_s = idle_unload_s  # 0: keep models loaded (no cold start after a pause)
        self._factories: dict[str, Callable[[], BatchModel]] = {}
        self._lanes: dict[str, _Lane] = {}
        self._janitor: asyncio.Task | None = None
        self._closed = False

    # --- registry ---------------------------------------------------------------------------------------------
    def register(self, key: str, factory: Callable[[], BatchModel]) -> None:
        """Make a model available under `key`; it is constructed and loaded on first use (or by preload)."""
        self._factories[key] = factory

    def has(self, key: str) -> bool:
        return key in self._factories

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            factory = self._factories.get(key)
            if factory is None:
                raise KeyError(f"no model registered as {key!r}")
            lane = _Lane(factory(), self.max_wait_s, self.queue_limit)
            lane.task = asyncio.get_running_loop().create_task(self._work(lane), name=f"lane-{key}")
            self._lanes[key] = lane
            if self.idle_unload_s > 0 and self._janitor is None:
                self._janitor = asyncio.get_running_loop().create_task(self._unload_idle())
        return lane

    def model(self, key: str) -> BatchModel:
        return self._lane(key).model

    # --- use --------------------------------------------------------------------------------------------------
    async def run(self, key: str, item: Any, priority: Priority = Priority.BACKGROUND) -> Any:
        """Run one item through model `key`; raises the model's exception for this item, if any."""
        if self._closed:
            raise RuntimeError("model pool is closed")
        lane = self._lane(key)
        async with lane.slots[priority]:
            fut = asyncio.get_running_loop().create_future()
            lane.queues[priority].append((item, fut))
            lane.wakeup.set()
            return await fut

    async def run_many(self, key: str, items: list, priority: Priority = Priority.BACKGROUND) -> list:
        """Like run() for several items; exceptions are returned in place, not raised."""
        return await asyncio.gather(*(self.run(key, it, priority) for it in items), return_exceptions=True)

    async def preload(self, keys: list[str]) -> dict[str, Exception | None]:
        """Load models now so the first request doesn't pay for it. Returns the error per key, if any."""
        result: dict[str, Exception | None] = {}
        for key in keys:
            try:
                lane = self._lane(key)  # constructing a model may already find its files missing
                await asyncio.get_running_loop().run_in_executor(lane.executor, lane.model.load)
                lane.loaded = True
                result[key] = None
            except Exception as e:
                log.debug("could not preload %s: %s", key, e)  # the caller reports it, once
                result[key] = e
        return result

    def stats(self) -> dict[str, PoolStats]:
        return {k: lane.stats for k, lane in self._lanes.items()}

    async def close(self) -> None:
        self._closed = True
        for lane in self._lanes.values():
            if lane.task:
                lane.task.cancel()
        if self._janitor:
            self._janitor.cancel()
        for lane in self._lanes.values():
            for q in lane.queues.values():
                while q:
                    _, fut = q.popleft()
                    if not fut.done():
                        fut.set_exception(RuntimeError("model pool closed"))
            lane.executor.shutdown(wait=True, cancel_futures=True)
        self._lanes.clear()

    # --- internals --------------------------------------------------------------------------------------------
    async def _work(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await lane.wakeup.wait()
            lane.wakeup.clear()
            while lane.pending():
                interactive_waiting = bool(lane.queues[Priority.INTERACTIVE])
                if lane.pending() < lane.model.max_batch and lane.max_wait_s > 0 and not interactive_waiting:
                    # give concurrent callers a moment to join this batch
                    deadline = loop.time() + lane.max_wait_s
                    while lane.pending() < lane.model.max_batch and loop.time() < deadline:
                        await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
                batch = lane.take_batch()
                if not batch:
                    continue
                items = [b[0] for b in batch]
                lane.in_flight = len(batch)
                started = time.perf_counter()
                try:
                    outputs = await loop.run_in_executor(lane.executor, self._run_batch, lane, items)
                except Exception as e:
                    outputs = [e] * len(items)
                finally:
                    lane.in_flight = 0
                lane.stats.batches += 1
                lane.stats.items += len(items)
                lane.stats.busy_s += time.perf_counter() - started
                lane.last_used = time.monotonic()
                for (_, fut, _), out in zip(batch, outputs):
                    if fut.done():
                        continue
                    if isinstance(out, BaseException):
                        fut.set_exception(out)
                    else:
                        fut.set_result(out)

    @staticmethod
    def _run_batch(lane: _Lane, items: list) -> list:
        # the model loads itself on first use; a load error (e.g. ModelMissingError) reaches every item
        outputs = lane.model.run_batch(items)
        lane.loaded = True
        if len(outputs) != len(items):
            raise RuntimeError(f"{lane.model.key} returned {len(outputs)} results for {len(items)} inputs")
        return outputs

    async def _unload_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(1.0, self.idle_unload_s / 4))
            for lane in list(self._lanes.values()):
                idle = time.monotonic() - lane.last_used
                if lane.loaded and not lane.pending() and not lane.in_flight and idle > self.idle_unload_s:
                    log.info("unloading %s after %.0f s idle", lane.model.key, idle)
                    await loop.run_in_executor(lane.executor, lane.model.unload)
                    lane.loaded = False
