"""Every query the listener sends, each a named call of one SQL function (sql/queue/code/110_queue_ops.sql).

Reading this file tells every way the listener moves a job. The listener decides when; the functions hold the
queue's rules (leases, coalescing, backoff, requests, lock order against Immich's deletes). Each call takes the
connection to run on, so the caller chooses the transaction: the settle calls share one with the result writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

CHANNEL = "cnai_job"  # NOTIFY channel of the enqueue triggers: a wake-up hint only
PRUNE_CHUNK = 10_000   # finished jobs deleted per transaction


@dataclass
class Claimed:
    id: int
    asset_id: object
    task: str
    attempts: int


@dataclass(frozen=True)
class JobQueue:
    worker: str               # whose leases these are
    lease_s: float
    max_attempts: int
    backoff_base_s: float

    async def index_tasks(self, conn: asyncpg.Connection, tasks: list[str]) -> list[str]:
        """From now on uploads (and the rest of the background work) make jobs for these tasks too; returns the
        ones that were not indexed before. Idempotent."""
        return list(await conn.fetchval("SELECT cnai.index_tasks($1)", tasks))

    async def claim(self, conn: asyncpg.Connection, tasks: list[str], limit: int) -> list[Claimed]:
        rows = await conn.fetch("SELECT * FROM cnai.claim_jobs($1, $2, $3, $4, $5)", self.worker, limit, tasks,
                                timedelta(seconds=self.lease_s), self.max_attempts)
        return [Claimed(r["id"], r["asset_id"], r["task"], r["attempts"]) for r in rows]

    async def preview_paths(self, conn: asyncpg.Connection, asset_ids: list) -> dict:
        """Per asset: (the preview Immich's own job would read, None) or (None, why cnai does not work on it)."""
        rows = await conn.fetch("SELECT asset_id, path, skip_reason FROM cnai.job_preview_paths($1::uuid[])",
                                list(set(asset_ids)))
        return {r["asset_id"]: (r["path"], r["skip_reason"]) for r in rows}

    # --- settling: call these inside the transaction that writes the results --------------------------------
    async def complete(self, conn: asyncpg.Connection, ids: list[int]) -> set[int]:
        """Marks done the jobs still held; returns them. Write only their results, in the same transaction."""
        return set(await conn.fetchval("SELECT cnai.complete_jobs($1, $2)", self.worker, ids))

    async def fail(self, conn: asyncpg.Connection, ids: list[int], errors: list[str],
                   permanent: list[bool]) -> set[int]:
        """Permanent errors and spent budgets end 'failed'; the rest retry with backoff. Returns the ids held."""
        return set(await conn.fetchval("SELECT cnai.fail_jobs($1, $2, $3, $4, $5)", self.worker, ids, errors,
                                       permanent, timedelta(seconds=self.backoff_base_s)))

    async def release(self, conn: asyncpg.Connection, ids: list[int], reason: str | None = None,
                      delay_s: float = 0) -> set[int]:
        """Hands jobs back without spending an attempt (with the reason they wait, if any). Returns the ids held."""
        return set(await conn.fetchval("SELECT cnai.release_jobs($1, $2, $3, $4)", self.worker, ids, reason,
                                       timedelta(seconds=delay_s)))

    # --- upkeep -------------------------------------------------------------------------------------------------
    async def renew(self, conn: asyncpg.Connection, ids: list[int]) -> set[int]:
        """Extends the leases; returns the ids still held."""
        rows = await conn.fetch("SELECT cnai.renew_leases($1, $2, $3)", self.worker, ids,
                                timedelta(seconds=self.lease_s))
        return {r[0] for r in rows}

    async def reap(self, conn: asyncpg.Connection) -> int:
        """Re-queues (or fails, when out of attempts) jobs whose lease expired: their holder died."""
        return await conn.fetchval("SELECT cnai.reap_expired()")

    async def prune(self, conn: asyncpg.Connection, older_than_s: float) -> int:
        """Deletes finished jobs older than that, a chunk per transaction; returns how many."""
        total = 0
        while True:
            n = await conn.fetchval("SELECT cnai.prune_jobs($1, $2)", timedelta(seconds=older_than_s), PRUNE_CHUNK)
            total += n
            if n < PRUNE_CHUNK:
                return total

    async def ping(self, conn: asyncpg.Connection) -> None:
        await conn.fetchval("SELECT 1")

