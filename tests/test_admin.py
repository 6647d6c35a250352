"""cnai/admin.py: the administrator's queries, on a real PostgreSQL. The doctor's trigger checks each run on a
database of their own, since they break cnai's triggers and functions on purpose."""
from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import asyncpg
import pytest_asyncio

from cnai import admin
from cnai.db import migrate
from cnai.settings import Settings
from listener.task_names import DEFAULT_TASKS, TASKS
from tests.conftest import make_asset, make_user


@contextlib.asynccontextmanager
async def fresh_database(pg_server, migrate_options: str = ""):
    """A new database on the test server with cnai migrated (standalone schema); dropped afterwards.
    migrate_options: the migration's connection parameters (`?extension_control_path=…`)."""
    name = f"cnai_{uuid.uuid4().hex[:12]}"
    server = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        await server.execute(f"CREATE DATABASE {name}")
        dsn = pg_server.dsn(name)
        await migrate(dsn + migrate_options, standalone=True)
        yield dsn
    finally:
        await server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await server.close()


@pytest_asyncio.fixture
async def own_dsn(pg_server):
    async with fresh_database(pg_server) as dsn:
        yield dsn


@pytest_asyncio.fixture
async def own_db(own_dsn):
    conn = await asyncpg.connect(own_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_python_and_sql_name_the_same_tasks(db, monkeypatch):
    assert sorted(TASKS) == await db.fetchval("SELECT cnai.all_tasks()")
    check = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                              "WHERE conrelid = 'cnai.job'::regclass AND conname = 'job_task_check'")
    assert all(f"'{t}'" in check for t in TASKS)
    check = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                              "WHERE conrelid = 'cnai.indexed_task'::regclass AND contype = 'c'")
    assert all(f"'{t}'" in check for t in TASKS)
    monkeypatch.delenv("CNAI_TASKS", raising=False)
    # a listener's default leaves face out: cnai.face is read by nothing
    assert Settings().tasks == list(DEFAULT_TASKS) == ["clip", "ocr"]


async def test_search_without_users_is_every_users_and_with_users_only_theirs(db):
    alice, bob = await make_user(db, "alice@test"), await make_user(db, "bob@test")
    for owner, name in ((alice, "a"), (bob, "b")):
        asset = await make_asset(db, owner, Path(f"/photos/{name}.jpg"), with_preview=False)
        await db.execute("INSERT INTO cnai.ocr (asset_id, text, lines, model) VALUES ($1, '发票', '[]', 't')", asset)
    assert {r["path"] for r in await admin.search(db, "ocr:发票", None, None, 10)} == {"/photos/a.jpg",
                                                                                      "/photos/b.jpg"}
    owners = await admin.user_ids(db, ["bob@test"])
    assert [r["path"] for r in await admin.search(db, "ocr:发票", None, owners, 10)] == ["/photos/b.jpg"]
    try:
        await admin.user_ids(db, ["bob@test", "carol@test"])
    except LookupError as e:
        assert "carol@test" in str(e) and "bob@test" not in str(e)
    else:
        raise AssertionError("an unknown user must be an error")


async def problems(conn) -> list[admin.Finding]:
    return [f for f in await admin.check_database(conn) if not f.ok]


async def test_doctor_passes_on_a_migrated_database_and_tries_the_enqueue(own_db):
    findings = await admin.check_database(own_db)
    assert all(f.ok for f in findings), findings
    assert {f.trigger for f in findings} >= {name for _, name, _ in admin.TRIGGERS}
    assert any(f.subject == "enqueue" and "no preview" in f.detail for f in findings)

    owner = await make_user(own_db)
    await make_asset(own_db, owner, Path("/photos/a.jpg"))
    await own_db.execute("TRUNCATE cnai.job_intake")
    findings = await admin.check_database(own_db)
    assert all(f.ok for f in findings), findings
    tried = {f.trigger for f in findings if f.subject.startswith("enqueue via")}
    assert tried == {"cnai_enqueue_preview_insert", "cnai_enqueue_preview_update"}
    assert await own_db.fetchval("SELECT count(*) FROM cnai.job_intake") == 0  # rolled back


async def test_doctor_reports_a_disabled_trigger_once(own_db):
    owner = await make_user(own_db)
    await make_asset(own_db, owner, Path("/photos/a.jpg"))
    await own_db.execute("ALTER TABLE asset_file DISABLE TRIGGER cnai_enqueue_preview_insert")
    [problem] = await problems(own_db)  # its enqueue test fails too, but is not reported a second time
    assert problem.trigger == "cnai_enqueue_preview_insert" and "disabled" in problem.detail
    assert "ENABLE TRIGGER cnai_enqueue_preview_insert" in problem.detail


async def test_doctor_reports_missing_guards_and_a_trigger_that_enqueues_nothing(own_db, own_dsn):
    owner = await make_user(own_db)
    await make_asset(own_db, owner, Path("/photos/a.jpg"))
    await own_db.execute("ALTER FUNCTION cnai.follow_asset_visibility() SECURITY INVOKER RESET search_path")
    [problem] = await problems(own_db)
    assert problem.trigger == "cnai_follow_asset_visibility"
    assert "not SECURITY DEFINER" in problem.detail and "search_path" in problem.detail

    await own_db.execute("DELETE FROM cnai.migration WHERE id LIKE 'triggers/%'")
    await migrate(own_dsn, standalone=True)  # re-applying the file repairs it
    assert await problems(own_db) == []

    # looks right, does nothing: only trying it shows
    await own_db.execute("""CREATE OR REPLACE FUNCTION cnai.enqueue_preview_files() RETURNS trigger
                            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
                            AS $$ BEGIN RETURN NULL; END $$""")
    found = await problems(own_db)
    assert {f.trigger for f in found} == {"cnai_enqueue_preview_insert", "cnai_enqueue_preview_update"}
    assert all(f.subject.startswith("enqueue via") and "queued nothing" in f.detail for f in found)


async def test_doctor_writes_as_the_owner_of_asset_file(own_db):
    """Immich writes with its own role, which has no privilege in schema cnai: so does the doctor's try."""
    role = f"immich_{uuid.uuid4().hex[:8]}"
    owner = await make_user(own_db)
    await make_asset(own_db, owner, Path("/photos/a.jpg"))
    await own_db.execute(f"CREATE ROLE {role}")
    try:
        await own_db.execute(f"GRANT USAGE ON SCHEMA public TO {role}; ALTER TABLE asset_file OWNER TO {role}")
        findings = await admin.check_database(own_db)
        assert all(f.ok for f in findings), findings
        assert all(f"as {role}" in f.detail for f in findings if f.subject.startswith("enqueue via"))

    finally:
        await own_db.execute(f"ALTER TABLE asset_file OWNER TO CURRENT_USER; DROP OWNED BY {role}; DROP ROLE {role}")



async def test_doctor_follows_the_rerun_triggers_where_immich_has_their_tables(own_db, own_dsn):
    """An Immich without smart_search and asset_job_status migrates all the same, and the doctor says those
    triggers are not attached; once Immich has the tables (an upgrade), they are missing until re-applied."""
    await own_db.execute("DROP TABLE smart_search, asset_job_status")  # their triggers go with them
    await own_db.execute("DELETE FROM cnai.migration WHERE id LIKE 'triggers/%'")
    await migrate(own_dsn)  # Immich's database, not standalone
    findings = await admin.check_database(own_db)
    assert all(f.ok for f in findings), findings
    assert {f.subject for f in findings if f.detail.startswith("not attached")} == {
        "triggers on smart_search", "triggers on asset_job_status"}

    await own_db.execute("""
        CREATE TABLE asset_job_status ("assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE,
          "facesRecognizedAt" timestamptz, "metadataExtractedAt" timestamptz, "duplicatesDetectedAt" timestamptz,
          "ocrAt" timestamptz);
        CREATE TABLE smart_search ("assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE,
          embedding vector(512) NOT NULL)""")
    missing = await problems(own_db)
    assert {f.trigger for f in missing} == {name for _, name, _ in admin.IMMICH_RERUN_TRIGGERS}
    assert all(admin.REAPPLY_TRIGGERS in f.detail for f in missing)
    await own_db.execute("DELETE FROM cnai.migration WHERE id LIKE 'triggers/%'")
    await migrate(own_dsn)
    assert await problems(own_db) == []
