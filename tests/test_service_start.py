"""`cnai listen`/`serve` started beside a new Immich (one compose project): Immich's tables don't exist until Immich's
first start makes them, so the service waits for them and then migrates, instead of exiting."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

import sql as sql_files
from tests.conftest import stop_process, wait_for
from tests.test_migrations import fresh_dsn  # noqa: F401  (fixture: a new, empty database)


async def test_listener_waits_for_immichs_tables_then_migrates(fresh_dsn, tmp_path):  # noqa: F811
    log = tmp_path / "listen.log"
    env = {**os.environ, "CNAI_TASKS": "ocr", "CNAI_PRELOAD": "0", "CNAI_MODELS_DIR": str(tmp_path / "models")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cnai", "listen", "--dsn", fresh_dsn], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        async def told_to_wait():
            assert proc.poll() is None, log.read_text()
            return "Waiting for Immich to create its tables" in log.read_text()
        await wait_for(told_to_wait, timeout=60)

        conn = await asyncpg.connect(fresh_dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('cnai.migration')") is None  # nothing written meanwhile
            immich = [m for m in sql_files.migrations(include_standalone=True) if m.id.startswith("immich/")]
            for m in immich:  # Immich's first start
                await conn.execute(m.sql())

            async def migrated():
                assert proc.poll() is None, log.read_text()
                if await conn.fetchval("SELECT to_regclass('cnai.migration')") is None:
                    return False
                return await conn.fetchval("SELECT count(*) FROM cnai.migration") > 0
            await wait_for(migrated, timeout=60)
            assert await conn.fetchval("SELECT count(*) FROM cnai.migration WHERE id LIKE 'immich/%'") == 0
        finally:
            await conn.close()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, stop_process, proc, 30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert log.read_text().count("Waiting for Immich") == 1  # said once, not every few seconds
