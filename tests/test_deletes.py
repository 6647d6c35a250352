"""Immich's deletes through cnai's tables: every foreign key of cnai's tables is backed by an index, so the
cascade from `DELETE FROM asset` (inside Immich's transaction) looks its rows up instead of scanning."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import make_asset, make_user

# cnai's tables outside schema cnai (the person-facing request table lives where psql finds it)
CNAI_PUBLIC_TABLES = ("reprocess_request",)


async def test_every_foreign_key_of_cnais_tables_is_indexed(db):
    keys = await db.fetch(
        """SELECT c.conname, c.conrelid::regclass::text AS tbl, c.confrelid::regclass::text AS parent,
                  c.conrelid, c.conkey
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE c.contype = 'f' AND (n.nspname = 'cnai' OR (n.nspname = 'public' AND t.relname = ANY ($1)))""",
        list(CNAI_PUBLIC_TABLES))
    # a key of cnai.job, one of reprocess_request, both of request_job, and the result tables'
    assert {k["tbl"] for k in keys} >= {"cnai.job", "reprocess_request", "cnai.request_job", "cnai.ocr",
                                        "cnai.clip", "cnai.face"}
    # plain (non-partial) indexes, by the columns they start with
    indexes = await db.fetch("SELECT indrelid, indkey::int2[] AS columns, indexrelid::regclass::text AS name "
                             "FROM pg_index WHERE indpred IS NULL AND indisvalid")
    unindexed = []
    for key in keys:
        width = len(key["conkey"])
        if not any(i["indrelid"] == key["conrelid"] and sorted(i["columns"][:width]) == sorted(key["conkey"])
                   for i in indexes):
            unindexed.append(f"{key['tbl']} ({key['conname']} -> {key['parent']})")
    assert not unindexed, f"foreign keys without an index on their columns: {unindexed}"


async def test_deleting_an_asset_takes_its_cnai_rows_and_keeps_the_others(db):
    owner = await make_user(db)
    gone = await make_asset(db, owner, Path("/photos/gone.jpg"))
    kept = await make_asset(db, owner, Path("/photos/kept.jpg"))
    for asset in (gone, kept):
        await db.execute("INSERT INTO cnai.job (asset_id, task, state, finished_at) "
                         "SELECT $1, t, 'done', now() FROM unnest(ARRAY['clip', 'face', 'ocr']) t", asset)
        await db.execute("INSERT INTO reprocess_request (asset_id) VALUES ($1)", asset)
        await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, 'x', '[]', 't')", asset)
    await db.execute("DELETE FROM asset WHERE id = $1", gone)
    for table in ("cnai.job", "reprocess_request", "cnai.ocr"):
        left = {r[0] for r in await db.fetch(f"SELECT DISTINCT asset_id FROM {table}")}
        assert left == {kept}, table
    indexed = len(await db.fetchval("SELECT cnai.indexed_tasks()"))  # a request naming no task runs these
    assert await db.fetchval("SELECT count(*) FROM cnai.request_job rj JOIN cnai.job j ON j.id = rj.job_id "
                             "WHERE j.asset_id = $1", kept) == indexed
    assert await db.fetchval("SELECT count(*) FROM cnai.request_job") == indexed
