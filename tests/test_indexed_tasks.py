"""Background work makes jobs for the indexed tasks only (cnai.indexed_task): clip and ocr on a new database, face
once a listener serving it has started (cnai.face is read by nothing, so nobody pays for faces unasked). A person who
names a task gets it whatever is indexed. `cnai tasks` shows them and drops one; an upgraded database that did face
work keeps doing it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from cnai.db import migrate
from tests.conftest import make_asset, make_user, running_listener, wait_for
from tests.face_fixtures import face_models  # noqa: F401  (fixture)
from tests.test_face_jobs import face_pool, face_settings, models_dir  # noqa: F401  (fixtures)
from tests.test_migrations import fresh_dsn  # noqa: F401  (fixture)


async def jobs_of(db, asset) -> list[tuple[str, int]]:
    """(task, priority) of the asset's jobs, whatever their state."""
    await db.fetchval("SELECT cnai.take_intake()")
    rows = await db.fetch("SELECT task, priority FROM cnai.job WHERE asset_id = $1 ORDER BY task", asset)
    return [(r["task"], r["priority"]) for r in rows]


def cnai(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "cnai", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


async def test_an_upload_makes_face_jobs_only_once_a_listener_with_face_started(db, dsn, face_pool,  # noqa: F811
                                                                               models_dir, photo_dir):  # noqa: F811
    owner = await make_user(db)
    before = await make_asset(db, owner, photo_dir / "before.png")
    assert await jobs_of(db, before) == [("clip", 1), ("ocr", 1)]
    assert await db.fetchval("SELECT cnai.indexed_tasks()") == ["clip", "ocr"]

    async with running_listener(dsn, face_pool, face_settings(models_dir), stop_timeout=30):
        await wait_for(lambda: db.fetchval("SELECT 'face' = ANY (cnai.indexed_tasks())"), timeout=30)
        after = await make_asset(db, owner, photo_dir / "after.png")
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1 AND task = 'face'",
                                           after), timeout=30)
    assert await db.fetchval("SELECT cnai.indexed_tasks()") == ["clip", "face", "ocr"]
    assert ("face", 1) in await jobs_of(db, after)
    # not retroactive: the photo from before gets faces from `cnai backfill --task face`
    assert [t for t, _ in await jobs_of(db, before)] == ["clip", "ocr"]


async def test_a_request_naming_face_runs_it_and_one_naming_none_follows_the_indexed_tasks(db, photo_dir):
    asset = await make_asset(db, await make_user(db), photo_dir / "a.png")
    await db.execute("DELETE FROM cnai.job_intake")
    named = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{face}') RETURNING tasks",
                              asset)
    assert named == ["face"] and await jobs_of(db, asset) == [("face", 0)]
    unnamed = await db.fetchval("INSERT INTO reprocess_request (asset_id) VALUES ($1) RETURNING tasks", asset)
    assert unnamed == ["clip", "ocr"]
    assert await jobs_of(db, asset) == [("clip", 0), ("face", 0), ("ocr", 0)]

    await db.execute("TRUNCATE cnai.job CASCADE")
    await db.execute("SELECT cnai.index_tasks('{face}')")
    empty = await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{}') RETURNING tasks",
                              asset)
    assert empty == ["clip", "face", "ocr"] and await jobs_of(db, asset) == [("clip", 0), ("face", 0), ("ocr", 0)]

    # nothing indexed: a request without tasks would wait on no job forever, so it is refused
    await db.execute("DELETE FROM cnai.indexed_task")
    with pytest.raises(asyncpg.CheckViolationError, match="no task is indexed"):
        await db.execute("INSERT INTO reprocess_request (asset_id) VALUES ($1)", asset)


async def test_cnai_tasks_shows_and_drops_and_backfill_follows(db, dsn, photo_dir):
    owner = await make_user(db)
    assets = [await make_asset(db, owner, photo_dir / f"{i}.png") for i in range(3)]
    await db.execute("SELECT cnai.index_tasks('{face}')")
    for a in assets:
        await jobs_of(db, a)  # the intake becomes clip, face and ocr jobs
    await db.execute("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, '{face}')", assets[0])

    out = cnai("tasks", "--dsn", dsn)
    assert "clip  indexed since" in out and "face  indexed since" in out and "; 3 queued" in out

    out = cnai("tasks", "--drop", "face", "--dsn", dsn)
    assert "face is no longer indexed" in out and "dropped 2 queued background job(s)" in out
    assert "face  not indexed" in out and "clip  indexed since" in out
    # the job a person asked for stays; the background ones went
    rows = await db.fetch("SELECT asset_id, priority FROM cnai.job WHERE task = 'face' AND state = 'queued'")
    assert [(r["asset_id"], r["priority"]) for r in rows] == [(assets[0], 0)]
    assert "face was not indexed; nothing changed" in cnai("tasks", "--drop", "face", "--dsn", dsn)

    # an upload after the drop makes no face job; backfill without --task queues the indexed tasks only
    fresh = await make_asset(db, owner, photo_dir / "fresh.png")
    assert [t for t, _ in await jobs_of(db, fresh)] == ["clip", "ocr"]
    await db.execute("DELETE FROM cnai.job WHERE state = 'queued'")
    out = cnai("backfill", "--dsn", dsn)
    assert "face" not in out and "clip: queued 4" in out and "ocr: queued 4" in out
    assert "face: queued 4" in cnai("backfill", "--task", "face", "--dsn", dsn)  # named: whatever is indexed


@pytest.mark.parametrize("face_work", ["none", "face rows", "face jobs", "face runs"])
async def test_an_upgraded_database_keeps_indexing_faces_where_it_did_face_work(fresh_dsn, face_work):  # noqa: F811
    """A database from before cnai.indexed_task made face jobs for every upload; where it did face work, faces stay
    indexed. The state before is made by taking 103_indexed_tasks.sql (and the code that reads it) out again."""
    await migrate(fresh_dsn, standalone=True)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await conn.execute("DROP TABLE cnai.indexed_task CASCADE")
        await conn.execute("DELETE FROM cnai.migration WHERE id = 'queue/schema/103_indexed_tasks.sql' "
                           "OR id LIKE '%/code/%'")
        owner = await make_user(conn)
        asset = await make_asset(conn, owner, Path("/photos/old.jpg"))
        if face_work == "face rows":
            await conn.execute("INSERT INTO cnai.face (asset_id, x1, y1, x2, y2, score, embedding, image_width, "
                               "image_height, model) VALUES ($1, 0, 0, 1, 1, 0.9, $2, 10, 10, 'buffalo_l')",
                               asset, "[" + ",".join(["0.1"] * 512) + "]")
        elif face_work == "face jobs":
            await conn.execute("INSERT INTO cnai.job (asset_id, task, state) VALUES ($1, 'face', 'failed')", asset)
        elif face_work == "face runs":  # ran on photos without faces
            await conn.execute("INSERT INTO cnai.task_run (asset_id, task, model) VALUES ($1, 'face', 'buffalo_l')",
                               asset)
        await conn.execute("DELETE FROM cnai.job_intake")

        applied = await migrate(fresh_dsn, standalone=True)
        assert "queue/schema/103_indexed_tasks.sql" in applied
        expected = ["clip", "ocr"] if face_work == "none" else ["clip", "face", "ocr"]
        assert await conn.fetchval("SELECT cnai.indexed_tasks()") == expected
        # and its uploads keep getting face jobs
        new = await make_asset(conn, owner, Path("/photos/new.jpg"))
        await conn.fetchval("SELECT cnai.take_intake()")
        assert await conn.fetchval("SELECT array_agg(task ORDER BY task) FROM cnai.job WHERE asset_id = $1",
                                   new) == expected
    finally:
        await conn.close()
