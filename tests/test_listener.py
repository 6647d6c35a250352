"""The listener's behaviour around the queue, on a real PostgreSQL with the real listener in-process and fast
stand-in models: Immich deleting assets while results are written."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from cnai.wiring import build_handlers
from inference.pool import ModelPool
from listener.task_names import TASKS
from listener.tasks import TaskHandler
from tests.chaos.runner import EchoModel
from tests.conftest import listener_settings, make_asset, make_user, running_listener, wait_for


def echo_pool(settings, model=lambda task: EchoModel(task, 0)) -> ModelPool:
    """Stand-in models under the keys the real handlers use, so build_listener's wiring is the one tested."""
    pool = ModelPool()
    for task, handler in build_handlers(settings).items():
        pool.register(handler.model_key, lambda task=task: model(task))
    return pool


@dataclass
class SlowWrite(TaskHandler):
    """The real handler's write, a little later: the settle transaction holds its locks longer (a busy disk)."""
    inner: TaskHandler | None = None

    def request(self, image):
        return self.inner.request(image)

    async def write(self, conn, asset_id, image, output) -> None:
        await asyncio.sleep(0.01)
        await self.inner.write(conn, asset_id, image, output)


@pytest.fixture
def preview(photo_dir) -> Path:
    path = photo_dir / "preview.jpg"
    Image.new("RGB", (64, 48), "white").save(path, "JPEG")
    return path


async def states(db) -> dict:
    return {(r["asset_id"], r["task"]): r for r in await db.fetch("SELECT * FROM cnai.job")}


# --- Immich's deletes --------------------------------------------------------------------------------------------
async def test_immich_deletes_never_deadlock_with_settling(db, dsn, preview, caplog):
    """Immich deletes assets one statement each while the listener writes their results: its DELETE locks the
    asset, then cascades into cnai.job and the result tables. Neither side may deadlock, and nothing survives."""
    owner = await make_user(db)
    assets = [await make_asset(db, owner, preview) for _ in range(240)]
    settings = listener_settings(list(TASKS), batch_size=12, concurrency=2)
    pool = echo_pool(settings)
    deleter = await asyncpg.connect(dsn)
    errors: list[BaseException] = []
    deleted: list = []

    async def delete_like_immich():
        """One DELETE per asset, as Immich does, until half are gone or the work is done. The asset picked is
        the one whose result a batch writes last (its newest running job): the moment a deadlock can happen."""
        while len(deleted) < len(assets) // 2:
            target = await deleter.fetchval(
                "SELECT asset_id FROM cnai.job WHERE state = 'running' ORDER BY id DESC LIMIT 1")
            if target is None:
                if not await deleter.fetchval("SELECT sum(queued) FROM cnai.queue_depth()"):
                    return
                await asyncio.sleep(0.001)
                continue
            try:
                await deleter.execute("DELETE FROM asset WHERE id = $1", target)
            except asyncpg.PostgresError as e:
                errors.append(e)
            deleted.append(target)

    caplog.set_level(logging.WARNING, logger="listener")
    try:
        async with running_listener(dsn, pool, settings) as listener:
            listener.handlers = {t: SlowWrite(t, h.model_key, inner=h) for t, h in listener.handlers.items()}
            await asyncio.wait_for(delete_like_immich(), 60)
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) = 0 FROM cnai.job WHERE state NOT IN ('done', 'failed')"), timeout=60)
    finally:
        await deleter.close()
        await pool.close()
    assert len(deleted) > 20  # the two really met
    assert errors == [], errors
    deadlocks = [r.getMessage() for r in caplog.records if "deadlock" in r.getMessage().lower()]
    assert deadlocks == []
    kept = set(assets) - set(deleted)
    gone = set(deleted)
    for table in ("cnai.ocr", "cnai.clip", "cnai.face", "cnai.job"):
        left = {r[0] for r in await db.fetch(f"SELECT DISTINCT asset_id FROM {table}")}
        assert not left & gone, f"{table} kept rows of deleted assets"
        if table != "cnai.job":
            assert left == kept, f"{table}: results missing for {len(kept - left)} kept asset(s)"
    assert {r["state"] for r in (await states(db)).values()} == {"done"}
