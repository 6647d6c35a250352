"""Database connection and migrations."""
from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

import sql as sql_files

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 140000  # Immich supports PostgreSQL 14-18
MIGRATION_LOCK = 0x636E6169  # advisory lock key ("cnai"): one migrator at a time


class DatabaseSetupError(RuntimeError):
    """The database can't host cnai; the message says what to change."""


class ImmichSchemaMissing(DatabaseSetupError):
    """No Immich tables (yet): a service started beside a new Immich waits for Immich's first start to make them."""


async def connect(dsn: str, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, **kwargs)


async def check_server(conn: asyncpg.Connection) -> None:
    version = int(await conn.fetchval("SHOW server_version_num"))
    if version < MIN_SERVER_VERSION:
        raise DatabaseSetupError(
            f"PostgreSQL {version // 10000} is too old: cnai needs PostgreSQL 14 or newer (as Immich does). "
            "Upgrade the server, or run cnai with --embedded.")
    has_vector = await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'vector'")
    if not has_vector:
        available = await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'")
        if not available:
            raise DatabaseSetupError(
                "the pgvector extension is not installed on this PostgreSQL server. Install it (Debian/Ubuntu: "
                "apt install postgresql-<version>-pgvector; or use Immich's database image "
                "ghcr.io/immich-app/postgres), or run cnai with --embedded.")
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except asyncpg.InsufficientPrivilegeError as e:
            raise DatabaseSetupError(
                "pgvector is installed but not enabled in this database, and this user may not enable it: "
                "run `CREATE EXTENSION vector;` as a superuser, then `cnai migrate` again.") from e


async def immich_schema_exists(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('asset') IS NOT NULL AND to_regclass('asset_file') IS NOT NULL"))


async def enable_zhparser_installed_since(conn: asyncpg.Connection) -> None:
    """zhparser installed on the server after cnai's zhparser code ran (its files run only when they change): enable
    it and build its word index now, as that code does (sql/zhparser/code). Nothing about it raises."""
    if await conn.fetchval("""SELECT to_regprocedure('cnai.zhparser_enable()') IS NOT NULL
                                AND NOT EXISTS (SELECT FROM pg_ts_config c
                                                 WHERE c.cfgname = 'zh' AND c.cfgnamespace = 'cnai'::regnamespace)
                                AND EXISTS (SELECT FROM pg_available_extensions WHERE name = 'zhparser')"""):
        log.info("zhparser is available and not enabled yet: enabling it")
        if await conn.fetchval("SELECT cnai.zhparser_enable()"):
            await conn.execute("SELECT cnai.zh_words_prepare()")


async def migrate(dsn: str, standalone: bool = False, sql_root: Path = sql_files.ROOT) -> list[str]:
    """Bring the database up to date, one transaction per file, under an advisory lock. Returns the ids applied.

    Schema files are applied once; code files (functions, triggers) whenever their content differs from what was
    applied, so fixed functions reach existing databases. standalone=True creates the minimal Immich-compatible
    schema first when no Immich schema exists; it never touches an existing Immich schema.
    """
    conn = await connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await check_server(conn)
            have_immich = await immich_schema_exists(conn)
            if not have_immich and not standalone:
                raise ImmichSchemaMissing(
                    "no Immich schema here (table asset is missing): point --dsn at Immich's database, or use "
                    "--standalone to create a minimal Immich-compatible schema (the embedded default does).")
            await conn.execute("""
                CREATE SCHEMA IF NOT EXISTS cnai;
                CREATE TABLE IF NOT EXISTS cnai.migration (
                  id text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {r["id"]: r["checksum"] for r in await conn.fetch("SELECT id, checksum FROM cnai.migration")}
            for m in sql_files.migrations(include_standalone=not have_immich, root=sql_root):
                checksum = m.checksum()
                if done.get(m.id) == checksum:
                    continue
                if m.id in done and m.kind == sql_files.SCHEMA:
                    log.warning("schema file %s changed after it was applied; schema files are append-only, so "
                                "it is not re-applied (put the change in a new numbered file)", m.id)
                    continue
                log.info("applying %s", m.id)
                async with conn.transaction():
                    # a function may name a table or function that a later file creates; bodies are checked
                    # when they run (as pg_dump restores do)
                    await conn.execute("SET LOCAL check_function_bodies = off")
                    try:
                        await conn.execute(m.sql())
                    except asyncpg.PostgresError as e:
                        raise DatabaseSetupError(f"migration {m.id} failed: {e}") from e
                    await conn.execute(
                        """INSERT INTO cnai.migration (id, checksum) VALUES ($1, $2)
                           ON CONFLICT (id) DO UPDATE SET checksum = excluded.checksum, applied_at = now()""",
                        m.id, checksum)
                applied.append(m.id)
            await enable_zhparser_installed_since(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied
