"""Every task records that it ran (cnai.task_run), in the transaction that writes its result, and `cnai backfill`
queues what has not run with the install's model: a photo without faces is done, not missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from cnai.db import migrate
from tests.conftest import make_asset, make_user, running_listener, wait_for
from tests.face_fixtures import canvas, face_models  # noqa: F401  (fixture)
from tests.test_face_jobs import face_pool, face_settings, models_dir  # noqa: F401  (fixtures)
from tests.test_migrations import fresh_dsn, sql_copy  # noqa: F401  (fixtures)
from tests.test_older_postgres import DEBIAN_PG, IMMICH_STANDIN, old_server  # noqa: F401  (fixture)


def backfill(dsn: str, *args: str, **env: str) -> str:
    r = subprocess.run([sys.executable, "-m", "cnai", "backfill", "--dsn", dsn, *args], capture_output=True,
                       text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


async def test_a_photo_without_faces_is_not_queued_again(db, dsn, face_pool, models_dir, photo_dir):  # noqa: F811
    owner = await make_user(db)
    path = photo_dir / "nobody.png"
    Image.fromarray(canvas(640, 480)).save(path)
    asset = await make_asset(db, owner, path)
    async with running_listener(dsn, face_pool, face_settings(models_dir), stop_timeout=30):
        await wait_for(lambda: db.fetchval(
            "SELECT state = 'done' FROM cnai.job WHERE asset_id = $1 AND task = 'face'", asset), timeout=60)
    assert await db.fetchval("SELECT count(*) FROM cnai.face WHERE asset_id = $1", asset) == 0
    run = await db.fetchrow("SELECT model, ran_at FROM cnai.task_run WHERE asset_id = $1 AND task = 'face'", asset)
    assert run is not None and run["model"] == "buffalo_l"

    def queued():
        return db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1 AND task = 'face' AND state = 'queued'",
                           asset)

    assert backfill(dsn, "--task", "face").strip() == "face: queued 0"
    assert await queued() == 0
    assert backfill(dsn, "--task", "face", "--force").strip() == "face: queued 1"
    assert await queued() == 1
    await db.execute("DELETE FROM cnai.job WHERE asset_id = $1 AND task = 'face' AND state = 'queued'", asset)
    # another face model for this install: what ran with the old one is missing
    assert backfill(dsn, "--task", "face", CNAI_FACE_MODEL="antelopev2").strip() == "face: queued 1"


async def test_queue_missing_selects_by_run_and_model(db, photo_dir):
    owner = await make_user(db)
    assets = {name: await make_asset(db, owner, photo_dir / f"{name}.png")
              for name in ("never", "same_model", "other_model", "running", "other_task", "deleted", "hidden",
                           "edited_only")}
    no_preview = await make_asset(db, owner, photo_dir / "no_preview.png", with_preview=False)
    await db.execute("TRUNCATE cnai.job_intake, cnai.job CASCADE")
    for name, task, model in [("same_model", "clip", "cn-clip/ViT-B-16"), ("other_model", "clip", "cn-clip/RN50"),
                              ("other_task", "ocr", "rapidocr"), ("running", "clip", "cn-clip/RN50")]:
        await db.execute("SELECT cnai.record_task_run($1, $2, $3)", assets[name], task, model)
    await db.execute("INSERT INTO cnai.job (asset_id, task, state) VALUES ($1, 'clip', 'running')",
                     assets["running"])
    await db.execute("""UPDATE asset SET "deletedAt" = now() WHERE id = $1""", assets["deleted"])
    # what Immich's own ML skips, backfill skips: hidden assets, and an asset whose only preview is an edit's
    await db.execute("UPDATE asset SET visibility = 'hidden' WHERE id = $1", assets["hidden"])
    await db.execute("""UPDATE asset_file SET "isEdited" = true WHERE "assetId" = $1""", assets["edited_only"])

    async def queued() -> set:
        rows = await db.fetch("SELECT asset_id FROM cnai.job WHERE task = 'clip' AND state = 'queued'")
        return {r[0] for r in rows}

    assert await db.fetchval("SELECT cnai.queue_missing('clip', 'cn-clip/ViT-B-16', false)") == 3
    assert await queued() == {assets["never"], assets["other_model"], assets["other_task"]}
    assert await db.fetchval("SELECT cnai.queue_missing('clip', 'cn-clip/ViT-B-16', false)") == 0  # coalesced
    assert await db.fetchval("SELECT cnai.queue_missing('clip', 'cn-clip/ViT-B-16', true)") == 2
    assert not {no_preview, assets["deleted"], assets["hidden"], assets["edited_only"]} & await queued()
    with pytest.raises(asyncpg.InvalidParameterValueError, match="unknown task faces"):
        await db.fetchval("SELECT cnai.queue_missing('faces', 'buffalo_l', false)")
    with pytest.raises(asyncpg.NullValueNotAllowedError, match="name the model"):
        await db.fetchval("SELECT cnai.queue_missing('face', NULL, false)")


async def test_a_result_and_its_run_commit_together(db, models_dir, photo_dir):  # noqa: F811
    from cnai.wiring import build_handlers
    handler = build_handlers(face_settings(models_dir))["face"]
    asset = await make_asset(db, await make_user(db), photo_dir / "a.png")
    tx = db.transaction()
    await tx.start()
    await handler.write(db, asset, (8, 8), [])
    assert await db.fetchval("SELECT count(*) FROM cnai.task_run WHERE asset_id = $1", asset) == 1
    await tx.rollback()
    assert await db.fetchval("SELECT count(*) FROM cnai.task_run WHERE asset_id = $1", asset) == 0


async def test_results_written_before_the_table_existed_count_as_runs(fresh_dsn, sql_copy, photo_dir):  # noqa: F811
    """An existing database: results from before cnai.task_run are runs, so upgrading queues nothing new."""
    held_back = sql_copy.parent / "held-back"
    held_back.mkdir()
    # cnai.task_run and what came after it (204's owner column needs 222's trigger)
    new_files = [sql_copy / "results" / "schema" / "201_task_run.sql",
                 sql_copy / "results" / "schema" / "204_ocr_owner.sql",
                 *(sql_copy / "results" / "code").glob("*")]
    for f in new_files:
        shutil.move(f, held_back / f.name)
    await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        owner = await make_user(conn)
        with_text, with_clip, with_faces, bare = [await make_asset(conn, owner, photo_dir / f"{i}.png")
                                                  for i in range(4)]
        await conn.execute("TRUNCATE cnai.job_intake, cnai.job CASCADE")  # as if the work had been done and pruned
        await conn.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '发票', '[]', "
                           "'rapidocr-1.4.4/PP-OCRv4_mobile')", with_text)
        vector = "[" + ",".join(["0.1"] * 512) + "]"
        await conn.execute("INSERT INTO cnai.clip (asset_id, model, embedding) VALUES ($1, 'cn-clip/ViT-B-16', "
                           "$2::vector)", with_clip, vector)
        for x in (0, 100):  # two faces: one run
            await conn.execute(
                """INSERT INTO cnai.face (asset_id, x1, y1, x2, y2, score, embedding, image_width, image_height,
                   model) VALUES ($1, $2, 0, $3, 50, 0.9, $4::vector, 640, 480, 'buffalo_l')""",
                with_faces, x, x + 50, vector)

        for f in held_back.iterdir():
            target = sql_copy / "results" / ("schema" if f.name.startswith(("201_", "204_")) else "code") / f.name
            target.parent.mkdir(exist_ok=True)
            shutil.move(f, target)
        await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
        runs = {(r["asset_id"], r["task"]): r["model"] for r in await conn.fetch("SELECT * FROM cnai.task_run")}
        assert runs == {(with_text, "ocr"): "rapidocr", (with_clip, "clip"): "cn-clip/ViT-B-16",
                        (with_faces, "face"): "buffalo_l"}
        assert await conn.fetchval("SELECT cnai.queue_missing('ocr', 'rapidocr', false)") == 3
        assert await conn.fetchval("SELECT cnai.queue_missing('clip', 'cn-clip/ViT-B-16', false)") == 3
        assert await conn.fetchval("SELECT cnai.queue_missing('face', 'buffalo_l', false)") == 3
        queued = {(r[0], r[1]) for r in await conn.fetch("SELECT asset_id, task FROM cnai.job")}
        assert (bare, "face") in queued and (with_faces, "face") not in queued and (with_text, "ocr") not in queued
    finally:
        await conn.close()


@pytest.mark.skipif(not DEBIAN_PG, reason="no Debian PostgreSQL 14-17 server installed")
async def test_task_run_sql_runs_on_older_postgres(old_server):  # noqa: F811
    """Immich supports PostgreSQL 14-18: the table, its one-time fill and queue_missing as-is on an older server
    (no pgvector there, so stand-ins for the result tables without their vector columns)."""
    conn = await asyncpg.connect(old_server.dsn())
    try:
        await conn.execute(IMMICH_STANDIN)
        root = Path(__file__).resolve().parent.parent / "sql"
        for name in ("queue/schema/100_queue_tables.sql", "queue/schema/103_indexed_tasks.sql",
                     "queue/code/110_queue_ops.sql", "triggers/code/120_triggers.sql"):
            await conn.execute((root / name).read_text())
        await conn.execute("""
            CREATE TABLE cnai.ocr (asset_id uuid, model text, updated_at timestamptz DEFAULT now());
            CREATE TABLE cnai.clip (asset_id uuid, model text, updated_at timestamptz DEFAULT now());
            CREATE TABLE cnai.face (asset_id uuid, model text, updated_at timestamptz DEFAULT now());""")
        ran, bare = [await conn.fetchval("INSERT INTO asset DEFAULT VALUES RETURNING id") for _ in range(2)]
        for asset in (ran, bare):
            await conn.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', '/p')""", asset)
        await conn.execute("INSERT INTO cnai.face (asset_id, model) VALUES ($1, 'buffalo_l'), ($1, 'buffalo_l')", ran)
        for name in ("results/schema/201_task_run.sql", "results/code/220_task_runs.sql"):
            await conn.execute((root / name).read_text())
        assert await conn.fetchval("SELECT count(*) FROM cnai.task_run WHERE asset_id = $1", ran) == 1
        assert await conn.fetchval("SELECT cnai.queue_missing('face', 'buffalo_l', false)") == 1
        await conn.execute("SELECT cnai.record_task_run($1, 'face', 'buffalo_l')", bare)
        assert await conn.fetchval("SELECT cnai.queue_missing('face', 'buffalo_l', true)") == 1  # one coalesced
    finally:
        await conn.close()
