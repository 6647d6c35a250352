"""Shared fixtures: one real embedded PostgreSQL (pgvector) per test session, migrated; image helpers."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from PIL import Image, ImageDraw, ImageFont

from cnai.db import migrate
from cnai.embedded import EmbeddedServer, scratch_folder

FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
]


def cjk_font(size: int = 48) -> ImageFont.FreeTypeFont:
    for path in FONT_CANDIDATES:
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    pytest.fail("no CJK font installed: run the project's test script, which installs fonts-wqy-zenhei")


def render_text(lines: list[str], size: int = 48, width: int = 900) -> Image.Image:
    font = cjk_font(size)
    height = 60 + len(lines) * int(size * 2.2)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((30, 30 + i * int(size * 2.2)), line, font=font, fill="black")
    return img


@pytest.fixture(scope="session")
def pg_server():
    data_dir = Path(tempfile.mkdtemp(prefix="cnai-test-pg-"))
    server = EmbeddedServer(data_dir)
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def dsn(pg_server) -> str:
    url = pg_server.dsn()
    asyncio.run(migrate(url, standalone=True))
    return url


@pytest_asyncio.fixture
async def db(dsn):
    conn = await asyncpg.connect(dsn)
    await conn.execute('TRUNCATE "user", asset, reprocess_request, cnai.job, cnai.job_intake CASCADE')
    await reset_indexed_tasks(conn)
    yield conn
    await conn.close()


async def reset_indexed_tasks(conn) -> None:
    """The tasks a new database indexes (sql/queue/schema/103_indexed_tasks.sql): a listener with face, started by
    an earlier test of this session, added face."""
    from listener.task_names import DEFAULT_TASKS
    await conn.execute("DELETE FROM cnai.indexed_task")
    await conn.execute("INSERT INTO cnai.indexed_task (task) SELECT unnest($1::text[])", list(DEFAULT_TASKS))


@pytest.fixture
def embedded_home():
    """A folder for one test's embedded server (in `data`) and its files; the server is destroyed after."""
    with scratch_folder("cnai-cli-") as root:
        yield root
        EmbeddedServer(root / "data").destroy()


@pytest.fixture
def photo_dir():
    path = Path(tempfile.mkdtemp(prefix="cnai-test-photos-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listener_settings(tasks: list[str], models_dir: Path | None = None, **overrides):
    """Settings for a listener under test: quick polling and short leases."""
    from cnai.settings import Settings
    s = Settings()
    if models_dir is not None:
        s.models_dir = models_dir
    s.tasks = tasks
    s.poll_interval_s = 0.3
    s.lease_s = 5
    s.backoff_base_s = 0.2
    s.path_map = []
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


@contextlib.asynccontextmanager
async def running_listener(dsn: str, pool, settings, mirror_clip: bool = False, stop_timeout: float = 60):
    """The real listener, in-process on the test's loop, stopped gracefully on exit."""
    from cnai.wiring import build_listener
    listener = build_listener(dsn, pool, settings, mirror_clip=mirror_clip)
    task = asyncio.create_task(listener.run())
    try:
        yield listener
    finally:
        listener.stop()
        await asyncio.wait_for(task, stop_timeout)


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, as a service manager would; SIGKILL only if it does not stop in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


async def make_user(conn, email: str | None = None):
    return await conn.fetchval('INSERT INTO "user" (email) VALUES ($1) RETURNING id',
                               email or f"{uuid.uuid4().hex[:8]}@test")


async def make_asset(conn, owner, path: Path, with_preview: bool = True):
    """An asset whose preview is `path`, written the way Immich writes it (one upsert statement)."""
    checksum = hashlib.sha1(str(path).encode() + uuid.uuid4().bytes).digest()
    asset_id = await conn.fetchval(
        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
           VALUES ($1, $2, $3, $4) RETURNING id""", owner, str(path), path.name, checksum)
    if with_preview:
        await conn.execute(
            """INSERT INTO asset_file ("assetId", type, path) VALUES ($1, 'preview', $2)
               ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""", asset_id, str(path))
    return asset_id


async def wait_for(predicate, timeout: float = 60, interval: float = 0.1):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def wait_for_ping(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Wait until a started `cnai serve`/`gateway` answers /ping; its output is the error if it exits first."""
    import urllib.request

    def ping():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                return r.read() == b"pong"
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            return False
    wait_until(ping, timeout, "the gateway")


async def run_cnai(*args: str) -> str:
    """`cnai ARGS` as a subprocess of this Python; its output (stdout and stderr), which must end with exit 0."""
    import sys
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cnai", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def wait_until(check, timeout: float, what: str, interval: float = 0.3):
    """wait_for's twin for plain (blocking) checks: a subprocess's output, a container's state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
