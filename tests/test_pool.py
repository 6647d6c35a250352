"""The model pool: batching, interactive-first priority, per-item errors, missing models."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inference.base import InferenceModel
from inference.pool import ModelPool, Priority
from inference.runtime import ModelMissingError


class RecordingModel(InferenceModel):
    """Doubles its inputs; records each batch so tests can see how the pool grouped and ordered work."""

    def __init__(self, max_batch=4, delay=0.02, fail_on=None, missing=False):
        super().__init__(max_batch=max_batch)
        self.key = "rec"
        self.delay = delay
        self.fail_on = fail_on
        self.missing = missing
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.loads = 0

    def _load(self):
        self.loads += 1
        if self.missing:
            raise ModelMissingError("/models/x/model.onnx", "put it there")

    def _unload(self):
        pass

    def _predict_batch(self, items):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [ValueError(f"bad {x}") if x == self.fail_on else x * 2 for x in items]


async def test_batches_fill_and_results_keep_order():
    pool = ModelPool(max_wait_s=0.01)
    model = RecordingModel(max_batch=4)
    pool.register("rec", lambda: model)
    out = await asyncio.gather(*(pool.run("rec", i) for i in range(10)))
    assert out == [i * 2 for i in range(10)]
    assert max(len(b) for b in model.batches) == 4 and len(model.batches) <= 4
    assert model.loads == 1 and len(model.threads) == 1
    await pool.close()


async def test_interactive_jumps_the_background_queue():
    pool = ModelPool(max_wait_s=0)
    model = RecordingModel(max_batch=2, delay=0.05)
    pool.register("rec", lambda: model)
    background = [asyncio.create_task(pool.run("rec", i, Priority.BACKGROUND)) for i in range(20)]
    await asyncio.sleep(0.07)  # backfill is saturating the model
    assert await pool.run("rec", 1000, Priority.INTERACTIVE) == 2000
    await asyncio.gather(*background)
    position = next(i for i, b in enumerate(model.batches) if 1000 in b)
    # it ran in the first batch taken after it arrived: at most the batch in flight before it
    assert position <= 3, model.batches  # (its order, not its wait: tests never assert timings)
    await pool.close()


async def test_one_bad_item_does_not_fail_its_batch():
    pool = ModelPool(max_wait_s=0.01)
    pool.register("rec", lambda: RecordingModel(fail_on=3))
    results = await pool.run_many("rec", [1, 2, 3, 4])
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], ValueError) and "bad 3" in str(results[2])
    await pool.close()


async def test_missing_model_fails_its_items_with_the_path_and_others_work():
    pool = ModelPool()
    pool.register("missing", lambda: RecordingModel(missing=True))
    pool.register("ok", lambda: RecordingModel())
    with pytest.raises(ModelMissingError, match="/models/x/model.onnx"):
        await pool.run("missing", 1)
    assert await pool.run("ok", 2) == 4
    errors = await pool.preload(["missing", "ok"])
    assert isinstance(errors["missing"], ModelMissingError) and errors["ok"] is None
    await pool.close()


async def test_back_pressure_bounds_the_queue():
    """12 callers, room for 3 at a priority: the others wait outside the lane, so its queue never holds more."""
    pool = ModelPool(max_wait_s=0, queue_limit=3)
    model = RecordingModel(max_batch=1, delay=0.02)
    pool.register("rec", lambda: model)
    callers = [asyncio.create_task(pool.run("rec", i)) for i in range(12)]
    most = 0
    while not all(c.done() for c in callers):
        most = max(most, pool._lane("rec").pending())
        await asyncio.sleep(0.002)
    assert [c.result() for c in callers] == [i * 2 for i in range(12)]
    assert 2 <= most <= 3  # filled up to the limit, never past it
    await pool.close()


async def test_idle_unload_and_reload():
    pool = ModelPool(idle_unload_s=0.2)
    model = RecordingModel()
    pool.register("rec", lambda: model)
    assert await pool.run("rec", 1) == 2
    await asyncio.sleep(1.6)
    assert await pool.run("rec", 2) == 4
    assert model.loads == 2
    await pool.close()


async def test_unknown_key():
    pool = ModelPool()
    with pytest.raises(KeyError, match="nope"):
        await pool.run("nope", 1)
    await pool.close()
