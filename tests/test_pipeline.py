"""Photo in -> trigger -> listener -> real OCR -> `ocr:` search, on a real PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest_asyncio

from cnai.settings import Settings
from cnai.wiring import build_pool
from tests.conftest import (listener_settings, make_asset, make_user, render_text, running_listener, stop_process,
                            wait_for)


def ocr_settings(**overrides) -> Settings:
    return listener_settings(["ocr"], **{"batch_size": 4, **overrides})


@pytest_asyncio.fixture(scope="session")
async def ocr_pool():
    pool = build_pool(ocr_settings())
    await pool.preload(["ocr"])
    yield pool
    await pool.close()


async def job_states(db, asset_id):
    return {r["task"]: (r["state"], r["error"]) for r in await db.fetch(
        "SELECT task, state, error FROM cnai.job WHERE asset_id = $1 AND task = 'ocr' ORDER BY id", asset_id)}


async def search(db, query, owners=None):
    """cnai.search for these owners; every user's photos (the admin path) when none are given."""
    if owners is None:
        return [r["asset_id"] for r in await db.fetch("SELECT asset_id FROM cnai.search_all_owners($1)", query)]
    return [r["asset_id"] for r in await db.fetch("SELECT asset_id FROM cnai.search($1, NULL, $2)", query, owners)]


def save(img, path: Path) -> Path:
    img.save(path, "JPEG", quality=90)
    return path


async def test_photos_are_indexed_and_found(db, dsn, ocr_pool, photo_dir):
    owner = await make_user(db)
    invoice = await make_asset(db, owner, save(render_text(["增值税发票", "合计 128元"]), photo_dir / "a.jpg"))
    english = await make_asset(db, owner, save(render_text(["Hello World", "Summer Sale"]), photo_dir / "b.jpg"))
    mixed = await make_asset(db, owner, save(render_text(["海边日落 Sunset 2024"]), photo_dir / "c.jpg"))
    async with running_listener(dsn, ocr_pool, ocr_settings()):
        await wait_for(lambda: db.fetchval("SELECT count(*) = 3 FROM cnai.ocr"), timeout=90)
    texts = {r["asset_id"]: r["text"] for r in await db.fetch("SELECT asset_id, text FROM cnai.ocr")}
    assert "发票" in texts[invoice] and "128" in texts[invoice]
    assert "hello" in texts[english].lower()
    assert "日落" in texts[mixed]
    lines = await db.fetchval("SELECT lines FROM cnai.ocr WHERE asset_id = $1", invoice)
    assert '"box"' in lines
    assert await search(db, "ocr:发票") == [invoice]
    assert await search(db, "ocr:发") == [invoice]              # one character
    assert await search(db, "ocr:日落") == [mixed]               # two characters
    assert await search(db, "ocr:hello") == [english]            # case-folded
    assert await search(db, "ocr:sunset 海边") == [mixed]        # mixed query
    assert await search(db, "ocr:身份证") == []                  # no match
    assert await search(db, "ocr:发票", [await make_user(db)]) == []  # someone else's photos
    states = await db.fetch("SELECT task, state FROM cnai.job WHERE task = 'ocr'")
    assert {r["state"] for r in states} == {"done"}


async def test_reprocess_replaces_text_and_delete_cascades(db, dsn, ocr_pool, photo_dir):
    owner = await make_user(db)
    path = save(render_text(["旧的文字"]), photo_dir / "p.jpg")
    asset = await make_asset(db, owner, path)
    async with running_listener(dsn, ocr_pool, ocr_settings()):
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM cnai.ocr"), timeout=60)
        assert await search(db, "ocr:旧的") == [asset]
        save(render_text(["新的发票"]), path)
        req = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{ocr}') RETURNING id",
                                asset)
        await wait_for(lambda: db.fetchval("SELECT status IN ('done', 'failed') FROM reprocess_request WHERE id = $1",
                                           req), timeout=60)
    assert await db.fetchval("SELECT status FROM reprocess_request WHERE id = $1", req) == "done"
    assert await search(db, "ocr:新的") == [asset]
    assert await search(db, "ocr:旧的") == []
    await db.execute("DELETE FROM asset WHERE id = $1", asset)
    assert await db.fetchval("SELECT count(*) FROM cnai.ocr") == 0
    leftover = await db.fetch("SELECT j.*, a.\"originalPath\" FROM cnai.job j LEFT JOIN asset a ON a.id = j.asset_id")
    assert leftover == [], leftover


async def test_bad_files_fail_with_reason_while_others_complete(db, dsn, ocr_pool, photo_dir):
    owner = await make_user(db)
    good = await make_asset(db, owner, save(render_text(["正常照片"]), photo_dir / "good.jpg"))
    corrupt_path = photo_dir / "corrupt.jpg"
    corrupt_path.write_bytes(b"this is not a jpeg at all" * 20)
    corrupt = await make_asset(db, owner, corrupt_path)
    empty_path = photo_dir / "empty.jpg"
    empty_path.write_bytes(b"")
    empty = await make_asset(db, owner, empty_path)
    full = (photo_dir / "good.jpg").read_bytes()
    truncated_path = photo_dir / "truncated.jpg"
    truncated_path.write_bytes(full[: len(full) // 3])
    truncated = await make_asset(db, owner, truncated_path)
    missing = await make_asset(db, owner, photo_dir / "missing.jpg")
    async with running_listener(dsn, ocr_pool, ocr_settings()):
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) = 5 FROM cnai.job WHERE task = 'ocr' AND state IN ('done', 'failed')"), timeout=90)
    assert (await job_states(db, good))["ocr"][0] == "done"
    for asset, words in ((corrupt, "not a readable image"), (empty, "empty"), (truncated, "truncated"),
                         (missing, "not found")):
        state, error = (await job_states(db, asset))["ocr"]
        assert state == "failed", (asset, state, error)
        assert words in error, error
    # permanent errors are not retried
    attempts = await db.fetch("SELECT attempts FROM cnai.job WHERE state = 'failed'")
    assert all(r["attempts"] == 1 for r in attempts)
    assert await search(db, "ocr:正常") == [good]


async def test_path_outside_mapped_roots_is_refused(db, dsn, ocr_pool, photo_dir):
    owner = await make_user(db)
    inside = save(render_text(["映射路径"]), photo_dir / "in.jpg")
    ok = await make_asset(db, owner, Path("/usr/src/app/upload") / "in.jpg")
    outside = await make_asset(db, owner, Path("/etc/passwd"))
    escape = await make_asset(db, owner, Path("/usr/src/app/upload/../../../etc/passwd"))
    async with running_listener(dsn, ocr_pool, ocr_settings(path_map=[("/usr/src/app/upload", photo_dir)])):
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) = 3 FROM cnai.job WHERE task = 'ocr' AND state IN ('done', 'failed')"), timeout=60)
    assert (await job_states(db, ok))["ocr"][0] == "done", inside
    for asset in (outside, escape):
        state, error = (await job_states(db, asset))["ocr"]
        assert state == "failed" and "outside the mapped roots" in error


async def test_listener_started_after_jobs_were_queued(db, dsn, ocr_pool, photo_dir):
    owner = await make_user(db)
    assets = [await make_asset(db, owner, save(render_text([f"第{i}张 照片"]), photo_dir / f"{i}.jpg"))
              for i in range(3)]
    # no listener was connected: these NOTIFYs went nowhere
    assert await db.fetchval("SELECT queued FROM cnai.queue_depth() WHERE task = 'ocr'") == 3
    async with running_listener(dsn, ocr_pool, ocr_settings(poll_interval_s=30)):  # catch-up on connect, not the poll
        await wait_for(lambda: db.fetchval("SELECT count(*) = 3 FROM cnai.ocr"), timeout=60)
    assert set(await search(db, "ocr:照片")) == set(assets)


def _spawn_listener(dsn: str, env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, "CNAI_TASKS": "ocr", "CNAI_POLL_INTERVAL_S": "0.3", "CNAI_LEASE_S": "3",
           "CNAI_BATCH_SIZE": "4", "CNAI_CONCURRENCY": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "cnai", "listen", "--dsn", dsn], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def running_by_worker(db) -> dict:
    return {r["id"]: (r["worker"], r["attempts"]) for r in await db.fetch(
        "SELECT id, worker, attempts FROM cnai.job WHERE state = 'running'")}


async def test_sigkill_loses_nothing_and_sigterm_hands_back(db, dsn, photo_dir):
    owner = await make_user(db)
    n = 8
    assets = [await make_asset(db, owner, save(render_text([f"编号{i} 收据"]), photo_dir / f"k{i}.jpg"))
              for i in range(n)]
    first = _spawn_listener(dsn, {})
    try:
        # wait until it holds a batch, then kill it without warning
        await wait_for(lambda: db.fetchval("SELECT count(*) > 0 FROM cnai.job WHERE state = 'running'"), timeout=60,
                       interval=0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = {w for w, _ in (await running_by_worker(db)).values()}
        assert killed  # it died holding work
    finally:
        if first.poll() is None:
            first.kill()
    # the next one is stopped (SIGTERM) with a batch in hand and no grace: it hands the batch back
    second = _spawn_listener(dsn, {"CNAI_STOP_GRACE_S": "0"})
    try:
        in_hand = await wait_for(lambda: _held_by_others(db, killed), timeout=60, interval=0.02)
    finally:
        stop_process(second, 30)
    assert second.returncode == 0, second.stderr.read().decode()[-2000:]
    worker = next(iter(in_hand.values()))[0]
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'running' AND worker = $1", worker) == 0
    for job_id, (_, attempts) in in_hand.items():  # finished, or back in the queue as if never claimed
        row = await db.fetchrow("SELECT state, attempts, error FROM cnai.job WHERE id = $1", job_id)
        assert row["state"] == "done" or (row["state"], row["attempts"], row["error"]) == ("queued", attempts - 1,
                                                                                          None), dict(row)
    third = _spawn_listener(dsn, {})
    try:
        await wait_for(lambda: db.fetchval("SELECT count(*) = $1 FROM cnai.ocr", n), timeout=120)
        await wait_for(lambda: db.fetchval(
            "SELECT count(*) = $1 FROM cnai.job WHERE task = 'ocr' AND state = 'done'", n), timeout=30)
    finally:
        stop_process(third, 30)
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE task = 'ocr' AND state <> 'done'") == 0
    assert set(await search(db, "ocr:收据")) == set(assets)
    assert third.returncode == 0, third.stderr.read().decode()[-2000:]


async def _held_by_others(db, workers: set) -> dict:
    return {i: held for i, held in (await running_by_worker(db)).items() if held[0] not in workers}
