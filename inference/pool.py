"""One pool of models shared by the gateway and the listener, with dynamic batching and two priorities.

Each model has a lane: callers `await pool.run(key, item, priority)`; the lane's worker collects up to
`max_batch` waiting items (after at most `max_wait_s` for stragglers), interactive ones first, and runs them in
the model's own thread. So a person's search never waits behind a backfill for more than the batch in flight,
each model is loaded once, and models of different families run in parallel.

Results are shared by content (`content`): the gateway and the listener asking for the same preview, model and
options meet on one computation, whichever comes first paying (see cache.py). And while a person's request is
queued or running in any lane, background batches wait a little before starting (`background_yield_s`), so the
cores are free for it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Hashable

from . import defaults
from .base import BatchModel
from .cache import ResultCache

log = logging.getLogger(__name__)


class Priority(IntEnum):
    INTERACTIVE = 0  # a person waiting: a search's text embedding
    BACKGROUND = 1   # indexing, Immich's own jobs through the gateway and cnai's queue alike, in arrival order


@dataclass
class PoolStats:
    """What one model's lane did; read by the metrics endpoint."""
    batches: int = 0
    items: int = 0             # inputs the model actually computed
    busy_s: float = 0.0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # batch size -> batches
    cache_hits: int = 0        # answered from a stored result
    cache_misses: int = 0      # cacheable requests that started a computation
    singleflight_joins: int = 0  # answered by waiting for the same computation already under way


class _Flight:
    """One computation in the pool, awaited by every caller that asked for the same thing meanwhile."""

    def __init__(self, fut: asyncio.Future, priority: Priority):
        self.fut = fut
        self.priority = priority
        self.waiters = 0
        self.queued = False         # placed in its lane's queue (it holds a back-pressure slot until done)
        self.interactive = False    # counted in the pool's interactive work in flight


class _Lane:
    def __init__(self, model: BatchModel, max_wait_s: float, queue_limit: int):
        self.model = model
        self.max_wait_s = max_wait_s
        self.queues: dict[Priority, collections.deque[tuple[Any, _Flight]]] = {
            p: collections.deque() for p in Priority}
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
                item, flight = q.popleft()
                if not flight.fut.done():  # done: every caller gave up (cancelled) or the pool closed
                    batch.append((item, flight.fut, p))
            if batch:
                return batch
        return []


class ModelPool:
    def __init__(self, max_wait_s: float = 0.003, queue_limit: int = 512, idle_unload_s: float = 0,
                 result_cache_bytes: int = defaults.RESULT_CACHE_MB * 2**20,
                 result_cache_ttl_s: float = defaults.RESULT_CACHE_TTL_S,
                 background_yield_s: float = defaults.BACKGROUND_YIELD_S):
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self.idle_unload_s = idle_unload_s  # 0: keep models loaded (no cold start after a pause)
        # results shared by content (callers pass `content`); 0 bytes: every request computes, as before
        self.results = ResultCache(result_cache_bytes, result_cache_ttl_s)
        # the longest a background batch waits, before it starts, for a person's request in any lane to finish:
        # ONNX Runtime's threads of a running batch hold the cores, so ordering each queue is not enough
        if background_yield_s < 0:
            raise ValueError(f"background_yield_s must be 0 (never wait) or more, got {background_yield_s}")
        self.background_yield_s = background_yield_s
        self._flights: dict[Hashable, _Flight] = {}
        self._interactive = 0  # interactive inputs queued or running, all lanes together
        self._interactive_idle = asyncio.Event()
        self._interactive_idle.set()
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
    async def run(self, key: str, item: Any, priority: Priority = Priority.BACKGROUND,
                  content: Hashable | None = None) -> Any:
        """Run one item through model `key`; raises the model's exception for this item, if any.

        content names the input by what it is: `content_digest` of an image file's bytes (as stored, before
        decoding), or a query's text. Given it, a result for the same model, content and options (the model's
        `options_key`) answers at once, and a request equal to one under way waits for it instead of computing.
        """
        if self._closed:
            raise RuntimeError("model pool is closed")
        lane = self._lane(key)
        loop = asyncio.get_running_loop()
        shared_key = self._shared_key(key, lane, item, content)
        if shared_key is None:
            return await self._await(lane, item, _Flight(loop.create_future(), priority), owner=True)
        hit, value = self._stored(lane, shared_key)
        if hit:
            return value
        flight = self._flights.get(shared_key)
        if flight is not None:
            lane.stats.singleflight_joins += 1
            if priority < flight.priority:
                self._promote(lane, flight, priority)
            return await self._await(lane, item, flight, owner=False)
        lane.stats.cache_misses += 1
        flight = _Flight(loop.create_future(), priority)
        self._flights[shared_key] = flight
        flight.fut.add_done_callback(lambda f: self._landed(shared_key, flight))
        return await self._await(lane, item, flight, owner=True)

    def stored_result(self, key: str, item: Any, content: Hashable) -> tuple[bool, Any]:
        """(True, result) when run(key, item, content=content) would be answered from a stored result, else
        (False, None); nothing is run. Only the item's options (the model's `options_key`) are read, so a caller
        may leave the content out of it (e.g. an image not decoded yet)."""
        lane = self._lane(key)
        shared_key = self._shared_key(key, lane, item, content)
        return (False, None) if shared_key is None else self._stored(lane, shared_key)

    def _shared_key(self, key: str, lane: _Lane, item: Any, content: Hashable | None) -> tuple | None:
        """What a result of `item` is stored and shared under: the model, the content and the item's options; None
        where it is not shared (no content, results off, a model without options_key or that declines the item)."""
        options_key = getattr(lane.model, "options_key", None)
        if content is None or not self.results.enabled or options_key is None:
            return None
        options = options_key(item)
        return None if options is None else (key, content, options)

    def _stored(self, lane: _Lane, shared_key: tuple) -> tuple[bool, Any]:
        hit, value = self.results.get(shared_key)
        if hit:
            lane.stats.cache_hits += 1
        return hit, value

    async def _await(self, lane: _Lane, item: Any, flight: _Flight, owner: bool) -> Any:
        """Wait for the flight's result; the owner first places the item in the lane's queue."""
        flight.waiters += 1
        try:
            if owner:
                await self._enqueue(lane, item, flight)
            return await asyncio.shield(flight.fut)
        except asyncio.CancelledError:
            flight.waiters -= 1
            if not flight.fut.done():
                if flight.waiters == 0:
                    flight.fut.cancel()  # nobody wants it any more: the lane skips it
                elif owner and not flight.queued:
                    # others joined while this caller waited for a queue slot: queue it for them
                    asyncio.ensure_future(self._enqueue(lane, item, flight))
            raise

    async def _enqueue(self, lane: _Lane, item: Any, flight: _Flight) -> None:
        slots = lane.slots[flight.priority]
        await slots.acquire()
        if flight.fut.done():
            slots.release()
            return
        flight.fut.add_done_callback(lambda _f: slots.release())
        flight.queued = True
        lane.queues[flight.priority].append((item, flight))
        if flight.priority == Priority.INTERACTIVE:
            self._count_interactive(flight)
        lane.wakeup.set()

    def _promote(self, lane: _Lane, flight: _Flight, priority: Priority) -> None:
        """A person now waits on work queued in the background: move it to the front queue."""
        old = flight.priority
        flight.priority = priority
        if not flight.queued:
            return  # its owner still waits for a queue slot, and queues it at the new priority
        queue = lane.queues[old]
        for entry in queue:
            if entry[1] is flight:
                queue.remove(entry)
                lane.queues[priority].append(entry)
                break
        else:
            return  # already running
        if priority == Priority.INTERACTIVE:
            self._count_interactive(flight)
        lane.wakeup.set()

    def _count_interactive(self, flight: _Flight) -> None:
        if flight.interactive:
            return
        flight.interactive = True
        self._interactive += 1
        self._interactive_idle.clear()

        def finished(_f):
            self._interactive -= 1
            if self._interactive == 0:
                self._interactive_idle.set()
        flight.fut.add_done_callback(finished)

    def _landed(self, shared_key: Hashable, flight: _Flight) -> None:
        if self._flights.get(shared_key) is flight:
            del self._flights[shared_key]
        fut = flight.fut
        # failures are not kept: the next request tries again (the photo may be replaced, the model installed)
        if not fut.cancelled() and fut.exception() is None:
            self.results.put(shared_key, fut.result())

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

    def loaded(self) -> dict[str, bool]:
        """Every registered model and whether it is in memory now (first use or preload loads it; an idle one may
        be unloaded again)."""
        return {key: key in self._lanes and bool(getattr(self._lanes[key].model, "loaded", True))
                for key in sorted(self._factories)}

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
                    _, flight = q.popleft()
                    if not flight.fut.done():
                        flight.fut.set_exception(RuntimeError("model pool closed"))
            lane.executor.shutdown(wait=True, cancel_futures=True)
        self._lanes.clear()

    # --- internals --------------------------------------------------------------------------------------------
    async def _work(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await lane.wakeup.wait()
            lane.wakeup.clear()
            while lane.pending():
                if not lane.queues[Priority.INTERACTIVE] and self._interactive:
                    await self._yield_to_interactive(lane)
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
                lane.stats.batch_sizes[len(items)] += 1
                lane.stats.busy_s += time.perf_counter() - started
                lane.last_used = time.monotonic()
                for (_, fut, _), out in zip(batch, outputs):
                    if fut.done():
                        continue
                    if isinstance(out, BaseException):
                        fut.set_exception(out)
                    else:
                        fut.set_result(out)

    async def _yield_to_interactive(self, lane: _Lane) -> None:
        """Before a background batch: wait, at most background_yield_s, while a person's request is queued or
        running in another lane, unless one arrives in this lane (then it goes next)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.background_yield_s
        while self._interactive and not lane.queues[Priority.INTERACTIVE]:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._interactive_idle.wait(), timeout=min(left, 0.01))
            except asyncio.TimeoutError:
                pass

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
