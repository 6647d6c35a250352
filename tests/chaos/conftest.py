"""The chaos suite's own PostgreSQL (it is stopped, crashed and starved here, so the session's shared server is
left alone), the harness that runs real listeners as subprocesses, and the end-of-run summary table."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from PIL import Image

from cnai.db import migrate
from cnai.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parents[2]
MAX_CONNECTIONS = 40
APP_NAME = "cnai-chaos-listener"

# Listener timing for the suite: a short lease so a dead listener's work comes back quickly.
LEASE_S = 2.0
POLL_S = 0.3
REAPER_S = max(POLL_S, min(LEASE_S / 4, 5))  # listener.worker: the maintenance loop's period
RECONNECT_CAP_S = 5.0                        # listener.worker: reconnect backoff cap
SLACK_S = 6.0                                # process start, the work itself, a loaded 2-core CI machine

SUMMARY: list[dict] = []


@pytest.fixture(scope="session")
def chaos_server():
    data_dir = Path(tempfile.mkdtemp(prefix="cnai-chaos-pg-"))
    server = EmbeddedServer(data_dir)
    server.init()
    with open(server.pgdata / "postgresql.conf", "a") as conf:
        conf.write(f"\n# chaos suite\nmax_connections = {MAX_CONNECTIONS}\n")
    server.start()
    asyncio.run(_prepare(server.dsn()))
    yield server
    server.destroy()


async def _prepare(dsn: str) -> None:
    await migrate(dsn, standalone=True)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("""CREATE TABLE IF NOT EXISTS chaos_write (
                                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                asset_id uuid NOT NULL, task text NOT NULL, worker text NOT NULL,
                                at timestamptz NOT NULL DEFAULT clock_timestamp())""")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def preview_file():
    folder = Path(tempfile.mkdtemp(prefix="cnai-chaos-img-"))
    path = folder / "preview.jpg"
    Image.new("RGB", (64, 48), "white").save(path, "JPEG")
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest_asyncio.fixture
async def chaos(chaos_server, preview_file, request):
    harness = Chaos(chaos_server, preview_file, request.node.name)
    await harness.reset()
    try:
        yield harness
    finally:
        await harness.close()


@dataclass
class Fault:
    name: str
    at: float                 # when it happened (time.monotonic)
    stranded: dict            # job id -> worker that held it at the fault
    restored_at: float | None = None
    recovered_at: float | None = None
    resumed_at: float | None = None

    @property
    def recovery_s(self) -> float | None:
        """Until the work in flight at the fault is finished (or re-taken) and jobs finish again."""
        if self.recovered_at is None:
            return None
        return max(self.recovered_at, self.resumed_at or 0) - (self.restored_at or self.at)


@dataclass
class Chaos:
    server: EmbeddedServer
    preview: Path
    name: str
    procs: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    faults: list = field(default_factory=list)
    conn: asyncpg.Connection | None = None
    assets: list = field(default_factory=list)
    _watchers: list = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.server.dsn()

    async def connect(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "cnai-chaos-admin"})
        return self.conn

    async def reset(self) -> None:
        conn = await self.connect()
        await conn.execute('TRUNCATE "user", asset, reprocess_request, cnai.job, cnai.job_intake, chaos_write CASCADE')

    async def add_assets(self, n: int, per_statement: int = 50) -> list:
        """n assets whose preview + thumbnail rows are written the way Immich writes them (fires the trigger)."""
        conn = await self.connect()
        owner = await conn.fetchval("""INSERT INTO "user" (email) VALUES ($1) RETURNING id""",
                                    f"chaos-{time.monotonic_ns()}@test")
        ids = [r[0] for r in await conn.fetch(
            """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
               SELECT $1, '/chaos/' || g, g || '.jpg', sha256(convert_to(g::text || random()::text, 'UTF8'))
                 FROM generate_series(1, $2) g RETURNING id""", owner, n)]
        for i in range(0, n, per_statement):
            await conn.execute(
                """INSERT INTO asset_file ("assetId", type, path)
                   SELECT a, t, $2 FROM unnest($1::uuid[]) a CROSS JOIN unnest(ARRAY['preview', 'thumbnail']) t
                   ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path""",
                ids[i:i + per_statement], str(self.preview))
        self.assets += ids
        return ids

    # --- listeners ------------------------------------------------------------------------------------------
    def spawn(self, item_ms: float = 15, poll_s: float = POLL_S, **env_extra) -> subprocess.Popen:
        env = {**os.environ, "CNAI_TASKS": "clip,face,ocr", "CNAI_POLL_INTERVAL_S": str(poll_s),
               "CNAI_LEASE_S": str(LEASE_S), "CNAI_BATCH_SIZE": "8", "CNAI_CONCURRENCY": "2",
               "CNAI_BACKOFF_BASE_S": "0.2", "CHAOS_ITEM_MS": str(item_ms), "CNAI_LOG_LEVEL": "INFO",
               "PYTHONPATH": str(REPO), **{k: str(v) for k, v in env_extra.items()}}
        log = open(Path(self.server.data_dir) / f"{self.name}-{len(self.procs)}.log", "w+")
        dsn = f"{self.dsn}?application_name={APP_NAME}"
        proc = subprocess.Popen([sys.executable, "-m", "tests.chaos.runner", "--dsn", dsn], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for i, log in enumerate(self.logs):
            log.flush()
            log.seek(0)
            out.append(f"--- listener {i} ---\n{log.read()[-chars:]}")
        return "\n".join(out)

    async def close(self) -> None:
        for w in self._watchers:
            w.cancel()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self.logs:
            log.close()
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()

    # --- observing ----------------------------------------------------------------------------------------
    async def held(self) -> dict:
        """Running jobs now: id -> worker."""
        conn = await self.connect()
        return {r["id"]: r["worker"] for r in await conn.fetch(
            "SELECT id, worker FROM cnai.job WHERE state = 'running'")}

    async def wait_running(self, at_least: int = 1, workers: int = 1, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = await self.held()
            if len(held) >= at_least and len(set(held.values())) >= workers:
                return held
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.name}: no listener started working within {timeout} s\n{self.log_tail()}")

    async def fault(self, name: str, stranded: dict | None = None) -> Fault:
        """Record a fault now, with the jobs in flight at that moment, and watch them recover."""
        f = Fault(name, time.monotonic(), dict(stranded if stranded is not None else await self.held()))
        self.faults.append(f)
        self._watchers.append(asyncio.create_task(self._watch(f)))
        return f

    def restored(self, f: Fault) -> None:
        f.restored_at = time.monotonic()

    async def _watch(self, f: Fault) -> None:
        """Recovered: every job in flight at the fault is finished, or held again by another worker.
        Resumed: a job finished after the fault (for an outage: after the restore)."""
        conn = None
        baseline = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (f.recovered_at is None or f.resumed_at is None):
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn,
                                                 server_settings={"application_name": "cnai-chaos-admin"})
                if baseline is None:  # nothing finishes during an outage: count from the fault
                    baseline = await conn.fetchval(
                        "SELECT count(*) FROM cnai.job WHERE state IN ('done', 'failed')")
                if self._outage(f) and f.restored_at is None:
                    await asyncio.sleep(0.03)
                    continue
                now = time.monotonic()
                done = await conn.fetchval("SELECT count(*) FROM cnai.job WHERE state IN ('done', 'failed')")
                if f.resumed_at is None and done > baseline:
                    f.resumed_at = now
                if f.recovered_at is None:
                    rows = await conn.fetch("SELECT id, state, worker FROM cnai.job WHERE id = ANY($1)",
                                            list(f.stranded))
                    state = {r["id"]: (r["state"], r["worker"]) for r in rows}
                    if all(i not in state or state[i][0] in ("done", "failed")
                           or (state[i][0] == "running" and state[i][1] != w) for i, w in f.stranded.items()):
                        f.recovered_at = now
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn = None  # the server is down or full: keep trying
            await asyncio.sleep(0.03)
        if conn is not None and not conn.is_closed():
            await conn.close()

    def _outage(self, f: Fault) -> bool:
        return f.name.startswith("outage:")

    async def wait_finished(self, timeout: float = 90) -> None:
        conn = await self.connect()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = await conn.fetchval("SELECT count(*) FROM cnai.job WHERE state NOT IN ('done', 'failed')") \
                + await conn.fetchval("SELECT count(*) FROM cnai.job_intake")
            if left == 0:
                # let the fault watchers see the end
                await asyncio.wait(self._watchers, timeout=5) if self._watchers else None
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name}: {left} job(s) still not finished after {timeout} s\n{self.log_tail()}")

    async def outcome(self) -> dict:
        """Lost, duplicated and unfinished work, measured from the database."""
        conn = await self.connect()
        expected = {(a, t) for a in self.assets for t in ("clip", "face", "ocr")}
        jobs = await conn.fetch("SELECT asset_id, task, state, error, attempts FROM cnai.job")
        writes = {(r["asset_id"], r["task"]): r["n"] for r in await conn.fetch(
            "SELECT asset_id, task, count(*) AS n FROM chaos_write GROUP BY 1, 2")}
        results = {}
        for task, sql in (("ocr", "SELECT asset_id, count(*) AS n FROM cnai.ocr GROUP BY 1"),
                          ("clip", "SELECT asset_id, count(*) AS n FROM cnai.clip GROUP BY 1"),
                          ("face", "SELECT asset_id, count(*) AS n FROM cnai.face GROUP BY 1")):
            for r in await conn.fetch(sql):
                results[(r["asset_id"], task)] = r["n"]
        by_pair: dict = {}
        for j in jobs:
            by_pair.setdefault((j["asset_id"], j["task"]), []).append(j)
        lost, failed, unfinished = [], [], []
        for pair in expected:
            js = by_pair.get(pair, [])
            if any(j["state"] not in ("done", "failed") for j in js):
                unfinished.append(pair)
            ok = any(j["state"] == "done" for j in js) and results.get(pair, 0) >= 1 and writes.get(pair, 0) >= 1
            reasoned_failure = any(j["state"] == "failed" and (j["error"] or "").strip() for j in js)
            if reasoned_failure:
                failed.append(pair)
            if not ok and not reasoned_failure:
                lost.append(pair)
        duplicated = sum(n - 1 for n in writes.values() if n > 1) + sum(n - 1 for n in results.values() if n > 1)
        extra_jobs = sum(len(js) - 1 for js in by_pair.values() if len(js) > 1)
        return {"jobs": len(expected), "lost": len(lost), "duplicated": duplicated, "failed": len(failed),
                "unfinished": len(unfinished), "duplicate_jobs": extra_jobs,
                "redelivered": sum(j["attempts"] for j in jobs) - len(jobs),
                "failed_reasons": sorted({j["error"] for j in jobs if j["state"] == "failed"})[:5]}

    def report(self, scenario: str, bound_s: float, note: str = "") -> dict:
        recoveries = [f.recovery_s for f in self.faults]
        resumes = [(f.resumed_at - (f.restored_at or f.at)) if f.resumed_at else None for f in self.faults]
        row = {"scenario": scenario, "faults": len(self.faults),
               "recovery_s": max((r for r in recoveries if r is not None), default=None),
               "unrecovered": sum(r is None for r in recoveries),
               "resume_s": max((r for r in resumes if r is not None), default=None),
               "bound_s": bound_s, "note": note}
        return row


def format_summary(rows: list[dict]) -> str:
    head = (f"{'scenario':28s} {'jobs':>5s} {'lost':>5s} {'dup':>4s} {'failed':>6s} {'redeliv':>7s} "
            f"{'faults':>6s} {'recover':>8s} {'resume':>7s} {'bound':>6s}")
    lines = ["chaos summary (recover: fault or restore -> all work in flight at the fault finished or re-taken;"
             " resume: -> first job finished)", head]
    for r in rows:
        rec = f"{r['recovery_s']:.2f}s" if r.get("recovery_s") is not None else "-"
        res = f"{r['resume_s']:.2f}s" if r.get("resume_s") is not None else "-"
        lines.append(f"{r['scenario']:28s} {r['jobs']:>5d} {r['lost']:>5d} {r['duplicated']:>4d} {r['failed']:>6d} "
                     f"{r['redelivered']:>7d} {r['faults']:>6d} {rec:>8s} {res:>7s} {r['bound_s']:>5.1f}s"
                     + (f"  {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.write_sep("=", "chaos")
        terminalreporter.write_line(format_summary(SUMMARY))
