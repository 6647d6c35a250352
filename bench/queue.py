"""Queue benchmark with a no-op task: claim + complete throughput, NOTIFY-to-claim latency, backlog catch-up.

    python bench/queue.py [--quick]

Starts its own embedded PostgreSQL in a temporary folder, migrates it, and drives the same SQL functions the
listener uses (cnai.claim_jobs / cnai.complete_jobs), batched, from 1, 4 and 16 concurrent workers, beside a
bare batched `FOR UPDATE SKIP LOCKED` loop on a plain table (claim N, mark done: the floor any Postgres queue
pays) and a naive one-job-per-transaction loop, measured in the same run. Then the claim's cost against a
backlog of jobs nobody serves (CNAI_TASKS=ocr without CLIP or face models): it must stay flat. Prints the
figures next to the published ones of other Postgres queues (reference/anchors.md §A). Durability is untouched
(fsync, synchronous_commit on).
"""
from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the standard library's `queue`: keep its folder off the import path
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402

import asyncpg  # noqa: E402

from cnai.db import migrate  # noqa: E402
from cnai.embedded import EmbeddedServer  # noqa: E402
from listener.task_names import TASKS  # noqa: E402

LEASE = timedelta(seconds=60)

PUBLISHED = [  # jobs/s on their own benchmarks (reference/anchors.md §A)
    ("pg-boss", "~2,387 jobs/s at 64 workers (hardbyte bench)"),
    ("River", "~501 jobs/s (hardbyte bench)"),
    ("Oban", "~284 jobs/s (hardbyte bench)"),
    ("procrastinate", "~269 jobs/s, flat as workers were added (hardbyte bench)"),
    ("PGMQ", "11.3k msgs/s at 16 workers, 3.2k at 256 (hardbyte bench)"),
    ("graphile-worker", "~183k jobs/s executed, batching on, 4.16 ms add-to-start (its own docs)"),
]


async def make_assets(conn, n: int) -> None:
    have = await conn.fetchval("SELECT count(*) FROM asset")
    if have >= n:
        return
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('bench@queue') ON CONFLICT (email)
                                   DO UPDATE SET name = '' RETURNING id""")
    await conn.execute(
        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
           SELECT $1, '/bench/' || g || '.jpg', g || '.jpg', sha256(convert_to(g::text || random()::text, 'UTF8'))
             FROM generate_series(1, $2) g""", owner, n - have)
    await conn.execute("ANALYZE asset")


async def fill(conn, n: int) -> None:
    """A backlog of n queued jobs (the way `cnai backfill` queues them), on a freshly emptied queue."""
    await conn.execute("TRUNCATE cnai.job CASCADE")
    per_task = -(-n // len(TASKS))
    await conn.execute(
        """INSERT INTO cnai.job (asset_id, task)
           SELECT a.id, t.task FROM (SELECT id FROM asset ORDER BY id LIMIT $1) a
           CROSS JOIN unnest($2::text[]) AS t(task) LIMIT $3""", per_task, TASKS, n)
    await conn.execute("VACUUM ANALYZE cnai.job")


async def drain(dsn: str, n: int, workers: int, batch: int, naive: bool = False) -> dict:
    """Workers claim and complete until the queue is empty; returns jobs/s and the claim round trip's median.

    Batched: one claim_jobs call takes up to `batch` jobs, one complete_jobs call settles them (two short
    transactions, as the listener does). Naive: one job per transaction (claim one, complete it, commit)."""
    pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
    claimed_total = 0
    completed_total = 0
    claim_ms: list[float] = []

    async def worker(i: int):
        nonlocal claimed_total, completed_total
        name = f"bench-{i}"
        async with pool.acquire() as conn:
            while True:
                tx = conn.transaction() if naive else None
                if tx:
                    await tx.start()
                t0 = time.perf_counter()
                rows = await conn.fetch("SELECT id FROM cnai.claim_jobs($1, $2, $3, $4)", name,
                                        1 if naive else batch, TASKS, LEASE)
                claim_ms.append((time.perf_counter() - t0) * 1000)
                if rows:
                    claimed_total += len(rows)
                    done = await conn.fetchval("SELECT cnai.complete_jobs($1, $2)", name, [r[0] for r in rows])
                    completed_total += len(done)
                if tx:
                    await tx.commit()
                if not rows:
                    return

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    elapsed = time.perf_counter() - start
    async with pool.acquire() as conn:
        left = await conn.fetchval("SELECT count(*) FROM cnai.job WHERE state <> 'done'")
    await pool.close()
    if claimed_total != n or completed_total != n or left:
        raise RuntimeError(f"bench lost track: claimed {claimed_total}, completed {completed_total} of {n}, "
                           f"{left} not done")
    return {"jobs": n, "seconds": elapsed, "rate": n / elapsed,
            "claim_p50_ms": statistics.median(claim_ms)}


BARE_TABLE = """
    DROP TABLE IF EXISTS bench_bare;
    CREATE TABLE bench_bare (
      id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      state text NOT NULL DEFAULT 'queued',
      worker text,
      lease_until timestamptz,
      attempts integer NOT NULL DEFAULT 0,
      finished_at timestamptz
    );
    CREATE INDEX bench_bare_queued ON bench_bare (id) WHERE state = 'queued';
"""


async def bare_drain(dsn: str, n: int, workers: int, batch: int) -> dict:
    """The floor: a plain table, one index, claim N with FOR UPDATE SKIP LOCKED under a lease, then mark them
    done, two short transactions per batch like the listener's; none of cnai's guarantees beyond that."""
    async with _connection(dsn) as conn:
        await conn.execute(BARE_TABLE)
        await conn.execute("INSERT INTO bench_bare (state) SELECT 'queued' FROM generate_series(1, $1)", n)
        await conn.execute("VACUUM ANALYZE bench_bare")
    pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
    done_total = 0

    async def worker(i: int):
        nonlocal done_total
        name = f"bare-{i}"
        async with pool.acquire() as conn:
            while True:
                rows = await conn.fetch(
                    """UPDATE bench_bare b SET state = 'running', worker = $1, attempts = b.attempts + 1,
                              lease_until = now() + interval '60 seconds'
                        WHERE b.id = ANY (ARRAY(SELECT q.id FROM bench_bare q WHERE q.state = 'queued'
                                                 ORDER BY q.id LIMIT $2 FOR UPDATE SKIP LOCKED))
                       RETURNING b.id""", name, batch)
                if not rows:
                    return
                done = await conn.fetch(
                    """UPDATE bench_bare SET state = 'done', finished_at = now(), lease_until = NULL
                        WHERE id = ANY ($1) AND state = 'running' AND worker = $2 RETURNING id""",
                    [r[0] for r in rows], name)
                done_total += len(done)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    elapsed = time.perf_counter() - start
    await pool.close()
    if done_total != n:
        raise RuntimeError(f"bare loop lost track: {done_total} of {n} done")
    return {"jobs": n, "seconds": elapsed, "rate": n / elapsed}


async def claim_behind_unserved(dsn: str, unserved: int, ready: int, claims: int, batch: int) -> float:
    """Median ms of an ocr-only claim (as CNAI_TASKS=ocr) behind `unserved` older queued clip and face jobs,
    on one long-lived connection (as a listener's: PostgreSQL settles on one plan for the repeated claim)."""
    async with _connection(dsn) as conn:
        await conn.execute("TRUNCATE cnai.job CASCADE")
        await conn.execute(
            """INSERT INTO cnai.job (asset_id, task)
               SELECT a.id, t.task FROM (SELECT id FROM asset ORDER BY id LIMIT $1) a
               CROSS JOIN unnest('{clip,face}'::text[]) AS t(task)""", unserved // 2)
        await conn.execute(
            """INSERT INTO cnai.job (asset_id, task)
               SELECT id, 'ocr' FROM (SELECT id FROM asset ORDER BY id LIMIT $1) a""", ready)
        await conn.execute("VACUUM ANALYZE cnai.job")
        times = []
        for i in range(claims):
            t0 = time.perf_counter()
            rows = await conn.fetch("SELECT id FROM cnai.claim_jobs('bench', $1, '{ocr}', $2)", batch, LEASE)
            times.append((time.perf_counter() - t0) * 1000)
            if len(rows) != batch:
                raise RuntimeError(f"claim {i} took {len(rows)} of {batch}")
            await conn.execute("SELECT cnai.complete_jobs('bench', $1)", [r[0] for r in rows])
    return statistics.median(times[5:])  # after the plan settled


@contextlib.asynccontextmanager
async def _connection(dsn: str):
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def latency(dsn: str, samples: int) -> dict:
    """Idle listener-like waiter: LISTEN, and on each notification claim. A writer inserts a preview row the way
    Immich does (fires the trigger); we time from just before that INSERT to the claim's answer."""
    listen = await asyncpg.connect(dsn)
    worker = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    await writer.execute("TRUNCATE cnai.job, cnai.job_intake CASCADE; DELETE FROM asset_file")
    assets = [r[0] for r in await writer.fetch("SELECT id FROM asset ORDER BY id LIMIT $1", samples)]
    wake = asyncio.Event()
    await listen.add_listener("cnai_job", lambda *_: wake.set())
    out: list[float] = []
    loop = asyncio.get_running_loop()

    async def waiter():
        while True:
            await wake.wait()
            wake.clear()
            rows = await worker.fetch("SELECT id FROM cnai.claim_jobs('lat', 100, $1, $2)", TASKS, LEASE)
            if rows:
                t = time.perf_counter()
                await worker.execute("SELECT cnai.complete_jobs('lat', $1)", [r[0] for r in rows])
                return t

    for asset in assets:
        await asyncio.sleep(0.02)  # idle between samples
        wake.clear()
        w = loop.create_task(waiter())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await writer.execute(
            """INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)
               ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""",
            asset, f"/bench/{asset}.jpg")
        t1 = await asyncio.wait_for(w, 10)
        out.append((t1 - t0) * 1000)
    for c in (listen, worker, writer):
        await c.close()
    out.sort()
    return {"p50": statistics.median(out), "p99": out[min(len(out) - 1, int(len(out) * 0.99))], "n": len(out)}


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(tempfile.mkdtemp(prefix="cnai-bench-queue-"))
    server = EmbeddedServer(data_dir)
    try:
        dsn = server.dsn()
        await migrate(dsn, standalone=True)
        n_tp = 20_000 if args.quick else 60_000
        n_naive = 4_000 if args.quick else 10_000
        n_backlog = 20_000 if args.quick else 100_000
        unserved_sizes = (1_000, 10_000, 100_000)
        conn = await asyncpg.connect(dsn)
        await make_assets(conn, max(-(-max(n_tp, n_backlog) // len(TASKS)), max(unserved_sizes) // 2))

        results, bare = {}, {}
        for workers in (1, 4, 16):  # cnai's claim + complete, and the bare loop, side by side
            await fill(conn, n_tp)
            results[workers] = await drain(dsn, n_tp, workers, args.batch)
            bare[workers] = await bare_drain(dsn, n_tp, workers, args.batch)
        await fill(conn, n_naive)
        naive = await drain(dsn, n_naive, 4, 1, naive=True)
        await fill(conn, n_backlog)
        backlog = await drain(dsn, n_backlog, 4, args.batch)
        behind = {n: await claim_behind_unserved(dsn, n, ready=2_000, claims=100, batch=16) for n in unserved_sizes}
        lat = await latency(dsn, 100 if args.quick else 300)
        version = await conn.fetchval("SHOW server_version")
        await conn.close()

        print(f"\ncnai queue benchmark — PostgreSQL {version}, no-op task, fsync on, batch {args.batch}")
        print(f"{'workers':>8} {'jobs':>8} {'seconds':>8} {'jobs/s':>9} {'claim p50':>10} {'bare jobs/s':>12} "
              f"{'cnai/bare':>9}")
        for w, r in results.items():
            print(f"{w:>8} {r['jobs']:>8} {r['seconds']:>8.2f} {r['rate']:>9,.0f} {r['claim_p50_ms']:>8.2f}ms "
                  f"{bare[w]['rate']:>12,.0f} {r['rate'] / bare[w]['rate']:>9.2f}")
        print("  (bare: a plain table, one index, claim N FOR UPDATE SKIP LOCKED under a lease, mark done)")
        print(f"{'naive 4':>8} {naive['jobs']:>8} {naive['seconds']:>8.2f} {naive['rate']:>9,.0f} "
              f"{naive['claim_p50_ms']:>8.2f}ms   (one job per transaction, 4 workers)")
        print(f"batched / naive at 4 workers: {results[4]['rate'] / naive['rate']:.1f}x")
        print(f"backlog of {n_backlog:,} jobs, 4 workers: caught up in {backlog['seconds']:.2f} s "
              f"({backlog['rate']:,.0f} jobs/s)")
        first = behind[unserved_sizes[0]]
        print("claim of 16 ocr jobs (CNAI_TASKS=ocr) behind queued jobs nobody serves, median: " + ", ".join(
            f"{n:,}: {ms:.2f} ms ({ms / first:.2f}x)" for n, ms in behind.items()))
        print(f"idle INSERT -> NOTIFY -> claim latency ({lat['n']} samples): p50 {lat['p50']:.2f} ms, "
              f"p99 {lat['p99']:.2f} ms")
        print("\npublished figures (their benchmarks, other hardware; reference/anchors.md §A):")
        for name, fig in PUBLISHED:
            print(f"  {name:16s} {fig}")
    finally:
        server.destroy()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    p.add_argument("--batch", type=int, default=500, help="jobs per claim and per completion")
    asyncio.run(main(p.parse_args()))
