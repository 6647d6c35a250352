"""The pool's shared results: one computation per (model, options, content), single-flight, LRU, time limit; and
background batches yielding to a person's request in any lane."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from inference.base import InferenceModel
from inference.cache import ResultCache, estimated_size
from inference.pool import ModelPool, Priority


class ScalingModel(InferenceModel):
    """Items are (value, scale) -> value * scale; the scale is the option that changes the output. Records every
    computed item, and the start and end of each batch in a log shared between models."""

    def __init__(self, key="scale", max_batch=4, delay=0.02, log=None, fail_times=0):
        super().__init__(max_batch=max_batch)
        self.key = key
        self.delay = delay
        self.computed: list = []
        self.batches: list[list] = []
        self.log = log if log is not None else []
        self.fail_times = fail_times
        self._lock = threading.Lock()

    def options_key(self, item):
        return item[1]

    def _load(self):
        pass

    def _unload(self):
        pass

    def _predict_batch(self, items):
        self.log.append(("start", self.key))
        self.batches.append(list(items))
        time.sleep(self.delay)
        out = []
        for value, scale in items:
            self.computed.append((value, scale))
            if self.fail_times:
                self.fail_times -= 1
                out.append(ValueError(f"transient failure on {value}"))
            else:
                out.append(np.full(4, value * scale, dtype=np.float32))
        self.log.append(("end", self.key))
        return out


def pool_with(model, **kw) -> ModelPool:
    pool = ModelPool(max_wait_s=0.005, **kw)
    pool.register(model.key, lambda: model)
    return pool


async def test_concurrent_identical_requests_compute_once():
    model = ScalingModel(delay=0.1)
    pool = pool_with(model)
    results = await asyncio.gather(*(pool.run("scale", (3, 2), content="photo-a") for _ in range(5)))
    assert all(r.tolist() == [6.0] * 4 for r in results)
    assert model.computed == [(3, 2)]
    stats = pool.stats()["scale"]
    assert (stats.items, stats.cache_misses, stats.singleflight_joins, stats.cache_hits) == (1, 1, 4, 0)
    # and later: answered from the stored result
    assert (await pool.run("scale", (3, 2), content="photo-a")).tolist() == [6.0] * 4
    assert model.computed == [(3, 2)] and stats.cache_hits == 1
    await pool.close()


async def test_different_options_or_content_compute_again():
    model = ScalingModel()
    pool = pool_with(model)
    await pool.run("scale", (3, 2), content="photo-a")
    assert (await pool.run("scale", (3, 5), content="photo-a")).tolist() == [15.0] * 4
    await pool.run("scale", (3, 2), content="photo-b")
    assert model.computed == [(3, 2), (3, 5), (3, 2)]
    await pool.close()


async def test_without_content_or_options_every_request_computes():
    model = ScalingModel()
    pool = pool_with(model)
    await pool.run("scale", (3, 2))
    await pool.run("scale", (3, 2))
    assert len(model.computed) == 2
    await pool.close()


async def test_disabled_cache_is_the_old_behaviour():
    model = ScalingModel(delay=0.05)
    pool = pool_with(model, result_cache_bytes=0)
    await asyncio.gather(*(pool.run("scale", (3, 2), content="photo-a") for _ in range(3)))
    await pool.run("scale", (3, 2), content="photo-a")
    assert len(model.computed) == 4
    stats = pool.stats()["scale"]
    assert (stats.cache_hits, stats.cache_misses, stats.singleflight_joins) == (0, 0, 0)
    await pool.close()


async def test_a_failure_is_not_served_from_the_cache():
    model = ScalingModel(fail_times=1)
    pool = pool_with(model)
    with pytest.raises(ValueError, match="transient"):
        await pool.run("scale", (3, 2), content="photo-a")
    assert (await pool.run("scale", (3, 2), content="photo-a")).tolist() == [6.0] * 4
    assert len(model.computed) == 2
    await pool.close()


async def test_single_flight_survives_its_first_caller_giving_up():
    model = ScalingModel(delay=0.1)
    pool = pool_with(model)
    first = asyncio.create_task(pool.run("scale", (3, 2), content="photo-a"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(pool.run("scale", (3, 2), content="photo-a"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).tolist() == [6.0] * 4
    assert model.computed == [(3, 2)]
    await pool.close()


async def test_lru_evicts_least_recently_used_within_the_budget():
    one = estimated_size(np.zeros(4, dtype=np.float32))
    model = ScalingModel()
    pool = pool_with(model, result_cache_bytes=2 * one + one // 2)  # room for two results
    for name in ("a", "b"):
        await pool.run("scale", (1, 1), content=name)
    await pool.run("scale", (1, 1), content="a")      # a is now the most recently used
    await pool.run("scale", (1, 1), content="c")      # evicts b
    assert len(model.computed) == 3
    await pool.run("scale", (1, 1), content="a")
    await pool.run("scale", (1, 1), content="c")
    assert len(model.computed) == 3                   # a and c were kept
    await pool.run("scale", (1, 1), content="b")
    assert len(model.computed) == 4                   # b was not
    assert pool.results.bytes <= pool.results.max_bytes
    await pool.close()


def test_results_expire_after_their_time_limit():
    now = [1000.0]
    cache = ResultCache(1 << 20, ttl_s=60, clock=lambda: now[0])
    cache.put("k", np.zeros(4))
    now[0] += 59
    assert cache.get("k")[0]
    now[0] += 2
    assert cache.get("k") == (False, None)
    assert cache.bytes == 0 and len(cache) == 0


def test_expired_results_are_freed_without_being_asked_for():
    now = [0.0]
    cache = ResultCache(1 << 20, ttl_s=60, clock=lambda: now[0])
    cache.put("old", np.zeros(1000))
    now[0] += 61
    cache.put("new", np.zeros(4))
    assert len(cache) == 1 and cache.bytes == estimated_size(np.zeros(4))


def test_bad_cache_settings_are_refused():
    with pytest.raises(ValueError, match="0 \\(off\\)"):
        ResultCache(-1, 60)
    with pytest.raises(ValueError, match="time limit"):
        ResultCache(10, 0)


async def test_a_person_joining_queued_background_work_moves_it_to_the_front():
    model = ScalingModel(max_batch=1, delay=0.05)
    pool = pool_with(model)
    backlog = [asyncio.create_task(pool.run("scale", (i, 1), content=f"bg-{i}")) for i in range(6)]
    await asyncio.sleep(0.02)  # the first is running, the rest queued
    last = (5, 1)
    assert await pool.run("scale", last, Priority.INTERACTIVE, content="bg-5") is not None
    order = [b[0] for b in model.batches]
    # it ran right after the batch in flight, not after the four queued before it
    assert order.index(last) <= 2, order
    await asyncio.gather(*backlog)
    assert order.count(last) == 1 and model.computed.count(last) == 1
    await pool.close()


async def background_beside_a_search(search_s: float, yield_s: float) -> list:
    """A text query runs for search_s in one lane; a background image comes to another lane meanwhile. Returns the
    log of batch starts and ends once the background item is done."""
    log: list = []
    pool = ModelPool(max_wait_s=0, background_yield_s=yield_s)
    pool.register("text", lambda: ScalingModel("text", delay=search_s, log=log))
    pool.register("image", lambda: ScalingModel("image", delay=0.01, log=log))
    query = asyncio.create_task(pool.run("text", (1, 1), Priority.INTERACTIVE))
    await asyncio.sleep(0.05)  # the person's request is running
    await pool.run("image", (2, 1), Priority.BACKGROUND)
    seen = list(log)
    await query
    await pool.close()
    return seen


async def test_background_batches_wait_for_interactive_work_in_another_lane():
    log = await background_beside_a_search(search_s=0.3, yield_s=10)
    assert log == [("start", "text"), ("end", "text"), ("start", "image"), ("end", "image")]


async def test_background_waits_at_most_its_bound():
    log = await background_beside_a_search(search_s=3.0, yield_s=0.05)
    assert log == [("start", "text"), ("start", "image"), ("end", "image")]  # never starved


async def test_batch_sizes_are_counted():
    model = ScalingModel(max_batch=4, delay=0.05)
    pool = pool_with(model)
    await asyncio.gather(*(pool.run("scale", (i, 1)) for i in range(6)))
    stats = pool.stats()["scale"]
    assert sum(size * n for size, n in stats.batch_sizes.items()) == stats.items == 6
    assert sum(stats.batch_sizes.values()) == stats.batches
    await pool.close()
