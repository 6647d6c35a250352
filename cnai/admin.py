"""The administrator's queries: what `cnai reprocess`, `backfill`, `tasks`, `search`, `status`, `retry` and `doctor`
ask the database. Each takes a connection and returns data; cnai/cli.py parses, calls and prints."""
from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from inference.images import DETAIL_SEPARATOR

PINNED_SEARCH_PATH = "search_path=pg_catalog, pg_temp"
# migrate re-applies a code file only when the file changed, so repairing a database needs its record gone first
REAPPLY_TRIGGERS = "re-apply cnai's triggers: DELETE FROM cnai.migration WHERE id LIKE 'triggers/%', then `cnai migrate`"


# --- work --------------------------------------------------------------------------------------------------------
async def request_reprocess(conn: asyncpg.Connection, asset_id: str,
                            tasks: list[str] | None) -> tuple[int, list[str]]:
    """Queue a reprocess request (the trigger checks the asset and the tasks; None: the indexed tasks); returns its
    id and the tasks it runs."""
    row = await conn.fetchrow("INSERT INTO reprocess_request (asset_id, tasks) VALUES ($1::uuid, $2) "
                              "RETURNING id, tasks", asset_id, tasks)
    return row["id"], list(row["tasks"])


async def request_outcome(conn: asyncpg.Connection, request_id: int) -> tuple[str, str | None]:
    row = await conn.fetchrow("SELECT status, error FROM reprocess_request WHERE id = $1", request_id)
    return row["status"], row["error"]


async def backfill(conn: asyncpg.Connection, models: dict[str, str], force: bool) -> dict[str, int]:
    """Queue, per task, every asset the task has not run on with this install's model (`models`: task -> the
    model name its handler records); every asset with force. Counts per task."""
    return {task: await conn.fetchval("SELECT cnai.queue_missing($1, $2, $3)", task, model, force)
            for task, model in models.items()}


@dataclass
class TaskIndexing:
    task: str
    since: object | None  # when it became indexed; None: not indexed
    queued: int           # its queued jobs (the intake's counted only while indexed)


async def indexed_tasks(conn: asyncpg.Connection) -> list[str]:
    """The tasks uploads and the other background work make jobs for."""
    return list(await conn.fetchval("SELECT cnai.indexed_tasks()"))


async def task_indexing(conn: asyncpg.Connection) -> list[TaskIndexing]:
    """Every task cnai knows, whether it is indexed (since when), and its queued work."""
    rows = await conn.fetch(
        """SELECT t.task, i.since, coalesce(d.queued, 0) AS queued
             FROM unnest(cnai.all_tasks()) AS t(task)
             LEFT JOIN cnai.indexed_task i USING (task) LEFT JOIN cnai.queue_depth() d USING (task)
            ORDER BY t.task""")
    return [TaskIndexing(r["task"], r["since"], r["queued"]) for r in rows]


async def unindex_task(conn: asyncpg.Connection, task: str) -> int | None:
    """Stop indexing `task` and drop its queued background jobs; how many went (None: it was not indexed)."""
    return await conn.fetchval("SELECT cnai.unindex_task($1)", task)


async def check_task(conn: asyncpg.Connection, task: str) -> None:
    """An unknown task name is an error naming the known ones (cnai.check_task)."""
    await conn.execute("SELECT cnai.check_task($1)", task)


async def retry_failed(conn: asyncpg.Connection, tasks: list[str] | None) -> int:
    return await conn.fetchval("SELECT cnai.retry_failed($1)", tasks)


# --- search ------------------------------------------------------------------------------------------------------
async def user_ids(conn: asyncpg.Connection, emails: list[str]) -> list:
    """Immich users by e-mail; an unknown one is an error naming it."""
    rows = await conn.fetch('SELECT id, email FROM "user" WHERE email = ANY ($1)', emails)
    unknown = sorted(set(emails) - {r["email"] for r in rows})
    if unknown:
        raise LookupError(f"no Immich user with e-mail {', '.join(unknown)}")
    return [r["id"] for r in rows]


async def search(conn: asyncpg.Connection, query: str, embedding: str | None, owner_ids: list | None,
                 limit: int, marks: tuple[str, str] = ("[", "]")) -> list[asyncpg.Record]:
    """Best first, with each asset's path and the matched part of its OCR text, the match between `marks`
    (cnai.ocr_snippet; the text's start for a photo found by CLIP alone). owner_ids None: every user's photos."""
    found = ("cnai.search_all_owners($1, $2::vector, $3, 0)" if owner_ids is None
             else "cnai.search($1, $2::vector, $6, $3, 0)")
    return await conn.fetch(
        f"""SELECT s.asset_id, s.score, s.ocr_rank, s.clip_rank, a."originalPath" AS path,
                   coalesce(cnai.ocr_snippet(o.text, $1, 60, $4, $5), left(o.text, 60)) AS snippet
              FROM {found} s
              JOIN asset a ON a.id = s.asset_id LEFT JOIN cnai.ocr o ON o.asset_id = s.asset_id
             ORDER BY s.score DESC, s.asset_id""",
        query, embedding, limit, *marks, *([] if owner_ids is None else [owner_ids]))


# --- status ------------------------------------------------------------------------------------------------------
@dataclass
class QueueStatus:
    counts: list          # (task, state, n); queued includes the trigger's intake
    oldest_queued: tuple | None  # (task, age in seconds)
    expired_leases: int
    failure_reasons: list  # (task, error, n), most frequent first
    recent_failures: list  # (task, asset_id, attempts, error, the asset's file path)
    results: dict          # task -> assets with results
    waiting_reasons: list = field(default_factory=list)  # (task, error, n, seconds to the next try): queued again


async def job_counts(conn: asyncpg.Connection) -> list[tuple[str, str, int]]:
    """(task, state, n) for every state with jobs; queued includes the trigger's intake (previews not yet turned
    into jobs by a listener)."""
    rows = await conn.fetch(
        "SELECT task, state, count(*) AS n FROM cnai.job WHERE state <> 'queued' GROUP BY 1, 2 "
        "UNION ALL SELECT task, 'queued', queued FROM cnai.queue_depth() WHERE queued > 0")
    return [(r["task"], r["state"], r["n"]) for r in rows]


@dataclass
class ActiveJobs:
    counts: list          # (task, state, n) for every task, queued (the intake included) and running
    oldest_queued: dict   # task -> age in seconds of its oldest queued job, for tasks with queued work


async def active_jobs(conn: asyncpg.Connection) -> ActiveJobs:
    """Queued and running jobs per task, and each task's oldest queued age, for `/metrics` (read every few seconds):
    through the queued and running jobs' partial indexes only, so its cost follows the work waiting, not the
    finished history cnai.job keeps for a week (job_counts reads that, for `cnai status`)."""
    rows = await conn.fetch(
        """SELECT d.task, d.queued,
                  (SELECT count(*) FROM cnai.job j WHERE j.state = 'running' AND j.task = d.task) AS running,
                  extract(epoch FROM now() - d.oldest)::float8 AS age
             FROM cnai.queue_depth() d ORDER BY d.task""")
    return ActiveJobs([(r["task"], state, r[state]) for r in rows for state in ("queued", "running")],
                      {r["task"]: r["age"] for r in rows if r["age"] is not None})


async def oldest_queued_ages(conn: asyncpg.Connection) -> dict[str, float]:
    """Per task with queued work, the age in seconds of its oldest queued job (or intake row)."""
    rows = await conn.fetch("SELECT task, extract(epoch FROM now() - oldest)::float8 AS age FROM cnai.queue_depth() "
                            "WHERE oldest IS NOT NULL")
    return {r["task"]: r["age"] for r in rows}


async def expired_leases(conn: asyncpg.Connection) -> int:
    """Jobs still running past their lease: their listener stopped, and a reaper will re-queue them."""
    return await conn.fetchval("SELECT count(*) FROM cnai.job WHERE state = 'running' AND lease_until < now()")


@dataclass
class MinuteThroughput:
    minute: object        # the minute's start (timestamptz)
    finished: dict        # task -> jobs that finished (done or failed) in that minute
    failed: int           # of them, failed (all tasks)


async def throughput(conn: asyncpg.Connection, minutes: int) -> list[MinuteThroughput]:
    """Jobs finished per minute over the last `minutes` whole minutes and the current one, oldest first; a quiet
    minute is there with nothing in it (cnai.job keeps finished jobs for a week before pruning)."""
    rows = await conn.fetch(
        """WITH m AS (SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1),
                                             date_trunc('minute', now()), interval '1 minute') AS minute)
           SELECT m.minute, j.task, count(j.id) AS n, count(j.id) FILTER (WHERE j.state = 'failed') AS failed
             FROM m LEFT JOIN cnai.job j
               ON j.state IN ('done', 'failed') AND j.finished_at >= m.minute
              AND j.finished_at < m.minute + interval '1 minute'
            GROUP BY 1, 2 ORDER BY 1, 2""", minutes)
    by_minute: dict = {}
    for r in rows:
        entry = by_minute.setdefault(r["minute"], MinuteThroughput(r["minute"], {}, 0))
        if r["task"] is not None:
            entry.finished[r["task"]] = r["n"]
            entry.failed += r["failed"]
    return list(by_minute.values())


async def queue_status(conn: asyncpg.Connection, failed_limit: int) -> QueueStatus:
    counts = await job_counts(conn)
    ages = await oldest_queued_ages(conn)
    oldest = min(ages.items(), key=lambda ta: (-ta[1], ta[0]), default=None)
    expired = await expired_leases(conn)
    # grouped by the reason, without the file it is about (after DETAIL_SEPARATOR): one line per cause
    reasons = await conn.fetch(
        "SELECT task, split_part(error, $2, 1) AS error, count(*) AS n, max(finished_at) AS last FROM cnai.job "
        "WHERE state = 'failed' GROUP BY 1, 2 ORDER BY n DESC, last DESC LIMIT $1", failed_limit, DETAIL_SEPARATOR)
    failed = await conn.fetch(
        """SELECT j.task, j.asset_id, j.attempts, j.error, j.finished_at, a."originalPath" AS path
             FROM cnai.job j LEFT JOIN public.asset a ON a.id = j.asset_id
            WHERE j.state = 'failed' ORDER BY j.finished_at DESC NULLS LAST LIMIT $1""", failed_limit)
    # queued again after a failure that may pass (backoff, an unmounted root): what they wait for
    waiting = await conn.fetch(
        "SELECT task, split_part(error, $2, 1) AS error, count(*) AS n, "
        "greatest(extract(epoch FROM min(run_after) - now()), 0)::float8 AS next "
        "FROM cnai.job WHERE state = 'queued' AND error IS NOT NULL GROUP BY 1, 2 ORDER BY n DESC LIMIT $1",
        failed_limit, DETAIL_SEPARATOR)
    results = await conn.fetchrow("SELECT (SELECT count(*) FROM cnai.ocr) AS ocr, "
                                  "(SELECT count(*) FROM cnai.clip) AS clip, "
                                  "(SELECT count(DISTINCT asset_id) FROM cnai.face) AS face")
    return QueueStatus(
        counts=counts,
        oldest_queued=oldest,
        expired_leases=expired,
        failure_reasons=[(r["task"], r["error"], r["n"]) for r in reasons],
        recent_failures=[(r["task"], r["asset_id"], r["attempts"], r["error"], r["path"]) for r in failed],
        results=dict(results),
        waiting_reasons=[(r["task"], r["error"], r["n"], r["next"]) for r in waiting])


# --- doctor ------------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    ok: bool
    subject: str
    detail: str
    trigger: str | None = None  # the trigger it is about, if any
    warning: bool = False  # not ok, but cnai works on without it


async def check_database(conn: asyncpg.Connection) -> list[Finding]:
    """cnai's triggers, then whether they enqueue; a trigger already found broken is not reported twice."""
    findings = await check_triggers(conn)
    if any(f.detail.startswith("missing") for f in findings):
        return findings  # not (fully) migrated: nothing to try
    broken = {f.trigger for f in findings if not f.ok}
    return findings + [f for f in await check_enqueue(conn) if f.trigger not in broken]


async def check_zhparser(conn: asyncpg.Connection) -> Finding:
    """What zhparser does for search (cnai.zhparser_state): absent or used is fine; installed but unusable is a
    warning, as search then works on bigrams alone."""
    row = await conn.fetchrow("SELECT state, detail FROM cnai.zhparser_state()")
    ok = row["state"] in ("absent", "used")
    return Finding(ok, "zhparser", f"{row['state']}: {row['detail']}", warning=not ok)


# The triggers cnai puts on tables that others write (Immich's, and reprocess_request, written from psql):
# (table, trigger, function it must run).
TRIGGERS = (
    ("public.asset_file", "cnai_enqueue_preview_insert", "cnai.enqueue_preview_files"),
    ("public.asset_file", "cnai_enqueue_preview_update", "cnai.enqueue_preview_files"),
    ("public.asset", "cnai_follow_asset_visibility", "cnai.follow_asset_visibility"),
    ("public.asset", "cnai_ocr_follow_owner", "cnai.ocr_follow_owner"),
    ("cnai.ocr", "cnai_ocr_take_owner", "cnai.ocr_take_owner"),
    ("public.reprocess_request", "cnai_check_reprocess_request", "cnai.check_reprocess_request"),
    ("public.reprocess_request", "cnai_enqueue_reprocess_requests", "cnai.enqueue_reprocess_requests"),
)
# The ones that turn Immich's own reprocess buttons into cnai re-runs: attached only where Immich has the table
# (sql/triggers/code/130_immich_reruns.sql).
IMMICH_RERUN_TRIGGERS = tuple(
    [("public.smart_search", f"cnai_follow_smart_search_{event}", "cnai.follow_immich_smart_search")
     for event in ("insert", "update", "delete", "truncate")]
    + [("public.asset_job_status", f"cnai_follow_job_status_{event}", "cnai.follow_immich_job_status")
       for event in ("insert", "update")])


async def database_summary(conn: asyncpg.Connection) -> tuple[str, int]:
    """(server version, cnai migrations applied)."""
    version = await conn.fetchval("SHOW server_version")
    applied = await conn.fetchval(
        "SELECT CASE WHEN to_regclass('cnai.migration') IS NULL THEN 0 "
        "ELSE (SELECT count(*) FROM cnai.migration) END")
    return version, applied


async def check_triggers(conn: asyncpg.Connection) -> list[Finding]:
    """Each of cnai's triggers exists, is enabled, runs its function, and that function is SECURITY DEFINER with
    the pinned search_path (it runs inside other roles' statements)."""
    rows = {(r["tbl"], r["tgname"]): r for r in await conn.fetch(
        """SELECT t.tgrelid::regclass::text AS tbl, t.tgname, t.tgenabled::text AS enabled,
                  t.tgfoid::regproc::text AS function, p.prosecdef AS security_definer,
                  coalesce(p.proconfig, '{}') AS config
             FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
            WHERE NOT t.tgisinternal AND t.tgname LIKE 'cnai\\_%'""")}
    absent = {r[0] for r in await conn.fetch("SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NULL",
                                             sorted({table for table, _, _ in IMMICH_RERUN_TRIGGERS}))}
    told: set[str] = set()
    findings = []
    for table, name, function in TRIGGERS + IMMICH_RERUN_TRIGGERS:
        bare = table.removeprefix("public.")  # regclass prints public tables unqualified
        row = rows.get((bare, name)) or rows.get((table, name))
        subject = f"trigger {name} on {bare}"
        if row is None and table in absent:
            if table not in told:
                told.add(table)
                findings.append(Finding(True, f"triggers on {bare}", f"not attached: this Immich has no table "
                                        f"{bare}, so its own reprocess buttons for it do not reach cnai", name))
            continue
        if row is None:
            findings.append(Finding(False, subject, f"missing: {REAPPLY_TRIGGERS}", name))
            continue
        problems = []
        if row["enabled"] == "D":
            problems.append(f"disabled: ALTER TABLE {bare} ENABLE TRIGGER {name}")
        elif row["enabled"] == "R":
            problems.append(f"fires only in replica sessions: ALTER TABLE {bare} ENABLE TRIGGER {name}")
        if row["function"] != function:
            problems.append(f"runs {row['function']} instead of {function}")
        if not row["security_definer"]:
            problems.append(f"{row['function']} is not SECURITY DEFINER")
        if PINNED_SEARCH_PATH not in row["config"]:
            problems.append(f"{row['function']} has no pinned search_path ({PINNED_SEARCH_PATH})")
        if problems and not problems[-1].startswith(("disabled", "fires only")):
            problems.append(REAPPLY_TRIGGERS)
        findings.append(Finding(not problems, subject,
                                "; ".join(problems) or "enabled, SECURITY DEFINER, search_path pinned", name))
    return findings


async def check_enqueue(conn: asyncpg.Connection) -> list[Finding]:
    """Write an existing preview row again as Immich would, as asset_file's owner: once its path to itself (the
    update trigger), once the row anew (the insert trigger); each must land in cnai.job_intake. All rolled back."""
    preview = await conn.fetchrow(
        """SELECT f.id, f."assetId" AS asset_id FROM public.asset_file f JOIN public.asset a ON a.id = f."assetId"
            WHERE f.type::text = 'preview' AND NOT f."isEdited"
              AND cnai.asset_skip_reason(a.visibility::text, a."deletedAt") IS NULL
            LIMIT 1""")
    if preview is None:
        return [Finding(True, "enqueue", "not tried: no preview in asset_file yet (Immich has rendered none)")]
    owner = await conn.fetchval("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' "
                                "AND tablename = 'asset_file'")
    writes = (
        ("cnai_enqueue_preview_update", "re-writing its path", "UPDATE public.asset_file SET path = path WHERE id = $1"),
        ("cnai_enqueue_preview_insert", "inserting it anew",
         "WITH gone AS (DELETE FROM public.asset_file WHERE id = $1 RETURNING *) "
         "INSERT INTO public.asset_file SELECT * FROM gone"),
    )
    findings = []
    tx = conn.transaction()
    await tx.start()
    try:
        writer = owner if await _may_act_as(conn, owner) else await conn.fetchval("SELECT current_user")
        for trigger, how, statement in writes:
            subject = f"enqueue via {trigger}"
            before = await conn.fetchval("SELECT count(*) FROM cnai.job_intake WHERE asset_id = $1",
                                         preview["asset_id"])
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL ROLE {_quote_ident(writer)}")
                    await conn.execute(statement, preview["id"])
                    await conn.execute("RESET ROLE")
            except asyncpg.PostgresError as e:
                findings.append(Finding(False, subject, f"{how} as {writer} failed: {e}", trigger))
                continue
            gained = await conn.fetchval("SELECT count(*) FROM cnai.job_intake WHERE asset_id = $1",
                                         preview["asset_id"]) - before
            findings.append(Finding(gained > 0, subject, f"{how} as {writer} queued the preview" if gained else
                                    f"{how} as {writer} queued nothing (look for a cnai WARNING in the server log)",
                                    trigger))
    finally:
        await tx.rollback()
    return findings


async def _may_act_as(conn: asyncpg.Connection, role: str) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {_quote_ident(role)}")
            await conn.execute("RESET ROLE")
        return True
    except asyncpg.InsufficientPrivilegeError:
        return False


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
