"""Against Debian's own PostgreSQL 15 (no pgvector): a clear error from `cnai migrate`, and the queue and CJK
tokenizer SQL run unchanged on an older server (Immich supports 14-18) with the same tokens as on 18."""
from __future__ import annotations

import tempfile
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from cnai.db import DatabaseSetupError, migrate
from cnai.embedded import EmbeddedServer

DEBIAN_PG = sorted(Path("/usr/lib/postgresql").glob("1[4-7]/bin/postgres"))
pytestmark = pytest.mark.skipif(not DEBIAN_PG, reason="no Debian PostgreSQL 14-17 server installed")

SAMPLE = "增值税发票 No.128 Hello 東京タワー，合計：１２８元"


@pytest.fixture(scope="module")
def old_server():
    data = Path(tempfile.mkdtemp(prefix="cnai-test-pg-old-"))
    server = EmbeddedServer(data, bin_path=DEBIAN_PG[-1].parent)
    server.start()
    yield server
    server.destroy()


# A stand-in for Immich's asset/asset_file (without vector columns), on which cnai's SQL files run as-is.
IMMICH_STANDIN = """
    DROP SCHEMA IF EXISTS cnai CASCADE;
    DROP TABLE IF EXISTS reprocess_request, asset_job_status, asset_file, asset CASCADE;
    CREATE TABLE asset (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                        visibility varchar NOT NULL DEFAULT 'timeline', "deletedAt" timestamptz);
    CREATE TABLE asset_file (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "assetId" uuid REFERENCES asset(id),
                             type varchar NOT NULL, path varchar NOT NULL, "isEdited" boolean DEFAULT false,
                             UNIQUE ("assetId", type, "isEdited"));"""


@pytest_asyncio.fixture
async def old_conn(old_server):
    conn = await asyncpg.connect(old_server.dsn())
    yield conn
    await conn.close()


async def test_missing_pgvector_is_a_clear_error(old_server):
    with pytest.raises(DatabaseSetupError, match="pgvector extension is not installed") as e:
        await migrate(old_server.dsn(), standalone=True)
    assert "--embedded" in str(e.value) and "pgvector" in str(e.value)


async def test_queue_and_tokenizer_sql_run_on_older_postgres(old_conn, dsn):
    await old_conn.execute(IMMICH_STANDIN)
    root = Path(__file__).resolve().parent.parent / "sql"
    for name in ("queue/schema/100_queue_tables.sql", "queue/schema/103_indexed_tasks.sql",
                 "queue/code/110_queue_ops.sql", "triggers/code/120_triggers.sql",
                 "zhparser/code/009_traditional_simplified.sql", "zhparser/code/010_cjk_tokens.sql",
                 "zhparser/code/011_zhparser_config.sql", "zhparser/code/012_zh_words.sql"):
        await old_conn.execute((root / name).read_text())
    assert await old_conn.fetchval("SELECT state FROM cnai.zhparser_state()") == "absent"
    asset = await old_conn.fetchval("INSERT INTO asset DEFAULT VALUES RETURNING id")
    await old_conn.execute("""INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', '/p.jpg')""", asset)
    assert await old_conn.fetchval("SELECT sum(queued) FROM cnai.queue_depth()") == 2  # the indexed clip and ocr
    jobs = await old_conn.fetch("SELECT * FROM cnai.claim_jobs('w', 10, '{clip,ocr,face}', '1 minute')")
    assert len(jobs) == 2
    await old_conn.execute("SELECT cnai.complete_jobs('w', $1)", [j["id"] for j in jobs])
    assert await old_conn.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'done'") == 2
    # the asset trigger, on an older server too: hiding an asset drops its queued work
    await old_conn.execute("INSERT INTO reprocess_request (asset_id) VALUES ($1)", asset)
    await old_conn.execute("UPDATE asset SET visibility = 'hidden' WHERE id = $1", asset)
    assert await old_conn.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'queued'") == 0

    # the triggers that follow Immich's own reprocess buttons: an Immich without their tables migrates all the
    # same; once it has asset_job_status, a face re-run in Immich queues cnai's face task where faces are indexed
    # (a listener with face started), on 15 too
    await old_conn.execute("DROP TABLE IF EXISTS asset_job_status, smart_search")
    for name in ("triggers/schema/131_immich_wipe.sql", "triggers/code/130_immich_reruns.sql"):
        await old_conn.execute((root / name).read_text())
    assert await old_conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cnai_follow_job_status%'") == 0
    task_run = (root / "results/schema/201_task_run.sql").read_text()
    await old_conn.execute(task_run[:task_run.index(");") + 2])  # its CREATE TABLE (the rest needs pgvector)
    await old_conn.execute("""CREATE TABLE asset_job_status ("assetId" uuid PRIMARY KEY REFERENCES asset(id),
                                "facesRecognizedAt" timestamptz, "ocrAt" timestamptz)""")
    await old_conn.execute((root / "triggers/code/130_immich_reruns.sql").read_text())
    assert await old_conn.fetchval("SELECT cnai.index_tasks('{face}')") == ["face"]
    shown = await old_conn.fetchval("INSERT INTO asset DEFAULT VALUES RETURNING id")
    await old_conn.execute("INSERT INTO cnai.task_run (asset_id, task, model) VALUES ($1, 'face', 'm')", shown)
    for _ in range(2):  # Immich's upsert: the first run (cnai ran it: nothing), then a re-run
        await old_conn.execute("""INSERT INTO asset_job_status ("assetId", "facesRecognizedAt") VALUES ($1, now())
                                  ON CONFLICT ("assetId") DO UPDATE SET "facesRecognizedAt" = clock_timestamp()""",
                               shown)
    assert await old_conn.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1 AND task = 'face'", shown) == 1

    old_tokens = await old_conn.fetchval("SELECT cnai.zh_tsvector($1)::text", SAMPLE)
    new = await asyncpg.connect(dsn)
    try:
        new_tokens = await new.fetchval("SELECT cnai.zh_tsvector($1)::text", SAMPLE)
    finally:
        await new.close()
    assert old_tokens == new_tokens
    assert await old_conn.fetchval("SELECT cnai.zh_tsvector($1) @@ cnai.zh_tsquery('值税发')", SAMPLE)
    # folding (normalize() and the Traditional table) on 15 too: Simplified and half-width queries find the sample
    assert await old_conn.fetchval("SELECT cnai.zh_tsvector($1) @@ cnai.zh_tsquery('东京 合计 128')", SAMPLE)
