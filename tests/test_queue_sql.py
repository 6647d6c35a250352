"""The queue's SQL contract, on a real PostgreSQL: what the triggers enqueue and notify, how requests coalesce and
follow their jobs, and what the listener's functions (claim, fail, requeue, reap, prune, retry) do."""
from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from listener.task_names import TASKS
from tests.conftest import make_asset, make_user
from tests.conftest import run_cnai as cnai

LEASE = timedelta(seconds=60)
UPSERT = """INSERT INTO asset_file ("assetId", type, path) SELECT a, t, '/p/' || a || t
              FROM unnest($1::uuid[]) a CROSS JOIN unnest($2::text[]) t
            ON CONFLICT ("assetId", type, "isEdited") DO UPDATE SET path = excluded.path"""


async def queued(db, asset=None) -> list[tuple]:
    """(task, state) of every job, sorted, after the intake was taken (as a listener does before claiming)."""
    await db.execute("SELECT cnai.take_intake()")
    rows = await db.fetch("SELECT task, state FROM cnai.job WHERE $1::uuid IS NULL OR asset_id = $1 ORDER BY 1, 2",
                          asset)
    return [(r["task"], r["state"]) for r in rows]


async def claim(db, worker="w", tasks=TASKS, limit=100, lease=LEASE):
    return await db.fetch("SELECT * FROM cnai.claim_jobs($1, $2, $3, $4)", worker, limit, tasks, lease)


async def request(db, asset, tasks=None) -> int:
    return await db.fetchval("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1, $2) RETURNING id",
                             asset, tasks)


async def request_status(db, req) -> tuple:
    r = await db.fetchrow("SELECT status, error FROM reprocess_request WHERE id = $1", req)
    return r["status"], r["error"]


async def bare_assets(db, n) -> list:
    owner = await make_user(db)
    return [r[0] for r in await db.fetch(
        """INSERT INTO asset ("ownerId", "originalPath", "originalFileName", checksum)
           SELECT $1, '/q/' || g, g || '.jpg', sha256(convert_to(g::text || random()::text, 'UTF8'))
             FROM generate_series(1, $2) g RETURNING id""", owner, n)]


async def lock_waiting(db, conn) -> bool:
    return await db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                             conn.get_server_pid())


async def until(predicate, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --- what the asset_file trigger enqueues ----------------------------------------------------------------------
async def test_preview_insert_enqueues_every_indexed_task(db):
    owner = await make_user(db)
    asset = await make_asset(db, owner, Path("/photos/a.jpg"))
    # Immich's statement only appended one narrow intake row; cnai.queue_depth() already counts it
    assert await db.fetchval("SELECT count(*) FROM cnai.job_intake WHERE asset_id = $1", asset) == 1
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1", asset) == 0
    depth = {r["task"]: r["queued"] for r in await db.fetch("SELECT * FROM cnai.queue_depth()")}
    assert depth == {"clip": 1, "face": 0, "ocr": 1}  # a new database indexes no faces (cnai.indexed_task)
    # a listener turns it into one queued job per indexed task before claiming
    assert await db.fetchval("SELECT cnai.take_intake()") == 1
    assert await queued(db, asset) == [("clip", "queued"), ("ocr", "queued")]
    assert await db.fetchval("SELECT count(*) FROM cnai.job_intake") == 0


async def test_thumbnail_only_enqueues_nothing(db):
    [asset] = await bare_assets(db, 1)
    await db.execute(UPSERT, [asset], ["thumbnail", "fullsize"])
    assert await queued(db, asset) == []


async def test_upsert_with_unchanged_path_enqueues_again(db):
    [asset] = await bare_assets(db, 1)
    await db.execute(UPSERT, [asset], ["preview", "thumbnail"])
    jobs = await claim(db)
    assert len(jobs) == 2
    await db.execute("SELECT cnai.complete_jobs('w', $1)", [j["id"] for j in jobs])
    assert await queued(db, asset) == [("clip", "done"), ("ocr", "done")]
    await db.execute(UPSERT, [asset], ["preview", "thumbnail"])  # conflict -> DO UPDATE, same path
    assert [s for s in await queued(db, asset) if s[1] == "queued"] == [("clip", "queued"), ("ocr", "queued")]


async def test_one_notify_per_statement(db, dsn):
    listener = await asyncpg.connect(dsn)
    got: list = []
    await listener.add_listener("cnai_job", lambda *args: got.append(args[3]))
    try:
        assets = await bare_assets(db, 53)
        await db.execute(UPSERT, assets[:50], ["preview", "thumbnail"])  # one 100-row statement
        await asyncio.sleep(0.3)
        assert got == ["preview"]
        for a in assets[50:]:  # three one-asset statements
            await db.execute(UPSERT, [a], ["preview", "thumbnail"])
        await asyncio.sleep(0.3)
        assert len(got) == 4
        assert await db.fetchval("SELECT sum(queued) FROM cnai.queue_depth()") == 53 * 2  # clip and ocr
    finally:
        await listener.close()


async def test_duplicate_requests_coalesce(db):
    owner = await make_user(db)
    asset = await make_asset(db, owner, Path("/photos/b.jpg"))
    await db.execute(UPSERT, [asset], ["preview"])  # Immich re-writes the preview before anyone claimed
    r1 = await request(db, asset)
    r2 = await request(db, asset, ["ocr", "ocr"])
    await db.execute("SELECT cnai.take_intake()")
    rows = await db.fetch("SELECT task, state, priority FROM cnai.job WHERE asset_id = $1 ORDER BY task", asset)
    assert [(r["task"], r["state"], r["priority"]) for r in rows] == [("clip", "queued", 0), ("ocr", "queued", 0)]
    assert await db.fetchval("SELECT tasks FROM reprocess_request WHERE id = $1", r1) == ["clip", "ocr"]  # indexed
    assert await db.fetchval("SELECT tasks FROM reprocess_request WHERE id = $1", r2) == ["ocr"]
    linked = await db.fetchval("SELECT count(*) FROM cnai.request_job WHERE request_id = ANY($1)", [r1, r2])
    assert linked == 3  # r1: the two indexed tasks, r2: ocr
    jobs = await claim(db)
    assert await request_status(db, r1) == ("running", None)
    await db.execute("SELECT cnai.complete_jobs('w', $1)", [j["id"] for j in jobs])
    assert await request_status(db, r1) == ("done", None)
    assert await request_status(db, r2) == ("done", None)


async def test_request_while_running_gets_one_queued_twin(db):
    [asset] = await bare_assets(db, 1)
    r1 = await request(db, asset, ["ocr"])
    [j1] = await claim(db, tasks=["ocr"])
    assert await request_status(db, r1) == ("running", None)
    r2 = await request(db, asset, ["ocr"])
    r3 = await request(db, asset, ["ocr"])
    assert await queued(db, asset) == [("ocr", "queued"), ("ocr", "running")]
    assert await claim(db, "other", ["ocr"]) == []  # the twin waits for the running job
    # the running attempt fails (retryable): it merges into the queued twin, and r1 follows it there
    await db.execute("SELECT cnai.fail_jobs('w', $1, $2, $3)", [j1["id"]], ["boom"], [False])
    assert await queued(db, asset) == [("ocr", "queued")]
    twin = await db.fetchval("SELECT id FROM cnai.job WHERE asset_id = $1", asset)
    assert sorted(r[0] for r in await db.fetch("SELECT request_id FROM cnai.request_job WHERE job_id = $1",
                                                twin)) == sorted([r1, r2, r3])
    [j2] = await claim(db, tasks=["ocr"])
    assert j2["id"] == twin
    await db.execute("SELECT cnai.complete_jobs('w', $1)", [twin])
    for r in (r1, r2, r3):
        assert await request_status(db, r) == ("done", None)


async def test_request_for_running_job_completes_separately(db):
    [asset] = await bare_assets(db, 1)
    r1 = await request(db, asset, ["face"])
    [j1] = await claim(db, tasks=["face"])
    r2 = await request(db, asset, ["face"])
    await db.execute("SELECT cnai.complete_jobs('w', $1)", [j1["id"]])
    assert await request_status(db, r1) == ("done", None)
    assert await request_status(db, r2) == ("pending", None)  # it asked for a run after the one it saw
    [j2] = await claim(db, tasks=["face"])
    assert await request_status(db, r2) == ("running", None)
    await db.execute("SELECT cnai.fail_jobs('w', $1, $2, $3)", [j2["id"]], ["model missing"], [True])
    status, error = await request_status(db, r2)
    assert status == "failed" and "face: model missing" in error


async def test_request_finished_by_two_transactions_at_once_is_done(db, dsn):
    """The last two jobs of one request finish in two transactions at the same time: each must not judge the
    request by a snapshot in which the other's job still runs."""
    [asset] = await bare_assets(db, 1)
    req = await request(db, asset, ["clip", "ocr"])
    jobs = {j["task"]: j["id"] for j in await claim(db, tasks=["clip", "ocr"])}
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = first.transaction()
        await tx.start()
        await first.execute("SELECT cnai.complete_jobs('w', $1)", [jobs["ocr"]])
        finishing = asyncio.create_task(second.execute("SELECT cnai.complete_jobs('w', $1)", [jobs["clip"]]))
        await until(lambda: lock_waiting(db, second))  # it waits for the request row the first one holds
        await tx.commit()
        await finishing
    finally:
        await first.close()
        await second.close()
    assert await request_status(db, req) == ("done", None)


async def test_unknown_asset_or_task_is_refused_clearly(db):
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="does not exist"):
        await request(db, uuid.uuid4())
    [asset] = await bare_assets(db, 1)
    with pytest.raises(asyncpg.CheckViolationError, match="unknown task 'bogus'"):
        await request(db, asset, ["ocr", "bogus"])
    assert await db.fetchval("SELECT count(*) FROM reprocess_request") == 0


async def test_trigger_never_raises_into_immich(db):
    [a1, a2] = await bare_assets(db, 2)
    tx = db.transaction()
    await tx.start()
    try:
        # the intake refuses rows: the write goes through, the failure is recorded as failed jobs with the reason
        await db.execute("ALTER TABLE cnai.job_intake ADD CONSTRAINT chaos_refuse CHECK (false) NOT VALID")
        await db.execute(UPSERT, [a1], ["preview", "thumbnail"])
        assert await db.fetchval('SELECT count(*) FROM asset_file WHERE "assetId" = $1', a1) == 2
        rows = await db.fetch("SELECT task, state, error FROM cnai.job WHERE asset_id = $1 ORDER BY task", a1)
        assert [(r["task"], r["state"]) for r in rows] == [("clip", "failed"), ("ocr", "failed")]
        assert all("enqueue failed in trigger on asset_file" in r["error"] and "chaos_refuse" in r["error"]
                   for r in rows)
        # even recording the failure fails (every job row refused): still only a warning, the write stands
        await db.execute("ALTER TABLE cnai.job ADD CONSTRAINT chaos_refuse_all CHECK (false) NOT VALID")
        await db.execute(UPSERT, [a2], ["preview"])
        assert await db.fetchval('SELECT count(*) FROM asset_file WHERE "assetId" = $1', a2) == 1
        assert await queued(db, a2) == []
    finally:
        await tx.rollback()  # the constraints go again
    await db.execute(UPSERT, [a1], ["preview"])
    assert await queued(db, a1) == [("clip", "queued"), ("ocr", "queued")]


# --- the listener's functions ----------------------------------------------------------------------------------
async def test_retries_back_off_then_fail_with_reason(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task, max_attempts) VALUES ($1, 'ocr', 3)", asset)
    delays = []
    for attempt in range(1, 4):
        await db.execute("UPDATE ONLY cnai.job SET run_after = now() WHERE state = 'queued'")  # skip the wait
        [job] = await claim(db, tasks=["ocr"])
        assert job["attempts"] == attempt
        await db.execute("SELECT cnai.fail_jobs('w', $1, $2, $3, $4)", [job["id"]], [f"timeout {attempt}"],
                         [False], timedelta(seconds=10))
        row = await db.fetchrow("SELECT state, error, extract(epoch FROM run_after - now()) AS wait "
                                "FROM cnai.job WHERE id = $1", job["id"])
        if attempt < 3:
            assert row["state"] == "queued" and row["error"] == f"timeout {attempt}"
            delays.append(row["wait"])
            assert await claim(db, tasks=["ocr"]) == []  # not before its backoff
        else:
            assert row["state"] == "failed"
            assert row["error"] == "timeout 3 (gave up after 3 attempts)"
    assert delays[0] == pytest.approx(10, abs=1) and delays[1] == pytest.approx(20, abs=1)


async def test_reaper_requeues_expired_leases_then_fails(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task, max_attempts) VALUES ($1, 'clip', 2)", asset)
    [job] = await claim(db, "dead-1", ["clip"], lease=timedelta(milliseconds=1))
    await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT cnai.reap_expired()") == 1
    row = await db.fetchrow("SELECT state, attempts, error, worker FROM cnai.job WHERE id = $1", job["id"])
    assert (row["state"], row["attempts"], row["worker"]) == ("queued", 1, None)
    assert "lease expired" in row["error"] and "dead-1" in row["error"]
    await claim(db, "dead-2", ["clip"], lease=timedelta(milliseconds=1))
    await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT cnai.reap_expired()") == 1
    row = await db.fetchrow("SELECT state, error FROM cnai.job WHERE id = $1", job["id"])
    assert row["state"] == "failed" and "dead-2 stopped while holding it" in row["error"]
    # a live lease is left alone
    [other] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'clip')", other)
    await claim(db, "alive", ["clip"])
    assert await db.fetchval("SELECT cnai.reap_expired()") == 0


async def test_lost_lease_is_not_written_twice(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", asset)
    [job] = await claim(db, "slow", ["ocr"], lease=timedelta(milliseconds=1))
    await asyncio.sleep(0.05)
    await db.execute("SELECT cnai.reap_expired()")
    [again] = await claim(db, "fast", ["ocr"])
    assert again["id"] == job["id"] and again["attempts"] == 2
    assert await db.fetchval("SELECT cnai.complete_jobs('slow', $1)", [job["id"]]) == []
    assert await db.fetchval("SELECT cnai.complete_jobs('fast', $1)", [job["id"]]) == [job["id"]]


async def test_release_hands_back_without_spending_an_attempt(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", asset)
    [job] = await claim(db, "stopping", ["ocr"])
    await db.execute("SELECT cnai.release_jobs('stopping', $1)", [job["id"]])
    row = await db.fetchrow("SELECT state, attempts, worker FROM cnai.job WHERE id = $1", job["id"])
    assert (row["state"], row["attempts"], row["worker"]) == ("queued", 0, None)


async def test_release_with_a_reason_waits_without_spending_an_attempt(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", asset)
    [job] = await claim(db, "w", ["ocr"])
    reason = "mapped root /mnt/immich is missing or empty (unmounted?)"
    assert await db.fetchval("SELECT cnai.release_jobs('w', $1, $2, '1 minute')", [job["id"]], reason) == [job["id"]]
    row = await db.fetchrow("SELECT state, attempts, error, extract(epoch FROM run_after - now()) AS wait "
                            "FROM cnai.job WHERE id = $1", job["id"])
    assert (row["state"], row["attempts"], row["error"]) == ("queued", 0, reason)
    assert row["wait"] == pytest.approx(60, abs=2)
    assert await claim(db, "w", ["ocr"]) == []  # not before its delay


async def test_claim_gives_the_listeners_attempt_budget(db):
    [asset] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", asset)  # column default: 5
    for attempt in (1, 2):
        await db.execute("UPDATE ONLY cnai.job SET run_after = now() WHERE state = 'queued'")
        [job] = await db.fetch("SELECT * FROM cnai.claim_jobs('w', 10, '{ocr}', '1 minute', 2)")
        await db.execute("SELECT cnai.fail_jobs('w', $1, $2, $3)", [job["id"]], ["timeout"], [False])
    row = await db.fetchrow("SELECT state, error, max_attempts FROM cnai.job WHERE id = $1", job["id"])
    assert (row["state"], row["error"], row["max_attempts"]) == ("failed", "timeout (gave up after 2 attempts)", 2)
    # the reaper, in whichever listener, keeps to the budget the claim gave
    [other] = await bare_assets(db, 1)
    await db.execute("INSERT INTO cnai.job (asset_id, task, attempts) VALUES ($1, 'ocr', 2)", other)
    await db.fetch("SELECT * FROM cnai.claim_jobs('dead', 10, '{ocr}', '1 millisecond', 3)")
    await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT cnai.reap_expired()") == 1
    assert await db.fetchval("SELECT state FROM cnai.job WHERE asset_id = $1", other) == "failed"


async def test_claim_takes_requests_first_then_shares_the_batch_among_tasks(db):
    assets = await bare_assets(db, 10)
    await db.execute("INSERT INTO cnai.job (asset_id, task) SELECT a, t FROM unnest($1::uuid[]) a, "
                     "unnest('{clip,ocr}'::text[]) t", assets)
    await request(db, assets[-1], ["face"])  # the newest asset, but a person asked
    jobs = await claim(db, limit=5)
    assert sorted(j["task"] for j in jobs) == ["clip", "clip", "face", "ocr", "ocr"]
    oldest = {t: [r[0] for r in await db.fetch("SELECT id FROM cnai.job WHERE task = $1 ORDER BY id LIMIT 2", t)]
              for t in ("clip", "ocr")}
    assert {j["id"] for j in jobs if j["task"] != "face"} == set(oldest["clip"] + oldest["ocr"])  # FIFO per task
    # one task left with work: it gets the whole batch
    await db.execute("DELETE FROM cnai.job WHERE task = 'clip' AND state = 'queued'")
    assert [j["task"] for j in await claim(db, limit=5)] == ["ocr"] * 5


async def claim_work(db, unserved: int) -> int:
    """Buffers a claim of 10 ocr jobs touches in cnai.job and its indexes, behind `unserved` queued clip and face
    jobs (CNAI_TASKS=ocr without CLIP or face models: their jobs pile up, older than the ocr ones)."""
    await db.execute("TRUNCATE asset, cnai.job CASCADE")
    assets = await bare_assets(db, unserved // 2 + 20)
    await db.execute("INSERT INTO cnai.job (asset_id, task) SELECT a, t FROM unnest($1::uuid[]) a, "
                     "unnest('{clip,face}'::text[]) t", assets[:unserved // 2])
    await db.execute("INSERT INTO cnai.job (asset_id, task) SELECT a, 'ocr' FROM unnest($1::uuid[]) a", assets)
    await db.execute("UPDATE cnai.job SET state = 'done' WHERE task = 'ocr' AND asset_id <> ALL($1)", assets[-20:])
    await db.execute("VACUUM ANALYZE cnai.job")
    for _ in range(6):  # a listener's connection claims again and again: PostgreSQL then plans it once for all
        await claim(db, tasks=["ocr"], limit=1)
    buffers = ("SELECT sum(pg_stat_get_xact_blocks_fetched(r))::bigint FROM (SELECT 'cnai.job'::regclass::oid AS r "
               "UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid = 'cnai.job'::regclass) x")
    async with db.transaction():  # (the counters hold what this backend has not reported yet: take the difference)
        before = await db.fetchval(buffers)
        jobs = await claim(db, tasks=["ocr"], limit=10)
        touched = await db.fetchval(buffers) - before
    assert len(jobs) == 10
    return touched


async def test_claim_work_does_not_grow_with_unserved_jobs(db):
    small, large = await claim_work(db, 1000), await claim_work(db, 20000)
    assert large < small * 1.5, f"a claim touched {small} buffers behind 1k unserved jobs, {large} behind 20k"


async def test_prune_removes_old_finished_jobs_only(db):
    assets = await bare_assets(db, 4)
    await db.executemany(
        "INSERT INTO cnai.job (asset_id, task, state, finished_at, error) VALUES ($1, 'ocr', $2, $3, $4)",
        [(assets[0], "done", None, None), (assets[1], "failed", None, "x"), (assets[2], "done", None, None),
         (assets[3], "queued", None, None)])
    await db.execute("UPDATE ONLY cnai.job SET finished_at = now() - interval '8 days' "
                     "WHERE asset_id = ANY($1)", assets[:2])
    await db.execute("UPDATE ONLY cnai.job SET finished_at = now() WHERE asset_id = $1", assets[2])
    assert await db.fetchval("SELECT cnai.prune_jobs('7 days')") == 2
    assert sorted(r[0] for r in await db.fetch("SELECT state FROM cnai.job")) == ["done", "queued"]


async def test_retry_failed_requeues_with_a_fresh_budget(db):
    assets = await bare_assets(db, 3)
    for a, task in ((assets[0], "ocr"), (assets[1], "clip"), (assets[2], "ocr")):
        await db.execute("INSERT INTO cnai.job (asset_id, task, state, attempts, error, finished_at) "
                         "VALUES ($1, $2, 'failed', 5, 'model missing', now())", a, task)
    await db.execute("INSERT INTO cnai.job (asset_id, task) VALUES ($1, 'ocr')", assets[2])  # already queued again
    assert await db.fetchval("SELECT cnai.retry_failed($1)", ["ocr"]) == 1
    rows = {(r["asset_id"], r["task"], r["state"]): r for r in await db.fetch("SELECT * FROM cnai.job")}
    assert rows[(assets[0], "ocr", "queued")]["attempts"] == 0
    assert (assets[1], "clip", "failed") in rows
    assert (assets[2], "ocr", "failed") in rows  # its queued twin already covers it
    assert await db.fetchval("SELECT cnai.retry_failed()") == 1
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'queued'") == 3


async def test_intake_of_deleted_assets_is_dropped(db):
    [keep, gone] = await bare_assets(db, 2)
    await db.execute(UPSERT, [keep, gone], ["preview"])
    await db.execute("DELETE FROM asset WHERE id = $1", gone)
    assert await db.fetchval("SELECT cnai.take_intake()") == 2
    assert await db.fetchval("SELECT count(DISTINCT asset_id) FROM cnai.job") == 1
    assert {j["asset_id"] for j in await claim(db)} == {keep}


# --- lock order against Immich's deletes ---------------------------------------------------------------------------
async def queue_call_meets_immich_delete(db, dsn, call: str, args: tuple, blocker_sql: str, blocker_args: tuple,
                                         gone) -> list:
    """Run a queue function while another transaction makes it wait halfway (holding the locks it took so far),
    then let Immich delete asset `gone` (`DELETE FROM asset WHERE id = $1`: the asset, then its cascades), then
    let the function go on. Returns what each side came to; a wrong lock order ends in a deadlock."""
    blocker, worker, immich = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(blocker_sql, *blocker_args)
        work = asyncio.create_task(worker.execute(call, *args))
        await until(lambda: lock_waiting(db, worker) if not work.done() else asyncio.sleep(0, True))
        delete = asyncio.create_task(immich.execute("DELETE FROM asset WHERE id = $1", gone))
        await until(lambda: lock_waiting(db, immich) if not delete.done() else asyncio.sleep(0, True))
        await tx.commit()
        return await asyncio.gather(work, delete, return_exceptions=True)
    finally:
        for c in (blocker, worker, immich):
            await c.close()


@pytest.mark.parametrize("step", ["claim", "complete", "fail", "reap", "prune"])
async def test_queue_functions_take_locks_in_immich_order(db, dsn, step):
    """Each function that locks jobs and then touches rows an asset's delete also locks (requests, their links)
    locks the assets first, or does not wait at all: Immich's delete and cnai's step follow one another."""
    [kept, gone] = await bare_assets(db, 2)
    kept_req, gone_req = await request(db, kept, ["ocr"]), await request(db, gone, ["ocr"])
    jobs = [r[0] for r in await db.fetch("SELECT id FROM cnai.job WHERE asset_id = ANY($1) ORDER BY asset_id = $2 DESC",
                                         [kept, gone], kept)]  # kept's job first: the step reaches it first
    block_request = ("SELECT FROM reprocess_request WHERE id = $1 FOR UPDATE", (kept_req,))
    if step == "claim":
        call, args = "SELECT cnai.claim_jobs('w', 10, '{ocr}', '1 minute')", ()
    else:
        await claim(db, tasks=["ocr"], lease=timedelta(milliseconds=1) if step == "reap" else LEASE)
        if step == "complete":
            call, args = "SELECT cnai.complete_jobs('w', $1)", (jobs,)
        elif step == "fail":
            call, args = "SELECT cnai.fail_jobs('w', $1, $2, $3)", (jobs, ["bad image"] * 2, [True, True])
        elif step == "reap":  # out of attempts: the reaper fails them, settling their requests
            await db.execute("UPDATE cnai.job SET max_attempts = 1 WHERE id = ANY($1)", jobs)
            await asyncio.sleep(0.05)
            call, args = "SELECT cnai.reap_expired()", ()
        else:
            await db.execute("SELECT cnai.complete_jobs('w', $1)", jobs)
            await db.execute("UPDATE cnai.job SET finished_at = now() - interval '8 days' WHERE id = ANY($1)", jobs)
            call, args = "SELECT cnai.prune_jobs('7 days')", ()
            block_request = ("SELECT FROM cnai.request_job WHERE job_id = $1 FOR UPDATE", (jobs[0],))
    outcome = await queue_call_meets_immich_delete(db, dsn, call, args, *block_request, gone)
    assert not [o for o in outcome if isinstance(o, BaseException)], outcome
    assert await db.fetchval("SELECT count(*) FROM asset WHERE id = $1", gone) == 0
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE asset_id = $1", gone) == 0
    assert await db.fetchval("SELECT count(*) FROM reprocess_request WHERE id = $1", gone_req) == 0
    expected = {"claim": ("running", "running"), "complete": ("done", "done"), "fail": ("failed", "failed"),
                "reap": ("failed", "failed"), "prune": (None, "done")}[step]
    job_state = await db.fetchval("SELECT state FROM cnai.job WHERE id = $1", jobs[0])
    req_status = await db.fetchval("SELECT status FROM reprocess_request WHERE id = $1", kept_req)
    if step == "claim":  # the claim does not wait for a request row another transaction holds
        assert job_state == "running" and req_status in ("pending", "running")
    else:
        assert (job_state, req_status) == expected


# --- the CLI over it -------------------------------------------------------------------------------------------
async def test_cli_status_and_retry(db, dsn):
    assets = await bare_assets(db, 3)
    await db.execute(UPSERT, assets[:1], ["preview"])  # clip and ocr queued (in the intake)
    for a, task, error in ((assets[1], "ocr", "preview file not found: /x.jpg"),
                           (assets[2], "ocr", "preview file not found: /x.jpg"),
                           (assets[2], "face", "face model missing: put buffalo_l in models/face")):
        await db.execute("INSERT INTO cnai.job (asset_id, task, state, attempts, error, finished_at, created_at) "
                         "VALUES ($1, $2, 'failed', 1, $3, now(), now() - interval '2 hours')", a, task, error)
    await db.execute("INSERT INTO cnai.job (asset_id, task, attempts, error, run_after) "
                     "VALUES ($1, 'clip', 0, 'mapped root /mnt/immich is missing or empty (unmounted?)', "
                     "now() + interval '30 seconds')", assets[1])
    out = await cnai("status", "--dsn", dsn)
    assert "queued again after a failure" in out
    assert "     1  clip  mapped root /mnt/immich is missing or empty (unmounted?)  (next try in" in out
    await db.execute("DELETE FROM cnai.job WHERE task = 'clip' AND error IS NOT NULL")
    out = await cnai("status", "--dsn", dsn)
    table = out.split("oldest queued:")[0]
    counts = {(ln.split()[0], ln.split()[1]): int(ln.split()[2]) for ln in table.splitlines()[1:] if ln.strip()}
    assert counts == {("clip", "queued"): 1, ("face", "failed"): 1, ("ocr", "queued"): 1, ("ocr", "failed"): 2}
    assert "oldest queued:" in out and "s ago" in out
    assert "     2  ocr   preview file not found: /x.jpg" in out
    assert "face model missing" in out
    out = await cnai("retry", "--failed", "--task", "ocr", "--dsn", dsn)
    assert "re-queued 2 failed job(s) (ocr)" in out
    assert await db.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'failed'") == 1
    out = await cnai("retry", "--failed", "--dsn", dsn)
    assert "re-queued 1 failed job(s)" in out
