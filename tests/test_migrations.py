"""Migrations on a database of its own: code files re-applied when they change, schema files append-only, and the
triggers working for a writer role that has no privilege on cnai's schema (as Immich's own role has none)."""
from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from urllib.parse import urlsplit
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

import sql as sql_files
from cnai.db import migrate


@pytest_asyncio.fixture
async def fresh_dsn(pg_server):
    """A new, empty database on the session's server; dropped afterwards."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_server.dsn("postgres"))
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.dsn(name)
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
def sql_copy(tmp_path) -> Path:
    root = tmp_path / "sql"
    shutil.copytree(sql_files.ROOT, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return root


async def test_a_changed_code_file_is_reapplied_and_a_changed_schema_file_is_not(fresh_dsn, sql_copy, caplog):
    first = await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    assert first == [m.id for m in sql_files.migrations(include_standalone=True)]
    assert await migrate(fresh_dsn, standalone=True, sql_root=sql_copy) == []  # nothing changed

    ops = sql_copy / "queue" / "code" / "110_queue_ops.sql"
    ops.write_text(ops.read_text().replace("RETURN ARRAY['clip', 'face', 'ocr'];",
                                           "RETURN ARRAY['clip', 'face', 'ocr', 'upgraded'];"))
    tables = sql_copy / "queue" / "schema" / "100_queue_tables.sql"
    tables.write_text(tables.read_text() + "\nCREATE TABLE cnai.must_not_appear (id int);\n")
    with caplog.at_level(logging.WARNING, logger="cnai.db"):
        again = await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    assert again == ["queue/code/110_queue_ops.sql"]
    assert "queue/schema/100_queue_tables.sql changed after it was applied" in caplog.text

    conn = await asyncpg.connect(fresh_dsn)
    try:
        assert await conn.fetchval("SELECT cnai.all_tasks()") == ["clip", "face", "ocr", "upgraded"]
        assert await conn.fetchval("SELECT to_regclass('cnai.must_not_appear')") is None
        checksum = await conn.fetchval("SELECT checksum FROM cnai.migration WHERE id = 'queue/code/110_queue_ops.sql'")
    finally:
        await conn.close()
    assert checksum == sql_files.Migration("x", ops, sql_files.CODE).checksum()


async def test_triggers_enqueue_for_a_writer_without_privileges_on_cnai(fresh_dsn):
    await migrate(fresh_dsn, standalone=True)
    role = f"immich_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(fresh_dsn)
    try:
        # the writer may do what Immich's role does to its own tables, and nothing on schema cnai
        await admin.execute(f"""
            CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD 'writer';
            GRANT USAGE ON SCHEMA public TO {role};
            GRANT SELECT, INSERT, UPDATE, DELETE ON public."user", public.asset, public.asset_file TO {role};""")
        url = urlsplit(fresh_dsn)
        writer = await asyncpg.connect(url._replace(netloc=f"{role}:writer@{url.hostname}:{url.port}").geturl())
        try:
            assert not await writer.fetchval("SELECT has_schema_privilege('cnai', 'USAGE')")
            owner = await writer.fetchval("""INSERT INTO "user" (email) VALUES ('w@test') RETURNING id""")
            asset = await writer.fetchval(
                """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                   VALUES ($1, '/a.jpg', 'a.jpg', '\\x01') RETURNING id""", owner)
            # Immich's upsert, twice: the insert, then the same path written again (the UPDATE half)
            for _ in range(2):
                await writer.execute(
                    """INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', '/p.jpg')
                       ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""", asset)
        finally:
            await writer.close()
        assert await admin.fetchval("SELECT count(*) FROM cnai.job_intake WHERE asset_id = $1", asset) == 2
        assert await admin.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'failed'") == 0
    finally:
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()


async def test_search_upgrade_leaves_one_cnai_search(fresh_dsn, sql_copy):
    """A database with the earlier cnai.search (eight parameters) and helpers gets the current ones in their place:
    one candidate per call, so existing callers' calls stay unambiguous."""
    await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await conn.execute("""
            DROP FUNCTION cnai.search(text, vector, uuid[], integer, integer, float8, float8, integer, text[], uuid,
                                      text);
            DROP FUNCTION cnai.search_ocr(text, uuid[], integer, text[], uuid);
            DROP FUNCTION cnai.search_clip(vector, uuid[], integer, text[], uuid, text);
            CREATE FUNCTION cnai.search_ocr(q_text text, owner_ids uuid[], lim integer)
              RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer) LANGUAGE sql AS 'SELECT NULL::uuid, 0, 0';
            CREATE FUNCTION cnai.search_clip(query_embedding vector, owner_ids uuid[], lim integer)
              RETURNS TABLE (asset_id uuid, distance float8, clip_rank integer) LANGUAGE sql
              AS 'SELECT NULL::uuid, 0, 0';
            CREATE FUNCTION cnai.search(query text, query_embedding vector DEFAULT NULL, owner_ids uuid[] DEFAULT NULL,
                                        lim integer DEFAULT 100, offset_ integer DEFAULT 0,
                                        ocr_weight float8 DEFAULT 1.0, clip_weight float8 DEFAULT 1.0,
                                        rrf_k integer DEFAULT 60)
              RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer, clip_rank integer) LANGUAGE sql
              AS 'SELECT NULL::uuid, 0, 0, 0'""")
        await conn.execute("UPDATE cnai.migration SET checksum = 'earlier' WHERE id = 'search/code/210_search.sql'")
        assert await migrate(fresh_dsn, standalone=True, sql_root=sql_copy) == ["search/code/210_search.sql"]
        for name in ("search", "search_ocr", "search_clip"):
            assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = $1 AND pronamespace = "
                                       "'cnai'::regnamespace", name) == 1, name
        owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('u@test') RETURNING id""")
        assert await conn.fetch("SELECT * FROM cnai.search('ocr:发票', NULL, $1, 10, 0)", [owner]) == []
    finally:
        await conn.close()


@pytest.fixture
def server_readable_dir():
    path = Path(tempfile.mkdtemp(prefix="cnai-test-ext-"))
    path.chmod(0o755)  # the server runs as its own user
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_listed_zhparser_that_cannot_load_does_not_stop_the_migration(fresh_dsn, server_readable_dir):
    """A zhparser that the server lists but whose library cannot load (built for another server, a missing
    dependency): the migration goes on with the built-in tokenizer. A stand-in extension pointing at a missing
    library, found through PostgreSQL 18's extension_control_path."""
    root = server_readable_dir
    (root / "extension").mkdir(mode=0o755)
    (root / "extension" / "zhparser.control").write_text(
        "default_version = '2.4'\nmodule_pathname = '$libdir/zhparser_missing'\nrelocatable = true\n")
    (root / "extension" / "zhparser--2.4.sql").write_text(
        "CREATE FUNCTION zhprs_start(internal, integer) RETURNS internal AS 'MODULE_PATHNAME' LANGUAGE C STRICT;\n")
    with_zhparser = f"{fresh_dsn}?extension_control_path=$system:{root}"
    conn = await asyncpg.connect(with_zhparser)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'zhparser'") == 1
    finally:
        await conn.close()
    await migrate(with_zhparser, standalone=True)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'zhparser'") == 0
        assert await conn.fetchval("SELECT cnai.zh_tsvector('发票') @@ cnai.zh_tsquery('发票')")
    finally:
        await conn.close()


async def one_photo(conn) -> tuple:
    """(owner, asset): a user with one photo."""
    owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ('a@test') RETURNING id""")
    asset = await conn.fetchval("""INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
                                   VALUES ($1, '/p.jpg', 'p.jpg', '\\x01') RETURNING id""", owner)
    return owner, asset


async def test_upgrade_retokenizes_ocr_rows_written_before_folding(fresh_dsn, sql_copy):
    """Rows indexed by the tokenizer before it folded Traditional to Simplified keep stale stored tokens until
    202_retokenize rewrites them: after the upgrade a Simplified query finds a Traditional sign indexed before."""
    await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        owner, asset = await one_photo(conn)
        # as the earlier tokenizer indexed it: no folding
        await conn.execute("""ALTER FUNCTION cnai.zh_fold(text) RENAME TO zh_fold_now;
                              CREATE FUNCTION cnai.zh_fold(t text) RETURNS text LANGUAGE sql IMMUTABLE
                                RETURN lower(coalesce(t, ''))""")
        await conn.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '統一發票', '[]', 'm')",
                           asset)
        await conn.execute("""DROP FUNCTION cnai.zh_fold(text); ALTER FUNCTION cnai.zh_fold_now(text) RENAME TO zh_fold;
                              DELETE FROM cnai.migration WHERE id = 'results/schema/202_retokenize.sql'""")
        assert await conn.fetch("SELECT * FROM cnai.search('ocr:发票', NULL, $1)", [owner]) == []
        assert await migrate(fresh_dsn, standalone=True, sql_root=sql_copy) == ["results/schema/202_retokenize.sql"]
        assert [r["asset_id"] for r in await conn.fetch("SELECT * FROM cnai.search('ocr:发票', NULL, $1)", [owner])] \
            == [asset]
    finally:
        await conn.close()


async def test_upgrade_gives_ocr_rows_written_before_their_owner(fresh_dsn, sql_copy):
    """OCR rows written before cnai.ocr held its photo's owner get it on upgrade (204_ocr_owner), and the search,
    which reaches a user's rows through it, finds them."""
    added = ["results/schema/204_ocr_owner.sql", "results/code/222_ocr_owner.sql"]
    texts = {name: (sql_copy / name).read_text() for name in added}
    for name in added:
        (sql_copy / name).unlink()
    await migrate(fresh_dsn, standalone=True, sql_root=sql_copy)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        owner, asset = await one_photo(conn)
        await conn.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '发票', '[]', 'm')", asset)
        for name, text in texts.items():
            (sql_copy / name).write_text(text)
        assert await migrate(fresh_dsn, standalone=True, sql_root=sql_copy) == added
        assert await conn.fetchval("SELECT owner_id FROM cnai.ocr WHERE asset_id = $1", asset) == owner
        assert [r["asset_id"] for r in await conn.fetch("SELECT * FROM cnai.search('ocr:发票', NULL, $1)", [owner])] \
            == [asset]
    finally:
        await conn.close()
