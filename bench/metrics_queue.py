"""What one read of the queue's figures for `/metrics` costs against a long job history, before and after it
stopped counting finished jobs, same run.

    python bench/metrics_queue.py [--assets 200000] [--done 500000] [--queued 2000] [--runs 30]

cnai.job keeps finished jobs for a week (the listener prunes older ones): a library of 200k photos indexed for
OCR and CLIP, with a few re-runs, holds half a million done rows. `/metrics` reads the queue at most every few
seconds (QueueReader). Before, it counted every job by task and state (admin.job_counts: a scan of the whole
table) and read queue_depth() a second time for the ages; now it reads the queued and running jobs only, through
their partial indexes (admin.active_jobs), and finished jobs are counted by the listeners' cnai_jobs_total. The
two reads go interleaved, so drift and a busy machine hit both alike. Prints the median time of each and the
ratio (before / after).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/inference.py is named like the project's `inference` package: keep this folder off the import path
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import asyncpg  # noqa: E402

from cnai import admin  # noqa: E402
from cnai.db import migrate  # noqa: E402
from cnai.embedded import scratch_server  # noqa: E402


async def before(conn) -> None:
    """What QueueReader.refresh read until now."""
    await admin.job_counts(conn)
    await admin.oldest_queued_ages(conn)
    await admin.expired_leases(conn)


async def after(conn) -> None:
    """What it reads now."""
    await admin.active_jobs(conn)
    await admin.expired_leases(conn)


async def seed(conn, assets: int, done: int, queued: int) -> None:
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('bench@metrics') RETURNING id""")
    await conn.execute(
        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
           SELECT $1, '/bench/' || g || '.jpg', g || '.jpg', sha256(convert_to(g::text, 'UTF8'))
             FROM generate_series(1, $2) g""", owner, assets)
    # finished history: every asset's tasks, round after round, one in fifty failed
    await conn.execute(
        """WITH a AS (SELECT id, row_number() OVER () - 1 AS n FROM asset)
           INSERT INTO cnai.job (asset_id, task, state, attempts, error, created_at, started_at, finished_at)
           SELECT a.id, (ARRAY['ocr', 'clip', 'face'])[1 + g % 3],
                  CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'done' END, 1,
                  CASE WHEN g % 50 = 0 THEN 'preview file not found' END,
                  now(), now(), now() - (g % 7) * interval '1 day'
             FROM generate_series(0, $1 - 1) g JOIN a ON a.n = g % $2""", done, assets)
    await conn.execute(
        """INSERT INTO cnai.job (asset_id, task) SELECT id, 'ocr' FROM asset ORDER BY id LIMIT $1""", queued)
    await conn.execute(
        """INSERT INTO cnai.job (asset_id, task, state, attempts, worker, lease_until, started_at)
           SELECT id, 'clip', 'running', 1, 'bench', now() + interval '1 minute', now()
             FROM asset ORDER BY id LIMIT 32""")
    await conn.execute("VACUUM ANALYZE cnai.job")


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    with scratch_server("cnai-bench-metrics-") as server:
        dsn = server.dsn()
        await migrate(dsn, standalone=True)
        conn = await asyncpg.connect(dsn)
        await seed(conn, args.assets, args.done, args.queued)
        jobs = await conn.fetchval("SELECT count(*) FROM cnai.job")
        times = {"before": [], "after": []}
        for read in (before, after):  # warm the cache and the plans
            await read(conn)
        for _ in range(args.runs):
            for name, read in (("before", before), ("after", after)):
                started = time.perf_counter()
                await read(conn)
                times[name].append(time.perf_counter() - started)
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"\n/metrics queue read — PostgreSQL {version}, cnai.job {jobs:,} rows ({args.done:,} finished, "
          f"{args.queued:,} queued, 32 running), median of {args.runs}")
    print(f"  before (counts every job):        {b * 1000:8.2f} ms")
    print(f"  after (queued and running only):  {a * 1000:8.2f} ms")
    print(f"  before / after:                   {b / a:8.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=int, default=200_000)
    ap.add_argument("--done", type=int, default=500_000)
    ap.add_argument("--queued", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=30)
    asyncio.run(main(ap.parse_args()))
