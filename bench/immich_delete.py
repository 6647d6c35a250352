"""What cnai costs Immich when it empties the trash: asset deletes with and without cnai installed, same run.

    python bench/immich_delete.py [--assets 10000] [--delete 500] [--jobs-per-asset 6]

Immich's AssetDelete job (one per trashed asset, `asset.service.ts` handleAssetDeletion -> AssetRepository.remove)
runs `DELETE FROM asset WHERE id = $1`, one statement per asset in its own transaction. Every foreign key that
cascades from asset runs inside that statement: Immich's own (asset_file, smart_search, asset_face, asset_ocr, ...)
and, with cnai installed, cnai's (cnai.job with its history, cnai.ocr, cnai.clip, cnai.face, reprocess_request).

Three databases on one embedded server hold the same Immich data (assets, exif, preview and thumbnail rows, CLIP
embeddings, faces, OCR lines; the other tables that reference asset and the delete-audit trigger, as in Immich
3.1): `plain` has no cnai; `cnai` has cnai migrated, its results for every asset and a job history
(`--jobs-per-asset` finished jobs per asset; by default 6, each task run twice within the listener's 7-day prune
window: 60k jobs in all); `cnai_unindexed` is the same without the job_asset index (the state before
sql/queue/schema/101), to show what that index is for. The deletes go interleaved one by one, the order rotating,
so drift and a busy machine hit every side alike. Prints the time of all deletes and of the median delete per
database, and their ratios to `plain` (target: cnai <= 1.2; on a busy machine read the median, as a stray pause
can land in any database's total).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

import sql as sql_files
from cnai.db import migrate
from cnai.embedded import EmbeddedServer

DELETE = "DELETE FROM asset WHERE id = $1"

# Immich 3.1 tables that reference asset and that cnai's minimal standalone schema leaves out, and the audit
# trigger every asset delete fires (server/src/schema/tables/*.table.ts, functions.ts asset_delete_audit): Immich
# pays their cascades in every delete, so the baseline pays them too. Each has an index on its asset column.
IMMICH_EXTRAS = """
CREATE TABLE asset_exif ("assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE, make text, model text,
                         "exifImageWidth" integer, "exifImageHeight" integer, "fileSizeInByte" bigint);
CREATE TABLE album_asset ("albumId" uuid, "assetId" uuid REFERENCES asset(id) ON DELETE CASCADE,
                          PRIMARY KEY ("albumId", "assetId"));
CREATE INDEX ON album_asset ("assetId");
CREATE TABLE tag_asset ("assetId" uuid REFERENCES asset(id) ON DELETE CASCADE, "tagId" uuid,
                        PRIMARY KEY ("assetId", "tagId"));
CREATE TABLE shared_link_asset ("assetId" uuid REFERENCES asset(id) ON DELETE CASCADE, "sharedLinkId" uuid,
                                PRIMARY KEY ("assetId", "sharedLinkId"));
CREATE TABLE memory_asset ("memoriesId" uuid, "assetId" uuid REFERENCES asset(id) ON DELETE CASCADE,
                           PRIMARY KEY ("memoriesId", "assetId"));
CREATE INDEX ON memory_asset ("assetId");
CREATE TABLE asset_metadata ("assetId" uuid REFERENCES asset(id) ON DELETE CASCADE, key varchar, value jsonb,
                             PRIMARY KEY ("assetId", key));
CREATE TABLE asset_edit (id uuid PRIMARY KEY, "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE);
CREATE INDEX ON asset_edit ("assetId");
CREATE TABLE activity (id uuid PRIMARY KEY, "assetId" uuid REFERENCES asset(id) ON DELETE CASCADE);
CREATE INDEX ON activity ("assetId");
CREATE TABLE asset_audit (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "assetId" uuid NOT NULL,
                          "ownerId" uuid NOT NULL, "deletedAt" timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX ON asset_audit ("assetId");
CREATE INDEX ON asset_audit ("ownerId");
CREATE INDEX ON asset_audit ("deletedAt");
CREATE FUNCTION asset_delete_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO asset_audit ("assetId", "ownerId") SELECT "id", "ownerId" FROM old;
  RETURN NULL;
END $$;
CREATE TRIGGER asset_delete_audit AFTER DELETE ON asset REFERENCING OLD TABLE AS old
  FOR EACH STATEMENT WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION asset_delete_audit();
"""


def random_vector(row_column: str) -> str:
    """A random 512-d vector per row (the reference to a column of the row keeps it from being computed once)."""
    return f"ARRAY(SELECT random() FROM generate_series(1, 512) WHERE {row_column} IS NOT NULL)::vector(512)"


async def load_immich_data(conn, asset_ids: list) -> None:
    """Immich's side of a library: what its own upload and ML jobs leave per asset."""
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('bench@delete') RETURNING id""")
    await conn.execute(
        """INSERT INTO asset (id, "ownerId", "originalPath", "originalFileName", checksum)
           SELECT a, $2, '/usr/src/app/upload/' || a || '.jpg', a || '.jpg', uuid_send(a)
             FROM unnest($1::uuid[]) a""", asset_ids, owner)
    await conn.execute(
        """INSERT INTO asset_file ("assetId", type, path)
           SELECT a, t, '/usr/src/app/upload/thumbs/' || a || '_' || t || '.jpeg'
             FROM unnest($1::uuid[]) a CROSS JOIN unnest(ARRAY['preview', 'thumbnail']) t""", asset_ids)
    await conn.execute("""INSERT INTO asset_exif ("assetId", make, model, "exifImageWidth", "exifImageHeight")
                          SELECT a, 'Apple', 'iPhone', 4032, 3024 FROM unnest($1::uuid[]) a""", asset_ids)
    await conn.execute("""INSERT INTO asset_job_status ("assetId", "facesRecognizedAt", "ocrAt")
                          SELECT a, now(), now() FROM unnest($1::uuid[]) a""", asset_ids)
    await conn.execute(f"""INSERT INTO smart_search ("assetId", embedding)
                           SELECT a, {random_vector('a')} FROM unnest($1::uuid[]) a""",
                       asset_ids)
    await conn.execute(f"""
        WITH faces AS (
          INSERT INTO asset_face ("assetId", "imageWidth", "imageHeight", "boundingBoxX2", "boundingBoxY2")
          SELECT a, 1440, 1080, 100, 100 FROM unnest($1::uuid[]) a CROSS JOIN generate_series(1, 2)
          RETURNING id)
        INSERT INTO face_search ("faceId", embedding)
        SELECT id, {random_vector('id')} FROM faces""", asset_ids)
    await conn.execute(
        """INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text)
           SELECT a, 0, 0, 1, 0, 1, 1, 0, 1, 0.9, 0.9, '增值税发票 ' || n
             FROM unnest($1::uuid[]) a CROSS JOIN generate_series(1, 3) n""", asset_ids)
    await conn.execute("""INSERT INTO ocr_search ("assetId", text)
                          SELECT a, '增值 值税 税发 发票' FROM unnest($1::uuid[]) a""", asset_ids)


async def load_cnai_data(conn, asset_ids: list, jobs_per_asset: int) -> None:
    """cnai's side: results for every asset, a finished job history, a few reprocess requests."""
    await conn.execute("TRUNCATE cnai.job_intake")  # what the asset_file rows above enqueued
    await conn.execute("""INSERT INTO cnai.ocr (asset_id, text, lines, model)
                          SELECT a, '增值税发票', '[]', 'bench' FROM unnest($1::uuid[]) a""", asset_ids)
    await conn.execute(f"""INSERT INTO cnai.clip (asset_id, model, embedding)
                           SELECT a, 'bench', {random_vector('a')} FROM unnest($1::uuid[]) a""",
                       asset_ids)
    await conn.execute(f"""
        INSERT INTO cnai.face (asset_id, x1, y1, x2, y2, score, embedding, image_width, image_height, model)
        SELECT a, 0, 0, 100, 100, 0.9, {random_vector('g')}, 1440, 1080, 'bench'
          FROM unnest($1::uuid[]) a CROSS JOIN generate_series(1, 2) g""", asset_ids)
    # finished jobs in every task, written round after round (uploads, backfills, reprocess requests), so an
    # asset's jobs lie on different pages, as they do in a library that has run for a while
    await conn.execute(
        """INSERT INTO cnai.job (asset_id, task, state, attempts, created_at, started_at, finished_at)
           SELECT a, (ARRAY['clip', 'face', 'ocr'])[1 + n % 3], 'done', 1, now() - n * interval '1 hour',
                  now() - n * interval '1 hour', now() - n * interval '1 hour'
             FROM generate_series(1, $2) n CROSS JOIN unnest($1::uuid[]) a""", asset_ids, jobs_per_asset)
    await conn.execute(
        """WITH r AS (INSERT INTO reprocess_request (asset_id)
                      SELECT a FROM unnest($1::uuid[]) a LIMIT 50 RETURNING id, asset_id)
           UPDATE reprocess_request q SET status = 'done', finished_at = now() FROM r WHERE q.id = r.id""",
        asset_ids)
    await conn.execute("UPDATE cnai.job SET state = 'done', finished_at = now() WHERE state = 'queued'")


async def prepare(server: EmbeddedServer, name: str, asset_ids: list, args) -> asyncpg.Connection:
    admin = await asyncpg.connect(server.dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    dsn = server.dsn(name)
    if name == "plain":  # Immich's schema alone (the standalone schema cnai creates where there is no Immich)
        conn = await asyncpg.connect(dsn)
        for m in sql_files.migrations(include_standalone=True):
            if m.id.startswith(sql_files.STANDALONE_PART + "/"):
                await conn.execute(m.sql())
    else:
        await migrate(dsn, standalone=True)
        conn = await asyncpg.connect(dsn)
    await conn.execute(IMMICH_EXTRAS)
    # vector indexes are built once after the load (as a restore would): row-by-row HNSW inserts take minutes
    hnsw = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "WHERE am.amname = 'hnsw'")
    for index in hnsw:
        await conn.execute(f"DROP INDEX {index['name']}")
    await load_immich_data(conn, asset_ids)
    if name != "plain":
        await load_cnai_data(conn, asset_ids, args.jobs_per_asset)
    for index in hnsw:
        await conn.execute(index["definition"])
    if name == "cnai_unindexed":
        await conn.execute("DROP INDEX cnai.job_asset")
    await conn.execute("VACUUM ANALYZE")
    return conn


async def delete_interleaved(conns: dict[str, asyncpg.Connection], ids: list) -> dict[str, list[float]]:
    """Delete each asset from every database in turn, the order rotating; each delete's seconds per database."""
    stmts = {name: await conn.prepare(DELETE) for name, conn in conns.items()}
    names = list(conns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, asset_id in enumerate(ids):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            await stmts[name].fetch(asset_id)
            times[name].append(time.perf_counter() - t0)
    return times


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    if args.delete + 20 > args.assets:
        raise SystemExit("--delete must leave at least 20 assets (used to warm up)")
    server = EmbeddedServer(Path(tempfile.mkdtemp(prefix="cnai-bench-delete-")))
    try:
        asset_ids = [uuid.uuid4() for _ in range(args.assets)]
        conns = {name: await prepare(server, name, asset_ids, args) for name in ("plain", "cnai", "cnai_unindexed")}
        jobs = await conns["cnai"].fetchval("SELECT count(*) FROM cnai.job")
        version = await conns["plain"].fetchval("SHOW server_version")
        fsync = await conns["plain"].fetchval("SHOW fsync")
        await delete_interleaved(conns, asset_ids[-20:])  # plans and caches
        times = await delete_interleaved(conns, asset_ids[:args.delete])
        left = {name: await conn.fetchval("SELECT count(*) FROM asset") for name, conn in conns.items()}
        assert len(set(left.values())) == 1, left
        for conn in conns.values():
            await conn.close()

        n = args.delete
        total = {name: sum(t) for name, t in times.items()}
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nImmich emptying the trash: {n} x `{DELETE}`, autocommit — PostgreSQL {version}, fsync {fsync}")
        print(f"{args.assets:,} assets with previews, thumbnails, CLIP embeddings, 2 faces, 3 OCR lines each; "
              f"cnai: results for every asset and {jobs:,} finished jobs ({args.jobs_per_asset} per asset)")
        print(f"{'database':16s} {'total':>9s} {'vs plain':>9s} {'median':>10s} {'vs plain':>9s}")
        for name in conns:
            print(f"{name:16s} {total[name]:>8.3f}s {total[name] / total['plain']:>8.2f}x "
                  f"{median[name] * 1e3:>8.3f}ms {median[name] / median['plain']:>8.2f}x")
        ratio = median["cnai"] / median["plain"]
        print(f"cnai installed / plain Immich, median delete: {ratio:.2f}x "
              f"({'ok' if ratio <= 1.2 else 'OVER the 1.2 target'}); without the job_asset index: "
              f"{median['cnai_unindexed'] / median['plain']:.1f}x")
    finally:
        server.destroy()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", type=int, default=10_000, help="assets in each database")
    p.add_argument("--delete", type=int, default=500, help="assets deleted (timed)")
    p.add_argument("--jobs-per-asset", type=int, default=6, help="finished cnai jobs per asset")
    asyncio.run(main(p.parse_args()))
