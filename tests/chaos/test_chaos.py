"""Crash-safety of the queue, with the scenarios Postgres queues are judged by (reference/anchors.md §A, hardbyte's
crash-test model): SIGKILL repeatedly, several listeners with one killed, pg_terminate_backend on the LISTEN and
worker connections, PostgreSQL restarted (fast and crash) mid-batch, a listener started before PostgreSQL, and
connection exhaustion. Real listeners (subprocesses running listener.worker.Listener) work a few hundred jobs
through the real result writes; each scenario asserts lost = 0, duplicated = 0, every job done or failed with a
reason, and a recovery time within lease + reaper period + poll interval (plus reconnect backoff where the
database itself was away, and slack for process start on a loaded machine).
"""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from .conftest import (APP_NAME, LEASE_S, POLL_S, REAPER_S, RECONNECT_CAP_S, SLACK_S, SUMMARY, format_summary)

pytestmark = pytest.mark.timeout(180)

ASSETS = 100  # x 3 tasks = 300 jobs per scenario
KILL_BOUND = LEASE_S + REAPER_S + POLL_S + SLACK_S
OUTAGE_BOUND = LEASE_S + REAPER_S + POLL_S + RECONNECT_CAP_S + SLACK_S


async def finish(chaos, scenario: str, bound: float, note: str = "") -> dict:
    await chaos.wait_finished()
    row = {**await chaos.outcome(), **chaos.report(scenario, bound, note)}
    SUMMARY.append(row)
    table = format_summary([row])
    print("\n" + table)
    assert row["lost"] == 0, f"jobs lost\n{table}\n{chaos.log_tail()}"
    assert row["duplicated"] == 0, f"results duplicated\n{table}"
    assert row["unfinished"] == 0, table
    assert row["unrecovered"] == 0, f"a fault's work never came back\n{table}\n{chaos.log_tail()}"
    assert row["recovery_s"] is None or row["recovery_s"] <= bound, f"recovery too slow\n{table}"
    return row


async def test_repeated_sigkill(chaos):
    """SIGKILL the only listener five times mid-batch, restarting it each time."""
    await chaos.add_assets(ASSETS)
    proc = chaos.spawn()
    for _ in range(5):
        held = await chaos.wait_running()
        await asyncio.sleep(0.1)
        held = await chaos.held() or held
        chaos.kill(proc)
        await chaos.fault("sigkill", held)
        proc = chaos.spawn()
    await finish(chaos, "repeated SIGKILL x5", KILL_BOUND)


async def test_kill_one_of_three(chaos):
    """Three listeners share the queue; one is killed and not restarted: the others reap its work."""
    await chaos.add_assets(ASSETS)
    procs = [chaos.spawn() for _ in range(3)]
    held = await chaos.wait_running(at_least=3, workers=3)
    workers = {}
    for i, p in enumerate(procs):  # the worker id each listener printed first
        chaos.logs[i].flush()
        chaos.logs[i].seek(0)
        first = chaos.logs[i].readline().split()
        workers[i] = first[1] if len(first) > 1 else None
    victim = max(range(3), key=lambda i: sum(1 for w in held.values() if w == workers[i]))
    held = {j: w for j, w in (await chaos.held()).items() if w == workers[victim]}
    chaos.kill(procs[victim])
    await chaos.fault("sigkill one of three", held)
    await finish(chaos, "3 listeners, 1 SIGKILLed", KILL_BOUND, note=f"{len(held)} held by the victim")


async def test_terminate_backends(chaos):
    """pg_terminate_backend the LISTEN connection and every pooled worker connection, three times; after
    that a new preview must wake the listener by NOTIFY (the poll is set to 3 s, so a prompt claim proves the
    LISTEN connection came back)."""
    await chaos.add_assets(ASSETS)
    chaos.spawn(poll_s=3.0)
    conn = await chaos.connect()
    killed = 0
    for _ in range(3):
        held = await chaos.wait_running()
        await chaos.fault("terminate backends", held)
        killed += await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1) t", APP_NAME)
        await asyncio.sleep(0.6)
    await chaos.wait_finished()
    # NOTIFY path after the reconnects: the listener is idle now, with a 3 s poll
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    await chaos.add_assets(1)
    while await conn.fetchval("SELECT sum(queued) FROM cnai.queue_depth()") > 0:
        if time.monotonic() - t0 > 10:
            break
        await asyncio.sleep(0.005)
    wake = time.monotonic() - t0
    row = await finish(chaos, "pg_terminate_backend x3", KILL_BOUND + RECONNECT_CAP_S,
                       note=f"{killed} backends; NOTIFY wake after: {wake * 1000:.0f} ms")
    assert killed >= 3, row
    assert wake < 2.5, f"a new job waited {wake:.2f} s: LISTEN did not come back (poll is 3 s)"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart_mid_batch(chaos, mode):
    """Stop PostgreSQL while the listener holds a batch (fast shutdown, or a crash: immediate), start it again."""
    await chaos.add_assets(ASSETS)
    chaos.spawn()
    held = await chaos.wait_running()
    fault = await chaos.fault("outage: postgres restart", held)
    chaos.server.stop(mode)
    await asyncio.sleep(1.0)
    chaos.server.start()
    chaos.restored(fault)
    chaos.conn = None
    await finish(chaos, f"postgres restart ({mode})", OUTAGE_BOUND)


async def test_listener_started_while_postgres_down(chaos):
    """The listener starts before PostgreSQL (boot order); work queued meanwhile is picked up once it is up."""
    await chaos.add_assets(ASSETS)
    await chaos.conn.close()
    chaos.conn = None
    fault = await chaos.fault("outage: postgres down at start", {})
    chaos.server.stop("fast")
    chaos.spawn()
    await asyncio.sleep(2.5)
    assert chaos.procs[0].poll() is None, f"listener exited while the database was down\n{chaos.log_tail()}"
    chaos.server.start()
    chaos.restored(fault)
    await finish(chaos, "listener before postgres", OUTAGE_BOUND)


async def test_connection_exhaustion(chaos):
    """Every connection slot taken by idle clients while the listener dies holding a batch; a new listener
    starts into the full server and is refused for 3 s; then the clients go away."""
    await chaos.add_assets(ASSETS)
    first = chaos.spawn()
    conn = await chaos.connect()
    held = await chaos.wait_running()
    hogs: list = []

    async def grab():
        while True:
            try:
                hogs.append(await asyncpg.connect(chaos.dsn, timeout=5))
            except asyncpg.TooManyConnectionsError:
                return
            except (OSError, asyncpg.PostgresError) as e:
                if "too many" in str(e) or "remaining connection slots" in str(e):
                    return
                raise

    await grab()
    held = await chaos.held() or held
    chaos.kill(first)
    fault = await chaos.fault("outage: connections exhausted", held)
    await asyncio.sleep(0.2)  # the watcher holds its connection
    for _ in range(100):  # the dead listener's backends go away: take their slots too
        if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP_NAME):
            break
        await asyncio.sleep(0.05)
    await grab()
    full = len(hogs)
    chaos.spawn()
    await asyncio.sleep(3.0)
    refused = chaos.log_tail(10**7).count("too many clients") + chaos.log_tail(10**7).count("connection slots")
    for h in hogs:
        await h.close()
    chaos.restored(fault)
    row = await finish(chaos, "connection exhaustion", OUTAGE_BOUND,
                       note=f"{full} idle connections held; {len(held)} jobs stranded; "
                            f"{refused} listener connection attempts refused")
    assert refused > 0, f"the listener was never refused a connection: not exhausted\n{row}"
