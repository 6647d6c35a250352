"""GET /metrics: the pool's, the gateway's, the listener's and the queue's figures, read when scraped."""
from __future__ import annotations

from pathlib import Path

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from cnai.metrics import QueueReader, ServiceMetrics
from cnai.settings import Settings
from cnai.wiring import build_gateway, build_pool
from tests.conftest import listener_settings, make_asset, make_user, render_text, running_listener, wait_for
from tests.test_gateway import OCR_ENTRIES, immich_form, jpeg


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest_asyncio.fixture(scope="module")
async def ocr_pool(tmp_path_factory):
    settings = Settings()
    settings.models_dir = tmp_path_factory.mktemp("models")
    pool = build_pool(settings)
    await pool.preload(["ocr"])
    yield pool, settings
    await pool.close()


async def test_gateway_serves_prometheus_text_with_models_and_requests(ocr_pool):
    pool, settings = ocr_pool
    async with TestClient(TestServer(build_gateway(pool, settings).app())) as client:
        img = jpeg(render_text(["指标"], width=400))
        assert (await client.post("/predict", data=immich_form(OCR_ENTRIES, img))).status == 200
        refused = {"ocr": {"detection": {"modelName": "KOREAN__PP-OCRv5_mobile"}}}
        assert (await client.post("/predict", data=immich_form(refused, img))).status == 400
        r = await client.get("/metrics")
        assert r.status == 200 and r.content_type == "text/plain"
        found = samples(await r.text())
    assert value(found, "cnai_gateway_requests_total", task="ocr", status="200", route="served") == 1
    assert value(found, "cnai_gateway_requests_total", task="ocr", status="400", route="refused") == 1
    assert value(found, "cnai_inference_items_total", model="ocr") >= 1
    assert value(found, "cnai_inference_batches_total", model="ocr") >= 1
    # Immich's image jobs run as background work beside the listener's
    assert value(found, "cnai_inference_seconds_count", model="ocr", priority="background") == 1
    for name in ("cnai_inference_cache_hits_total", "cnai_inference_cache_misses_total",
                 "cnai_inference_singleflight_joins_total"):
        assert value(found, name, model="ocr") is not None, name


async def test_queue_and_listener_figures(db, dsn, photo_dir, ocr_pool):
    pool, _ = ocr_pool
    owner = await make_user(db)
    render_text(["发票"], width=400).save(photo_dir / "text.jpg")
    readable = await make_asset(db, owner, photo_dir / "text.jpg")
    gone = await make_asset(db, owner, photo_dir / "never-written.jpg")  # its OCR job fails: no such file
    metrics = ServiceMetrics(pool, queue=QueueReader(dsn, min_interval_s=0))
    try:
        found = samples((await metrics.page())[0].decode())
        assert value(found, "cnai_queue_up") == 1
        assert value(found, "cnai_queue_jobs", task="ocr", state="queued") == 2  # the trigger's intake counts
        assert value(found, "cnai_queue_oldest_queued_seconds", task="ocr") >= 0

        async with running_listener(dsn, metrics.pool, listener_settings(["ocr"])) as listener:
            metrics.listener = listener
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) = 2 FROM cnai.job WHERE task = 'ocr' AND state IN ('done', 'failed')"))
            found = samples((await metrics.page())[0].decode())
        assert value(found, "cnai_jobs_total", task="ocr", outcome="done") == 1
        assert value(found, "cnai_jobs_total", task="ocr", outcome="failed") == 1
        assert value(found, "cnai_jobs_total", task="ocr", outcome="retried") == 0
        assert value(found, "cnai_lease_expiries_total") == 0
        # the listener's one readable preview went through the timed pool at background priority
        assert value(found, "cnai_inference_seconds_count", model="ocr", priority="background") == 1
        # the queue's gauge is the work waiting or under way; finished jobs are cnai_jobs_total's
        assert value(found, "cnai_queue_jobs", task="ocr", state="queued") == 0
        assert value(found, "cnai_queue_jobs", task="ocr", state="running") == 0
        assert value(found, "cnai_queue_jobs", task="ocr", state="done") is None
        assert value(found, "cnai_queue_jobs", task="clip", state="queued") == 2  # nobody serves clip here
        assert {readable, gone} == set(await db.fetchval("SELECT array_agg(asset_id) FROM cnai.job WHERE task = 'ocr'"))
    finally:
        await metrics.close()


async def test_database_away_is_a_zero_not_an_error(ocr_pool):
    pool, _ = ocr_pool
    metrics = ServiceMetrics(pool, queue=QueueReader("postgresql://cnai@127.0.0.1:1/none", min_interval_s=0))
    found = samples((await metrics.page())[0].decode())
    assert value(found, "cnai_queue_up") == 0
    assert not any(name == "cnai_queue_jobs" for name, _ in found)
    await metrics.close()


async def job_rows_read(conn) -> int:
    """Rows of cnai.job every session has read so far, by sequential scans and through its indexes."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(
        """SELECT t.seq_tup_read + coalesce((SELECT sum(i.idx_tup_read) FROM pg_stat_user_indexes i
                                              WHERE i.relid = t.relid), 0)
             FROM pg_stat_user_tables t WHERE t.relid = 'cnai.job'::regclass""")


async def test_queue_figures_read_the_waiting_work_not_the_finished_history(db, dsn):
    """/metrics reads the queue every few seconds: what it reads of cnai.job must follow the jobs queued and
    running, not the week of finished jobs kept (200k photos make over half a million)."""
    asset = await make_asset(db, await make_user(db), Path("/p/a.jpg"), with_preview=False)
    await db.execute("""INSERT INTO cnai.job (asset_id, task, state, finished_at)
                        SELECT $1, 'ocr', CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'done' END, now()
                          FROM generate_series(1, 5000) i""", asset)
    await db.execute("INSERT INTO cnai.job (asset_id, task, state) VALUES ($1, 'clip', 'queued')", asset)
    await db.execute("""INSERT INTO cnai.job (asset_id, task, state, lease_until)
                        VALUES ($1, 'ocr', 'running', now() + interval '1 minute')""", asset)
    await db.execute("ANALYZE cnai.job")
    reader = QueueReader(dsn, min_interval_s=0)
    try:
        await reader.refresh()  # connected, and its statements planned once
        await reader._conn.execute("SELECT pg_stat_force_next_flush()")  # its reads so far are in the statistics
        before = await job_rows_read(db)
        await reader.refresh()
        await reader._conn.execute("SELECT pg_stat_force_next_flush()")
        read = await job_rows_read(db) - before
        assert read < 100, f"one read of the queue's figures read {read} rows of cnai.job"
        assert reader.up and sorted(reader.snapshot.counts) == [
            ("clip", "queued", 1), ("clip", "running", 0), ("face", "queued", 0), ("face", "running", 0),
            ("ocr", "queued", 0), ("ocr", "running", 1)]
    finally:
        await reader.close()
