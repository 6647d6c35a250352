"""The listener's behaviour around the queue, on a real PostgreSQL with the real listener in-process and fast
stand-in models: Immich deleting assets while results are written, stopping with a batch in hand, the settings
that shape its work, and a mapped root that is not mounted."""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from cnai.settings import Settings
from cnai.wiring import build_handlers, build_listener
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

    async def write(self, conn, asset_id, size, output) -> None:
        await asyncio.sleep(0.01)
        await self.inner.write(conn, asset_id, size, output)


class HeldModel(EchoModel):
    """Holds every batch until the test lets go (`release`), so a batch stays in hand as long as needed."""

    def __init__(self, task: str, release: threading.Event):
        super().__init__(task, 0)
        self.release = release

    def run_batch(self, items: list) -> list:
        self.release.wait(60)
        return super().run_batch(items)


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


# --- stopping ------------------------------------------------------------------------------------------------------
async def test_stop_hands_back_the_batch_in_hand(db, dsn, preview):
    """Past the grace period a batch is cancelled: its jobs go back at once, queued, with their attempt refunded
    and no error (not left 'running' until the lease expires, an attempt spent, "lease expired" recorded)."""
    owner = await make_user(db)
    assets = [await make_asset(db, owner, preview) for _ in range(3)]
    release = threading.Event()
    settings = listener_settings(["ocr"], batch_size=3, concurrency=1, lease_s=30)
    pool = echo_pool(settings, lambda task: HeldModel(task, release))
    listener = build_listener(dsn, pool, settings)
    listener.config.grace_s = 0.3
    run = asyncio.create_task(listener.run())
    try:
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) = 3 FROM cnai.job WHERE task = 'ocr' AND state = 'running'"), timeout=30)
        listener.stop()
        await asyncio.wait_for(run, 1 + listener.config.grace_s)
        rows = await db.fetch("SELECT state, attempts, error, worker FROM cnai.job WHERE task = 'ocr'")
        assert len(rows) == len(assets)
        assert [(r["state"], r["attempts"], r["error"], r["worker"]) for r in rows] == \
            [("queued", 0, None, None)] * len(assets)
    finally:
        release.set()
        if not run.done():
            run.cancel()
        await pool.close()


# --- settings ------------------------------------------------------------------------------------------------------
LISTENER_ENV = {  # variable -> (value, ListenerConfig field, expected)
    "CNAI_TASKS": ("ocr,face", "tasks", ["ocr", "face"]),
    "CNAI_BATCH_SIZE": ("7", "batch_size", 7),
    "CNAI_CONCURRENCY": ("3", "concurrency", 3),
    "CNAI_LEASE_S": ("42", "lease_s", 42.0),
    "CNAI_POLL_INTERVAL_S": ("0.7", "poll_interval_s", 0.7),
    "CNAI_MAX_ATTEMPTS": ("9", "max_attempts", 9),
    "CNAI_BACKOFF_BASE_S": ("1.5", "backoff_base_s", 1.5),
    "CNAI_PRUNE_AFTER_S": ("3600", "prune_after_s", 3600.0),
    "CNAI_STOP_GRACE_S": ("4", "grace_s", 4.0),
    "CNAI_PATH_MAP": ("/usr/src/app/upload=/mnt/immich", "path_map", [("/usr/src/app/upload", Path("/mnt/immich"))]),
}


@pytest.mark.parametrize("variable", sorted(LISTENER_ENV))
def test_listener_setting_reaches_the_listener(variable, monkeypatch):
    value, attribute, expected = LISTENER_ENV[variable]
    monkeypatch.setenv(variable, value)
    listener = build_listener("postgresql://unused", ModelPool(), Settings())
    assert getattr(listener.config, attribute) == expected
    if attribute in ("lease_s", "max_attempts", "backoff_base_s"):  # the values the queue's calls carry
        assert getattr(listener.queue, attribute) == expected


@pytest.mark.parametrize("variable,value", [("CNAI_BATCH_SIZE", "0"), ("CNAI_CONCURRENCY", "0"),
                                            ("CNAI_MAX_ATTEMPTS", "0"), ("CNAI_LEASE_S", "0"),
                                            ("CNAI_POLL_INTERVAL_S", "-1"), ("CNAI_TASKS", " "),
                                            ("CNAI_TASKS", "ocr,faces")])
def test_listener_setting_out_of_range_is_refused(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=variable):
        Settings()


async def test_batch_size_and_concurrency_bound_the_work_in_hand(db, dsn, preview):
    owner = await make_user(db)
    for _ in range(20):
        await make_asset(db, owner, preview)
    release = threading.Event()
    settings = listener_settings(["ocr"], batch_size=3, concurrency=2)
    pool = echo_pool(settings, lambda task: HeldModel(task, release))
    try:
        async with running_listener(dsn, pool, settings):
            await wait_for(lambda: db.fetchval("SELECT count(*) = 6 FROM cnai.job WHERE state = 'running'"))
            await asyncio.sleep(0.5)  # and no more than that
            assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'running'") == 6
            release.set()
    finally:
        release.set()
        await pool.close()


async def ocr_job_once_failed(db, dsn, settings, pool, asset):
    """Runs the listener until the asset's ocr job has failed; returns that job."""
    try:
        async with running_listener(dsn, pool, settings):
            await wait_for(lambda: db.fetchval(
                "SELECT state = 'failed' FROM cnai.job WHERE asset_id = $1 AND task = 'ocr'", asset), timeout=30)
    finally:
        await pool.close()
    return await db.fetchrow("SELECT attempts, error FROM cnai.job WHERE asset_id = $1 AND task = 'ocr'", asset)


class BrokenModel(EchoModel):
    def run_batch(self, items: list) -> list:
        return [RuntimeError("the model crashed") for _ in items]


async def test_max_attempts_setting_is_the_retry_budget(db, dsn, preview):
    owner = await make_user(db)
    asset = await make_asset(db, owner, preview)
    settings = listener_settings(["ocr"], max_attempts=2, backoff_base_s=0.05)
    row = await ocr_job_once_failed(db, dsn, settings, echo_pool(settings, lambda task: BrokenModel(task, 0)), asset)
    assert row["attempts"] == 2  # the column's default budget is 5
    assert row["error"] == "RuntimeError: the model crashed (gave up after 2 attempts)"


# --- a mapped root that is not mounted ---------------------------------------------------------------------------
@pytest.mark.parametrize("root_state", ["missing", "empty"])
async def test_unmounted_root_waits_without_spending_attempts(db, dsn, photo_dir, preview, root_state, caplog):
    mount = photo_dir / "mnt"
    if root_state == "empty":
        mount.mkdir()  # a mount point with nothing mounted on it
    owner = await make_user(db)
    for i in range(3):
        await make_asset(db, owner, Path("/usr/src/app/upload/thumbs") / f"{i}.jpg")
    settings = listener_settings(["ocr"], path_map=[("/usr/src/app/upload", mount)], backoff_base_s=0.1)
    pool = echo_pool(settings)
    caplog.set_level(logging.WARNING, logger="listener")
    try:
        async with running_listener(dsn, pool, settings):
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) = 3 FROM cnai.job WHERE task = 'ocr' AND error IS NOT NULL"), timeout=30)
            await asyncio.sleep(1.5)  # several poll rounds: nothing is spent, nothing fails
            rows = await db.fetch("SELECT state, attempts, error FROM cnai.job WHERE task = 'ocr'")
            assert {(r["state"], r["attempts"], r["error"]) for r in rows} == {
                ("queued", 0, f"mapped root {mount} is missing or empty (unmounted?)")}
            # mounted again: the work goes through
            (mount / "thumbs").mkdir(parents=True, exist_ok=True)
            for i in range(3):
                (mount / "thumbs" / f"{i}.jpg").write_bytes(preview.read_bytes())
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) = 3 FROM cnai.job WHERE task = 'ocr' AND state = 'done'"), timeout=30)
    finally:
        await pool.close()
    rows = await db.fetch("SELECT attempts FROM cnai.job WHERE task = 'ocr'")
    assert [r["attempts"] for r in rows] == [1, 1, 1]
    missing_logs = [r for r in caplog.records if "is missing or empty" in r.getMessage()]
    assert len(missing_logs) == 1  # said once, not once per job or poll


async def test_missing_file_under_a_present_root_fails_at_once(db, dsn, photo_dir, preview):
    mount = photo_dir / "mnt"
    (mount / "thumbs").mkdir(parents=True)
    (mount / "thumbs" / "other.jpg").write_bytes(preview.read_bytes())
    owner = await make_user(db)
    asset = await make_asset(db, owner, Path("/usr/src/app/upload/thumbs/gone.jpg"))
    settings = listener_settings(["ocr"], path_map=[("/usr/src/app/upload", mount)])
    row = await ocr_job_once_failed(db, dsn, settings, echo_pool(settings), asset)
    assert row["attempts"] == 1 and row["error"].startswith("preview file not found")
