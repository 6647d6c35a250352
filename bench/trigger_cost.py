"""What our triggers cost Immich's hot path: preview/thumbnail rows, and its ML results, written with and without
them, same run.

    python bench/trigger_cost.py [--assets 10000] [--ml-assets 2000]

Immich writes an asset's generated files with one statement per asset:
    INSERT INTO asset_file ("assetId", type, path) VALUES (preview), (thumbnail)
    ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path
each in its own transaction (autocommit, fsync on). The same statements go, interleaved one by one so that
drift and a busy machine hit both sides alike, to Immich's asset_file (our triggers on it) and to an identical
copy in another schema (same columns, indexes, constraints and foreign key; no triggers), on the same server in
the same run: N fresh assets each, then 100-row statements (50 assets per statement), then the re-write of
existing rows (conflict path, path unchanged). A listener in another process is LISTENing throughout, as in
production, so NOTIFY's delivery is paid too. Prints per-statement times and the ratios (target: <= 1.2 for
the per-asset statement).

Then Immich's ML results, which the triggers that follow Immich's reprocess buttons watch
(sql/triggers/code/130_immich_reruns.sql), written as Immich's jobs write them, one asset per statement
(tests/fixtures/immich/reprocess.json): smart_search upserts and asset_job_status upserts, both when cnai has
the result already (the upload flow, "Missing": the trigger only looks) and as re-runs ("All": each statement
queues a cnai job), against identical trigger-free copies of those tables.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from cnai.db import migrate
from cnai.embedded import EmbeddedServer

PLAIN_SCHEMA = "cnai_bench_plain"
# {table} is Immich's table (our triggers on it) or its trigger-free copy in PLAIN_SCHEMA
UPSERT = """INSERT INTO {table} ("assetId", type, path)
            SELECT a, t, '/usr/src/app/upload/thumbs/' || a || '_' || t || '.jpeg'
              FROM unnest($1::uuid[]) a CROSS JOIN unnest(ARRAY['preview', 'thumbnail']) t
            ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path"""
SMART_SEARCH = """INSERT INTO {table} ("assetId", embedding) SELECT a, $2::vector FROM unnest($1::uuid[]) a
                  ON CONFLICT ("assetId") DO UPDATE SET embedding = excluded.embedding"""
JOB_STATUS = """INSERT INTO {table} ("assetId", "{column}") SELECT a, clock_timestamp() FROM unnest($1::uuid[]) a
                ON CONFLICT ("assetId") DO UPDATE SET "{column}" = excluded."{column}" """
OCR_AT = JOB_STATUS.replace("{column}", "ocrAt")
METADATA_AT = JOB_STATUS.replace("{column}", "metadataExtractedAt")
VECTOR = "[" + ",".join(["0.03"] * 512) + "]"


async def make_assets(conn, n: int) -> list:
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('bench@trigger') ON CONFLICT (email)
                                   DO UPDATE SET name = '' RETURNING id""")
    rows = await conn.fetch(
        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
           SELECT $1, '/bench/' || g || '.jpg', g || '.jpg', sha256(convert_to(g::text || random()::text, 'UTF8'))
             FROM generate_series(1, $2) g RETURNING id""", owner, n)
    await conn.execute("ANALYZE asset")
    return [r[0] for r in rows]


LISTENER = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.add_listener("cnai_job", lambda *a: None)
    print("listening", flush=True)
    await asyncio.sleep(1e9)
asyncio.run(main())
"""


async def make_plain_copies(conn) -> None:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {PLAIN_SCHEMA}")
    for table in ("asset_file", "smart_search", "asset_job_status"):
        await conn.execute(f"""
            CREATE TABLE IF NOT EXISTS {PLAIN_SCHEMA}.{table} (LIKE public.{table} INCLUDING ALL);
            ALTER TABLE {PLAIN_SCHEMA}.{table} ADD FOREIGN KEY ("assetId") REFERENCES asset(id) ON DELETE CASCADE""")


async def compare(conn, with_assets: list, without_assets: list, per_statement: int, template: str = UPSERT,
                  table: str = "asset_file", *extra) -> dict:
    """Statement i goes to Immich's table (with our triggers), then to the plain copy; returns per-statement
    microseconds on each side and the ratio."""
    with_stmt = await conn.prepare(template.format(table=f"public.{table}"))
    plain_stmt = await conn.prepare(template.format(table=f"{PLAIN_SCHEMA}.{table}"))
    t_with = t_without = 0.0
    n = 0
    for i in range(0, min(len(with_assets), len(without_assets)), per_statement):
        a, b = with_assets[i:i + per_statement], without_assets[i:i + per_statement]
        first, second = ((with_stmt, a), (plain_stmt, b)) if n % 2 == 0 else ((plain_stmt, b), (with_stmt, a))
        t0 = time.perf_counter()
        await first[0].fetch(first[1], *extra)
        t1 = time.perf_counter()
        await second[0].fetch(second[1], *extra)
        t2 = time.perf_counter()
        if first[0] is with_stmt:
            t_with += t1 - t0
            t_without += t2 - t1
        else:
            t_without += t1 - t0
            t_with += t2 - t1
        n += 1
    return {"with_us": t_with / n * 1e6, "without_us": t_without / n * 1e6, "ratio": t_with / t_without,
            "statements": n}


async def immich_ml_results(conn, n: int) -> list[tuple[str, dict, int]]:
    """Immich's ML result writes for n fresh assets a side, one asset per statement, in the order an upload and
    then the "All" buttons write them; (label, comparison, cnai jobs queued by that step) each."""
    with_assets, without_assets = await make_assets(conn, n), await make_assets(conn, n)
    # cnai has run every task on these photos already (its listener is quicker than Immich's ML after an upload)
    await conn.execute("""INSERT INTO cnai.task_run (asset_id, task, model)
                          SELECT a, t, 'bench' FROM unnest($1::uuid[]) a, unnest(cnai.all_tasks()) t""", with_assets)
    steps = []

    async def step(label: str, template: str, table: str, *extra) -> None:
        before = await conn.fetchval("SELECT count(*) FROM cnai.job")
        result = await compare(conn, with_assets, without_assets, 1, template, table, *extra)
        steps.append((label, result, await conn.fetchval("SELECT count(*) FROM cnai.job") - before))

    await step("job_status metadataExtractedAt (new row)", METADATA_AT, "asset_job_status")
    await step("job_status ocrAt, first run (upload)", OCR_AT, "asset_job_status")
    await step("smart_search, first run (upload)", SMART_SEARCH, "smart_search", VECTOR)
    await step("job_status ocrAt, re-run (OCR All)", OCR_AT, "asset_job_status")
    # Smart Search All: the table emptied first (here: these rows, and the wipe recorded), then each asset again
    for schema in ("public", PLAIN_SCHEMA):
        await conn.execute(f'DELETE FROM {schema}.smart_search WHERE "assetId" = ANY($1::uuid[])',
                           with_assets + without_assets)
    await conn.execute("""INSERT INTO cnai.immich_wipe (task, wiped_at) VALUES ('clip', now())
                          ON CONFLICT (task) DO UPDATE SET wiped_at = excluded.wiped_at""")
    await step("smart_search, re-run (Smart Search All)", SMART_SEARCH, "smart_search", VECTOR)
    return steps


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(tempfile.mkdtemp(prefix="cnai-bench-trigger-"))
    server = EmbeddedServer(data_dir)
    try:
        dsn = server.dsn()
        await migrate(dsn, standalone=True)
        conn = await asyncpg.connect(dsn)
        await make_plain_copies(conn)
        listener = subprocess.Popen([sys.executable, "-c", LISTENER, dsn], stdout=subprocess.PIPE)
        listener.stdout.readline()
        n = args.assets
        try:
            warm = await make_assets(conn, 1000)
            await compare(conn, warm[:500], warm[500:], 1)  # plans, caches
            single_with, single_without = await make_assets(conn, n), await make_assets(conn, n)
            jobs_before = await conn.fetchval("SELECT sum(queued) FROM cnai.queue_depth()")
            single = await compare(conn, single_with, single_without, 1)
            jobs_single = await conn.fetchval("SELECT sum(queued) FROM cnai.queue_depth()") - jobs_before
            multi_with, multi_without = await make_assets(conn, n), await make_assets(conn, n)
            multi = await compare(conn, multi_with, multi_without, 50)
            # Immich regenerating previews: the same rows again (conflict -> update, path unchanged)
            rewrite = await compare(conn, single_with, single_without, 1)
            await immich_ml_results(conn, 200)  # plans, caches
            ml = await immich_ml_results(conn, args.ml_assets)
        finally:
            listener.kill()
            listener.wait()
        version = await conn.fetchval("SHOW server_version")
        await conn.close()

        print(f"\ncnai trigger cost on asset_file — PostgreSQL {version}, autocommit, fsync on, a listener LISTENing")
        print(f"{'statement':44s} {'without':>10s} {'with':>10s} {'ratio':>7s}")
        for label, r in ((f"1 asset (preview+thumbnail), {n:,} assets", single),
                         (f"50 assets = 100 rows, {n:,} assets", multi),
                         ("1 asset, re-write (conflict, same path)", rewrite)):
            print(f"{label:44s} {r['without_us']:>8.0f}us {r['with_us']:>8.0f}us {r['ratio']:>7.3f}")
        print(f"{jobs_single:,} jobs queued for {n:,} assets (3 tasks each), one NOTIFY per statement")
        verdict = "ok" if single["ratio"] <= 1.2 else "OVER the 1.2 target"
        print(f"per-asset statement ratio {single['ratio']:.3f}: {verdict}")

        print(f"\nImmich's ML results (triggers following its reprocess buttons), 1 asset per statement, "
              f"{args.ml_assets:,} assets")
        print(f"{'statement':44s} {'without':>10s} {'with':>10s} {'ratio':>7s} {'jobs':>7s}")
        for label, r, jobs in ml:
            print(f"{label:44s} {r['without_us']:>8.0f}us {r['with_us']:>8.0f}us {r['ratio']:>7.3f} {jobs:>7,}")
    finally:
        server.destroy()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", type=int, default=10_000, help="assets written with the triggers (and as many without)")
    p.add_argument("--ml-assets", type=int, default=2_000,
                   help="assets whose ML results are written with the triggers (and as many without)")
    asyncio.run(main(p.parse_args()))
