"""What the status page (`GET /status`, gateway/status_page.py) reads from cnai's database, and its one write:
re-queueing failed jobs. Given to the page by the composition root, so the gateway itself writes no database.
Every query is admin.py's; each call is bounded by a timeout, so a database that is away makes a line on the page,
never a hang."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from . import admin

THROUGHPUT_MINUTES = 10
FAILURE_LIMIT = 20
SEARCH_LIMIT = 20
# cnai.ocr_snippet's own marks: the page escapes the snippet, then turns these into <mark>
MARKS = ("«", "»")


class StatusUnavailable(Exception):
    """cnai's database could not answer (down, unreachable, too slow, or not migrated)."""


@dataclass
class StatusOverview:
    queue: admin.QueueStatus
    throughput: list[admin.MinuteThroughput]


@dataclass
class SearchHit:
    asset_id: object
    path: str
    score: float
    snippet: str | None  # the matched part of its OCR text, the match between MARKS


class StatusDatabase:
    def __init__(self, dsn: str, timeout_s: float = 10.0):
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _run(self, what: str, work):
        try:
            async with self._pool_lock:
                if self._pool is None:
                    # min_size=0: nothing connects before the page is first opened
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=0, max_size=2, timeout=self.timeout_s, command_timeout=self.timeout_s,
                        server_settings={"application_name": "cnai-status"})
            async with self._pool.acquire(timeout=self.timeout_s) as conn:
                return await work(conn)
        except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError) as e:
            raise StatusUnavailable(f"cnai's database could not {what}: {type(e).__name__}: {e}") from None
        except asyncpg.PostgresError as e:
            if isinstance(e, asyncpg.InvalidParameterValueError):  # cnai refused the input (an unknown task)
                raise ValueError(str(e)) from None
            raise StatusUnavailable(f"cnai's database could not {what}: {type(e).__name__}: {e}") from None

    async def overview(self) -> StatusOverview:
        async def work(conn):
            return StatusOverview(await admin.queue_status(conn, FAILURE_LIMIT),
                                  await admin.throughput(conn, THROUGHPUT_MINUTES))
        return await self._run("read the queue", work)

    async def search(self, query: str) -> list[SearchHit]:
        """Every user's photos, as `cnai search` without --user: the page is the operator's."""
        async def work(conn):
            rows = await admin.search(conn, query, None, None, SEARCH_LIMIT, marks=MARKS)
            return [SearchHit(r["asset_id"], r["path"], r["score"], r["snippet"]) for r in rows]
        return await self._run("search", work)

    async def retry(self, task: str | None) -> int:
        """Failed jobs (of `task`, or all) queued again; how many. An unknown task is a ValueError naming it."""
        async def work(conn):
            if task is not None:
                await admin.check_task(conn, task)
            return await admin.retry_failed(conn, [task] if task else None)
        return await self._run("re-queue failed jobs", work)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
