"""The front's only uses of cnai's database: `cnai.search` with the owners Immich named, whether cnai.clip holds the
CLIP model the front would embed a query with, and — for the front door's reprocess buttons — reprocess requests for
the assets Immich just let the caller regenerate, or every asset queued for the indexed tasks after an
administrator's "Generate Thumbnails → All". Bounded by a timeout everywhere, so a database that is down makes a
quick 503 (or a logged warning), never a hang."""
from __future__ import annotations

import asyncio
import time

import asyncpg

# cnai.search's own bound on `lim` (sql/search/code/210_search.sql)
SEARCH_MAX_LIMIT = 1000
CLIP_MODEL_CHECK_EVERY_S = 60.0

SEARCH = """SELECT asset_id FROM cnai.search($1, $2::vector, $3::uuid[], $4, $5, visibilities => $6::text[],
                                            locked_owner => $7::uuid, clip_model => $8)"""
# the indexed tasks (tasks NULL), ahead of background work; the check trigger refuses hidden, trashed and unknown assets
REPROCESS_EACH = "INSERT INTO reprocess_request (asset_id) SELECT unnest($1::uuid[])"
REPROCESS_ONE = "INSERT INTO reprocess_request (asset_id) VALUES ($1::uuid)"
QUEUE_EVERY_ASSET = "SELECT cnai.queue_missing($1, $2, true)"
# a library-wide run is background work: the tasks cnai indexes, not every task it could run
INDEXED_TASKS = "SELECT cnai.indexed_tasks()"
# one task over a whole library (hundreds of thousands of rows) takes far longer than a search may
QUEUE_EVERY_ASSET_TIMEOUT_S = 600.0


class DatabaseUnavailable(Exception):
    """cnai's database could not answer (down, unreachable, too slow, or not migrated)."""


class FrontDatabase:
    def __init__(self, dsn: str, timeout_s: float, max_connections: int = 8):
        self.dsn = dsn
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._clip_models: dict[str, tuple[bool, float]] = {}

    async def _acquire(self):
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    # min_size=0: nothing connects before the first search, so the service starts without its DB
                    self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=self.max_connections,
                                                           timeout=self.timeout_s, command_timeout=self.timeout_s)
        return self._pool.acquire(timeout=self.timeout_s)

    async def _run(self, what: str, work):
        try:
            async with await self._acquire() as conn:
                return await work(conn)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise DatabaseUnavailable(f"cnai's database could not {what}: {type(e).__name__}: {e}") from None

    async def search(self, text: str, embedding: str | None, owner_ids: list[str], visibilities: list[str] | None,
                     locked_owner: str | None, clip_model: str | None, size: int, offset: int
                     ) -> tuple[list, bool]:
        """One page of asset ids, best first, and whether another page follows (Immich's `size + 1` rule)."""
        async def work(conn):
            ask = min(size + 1, SEARCH_MAX_LIMIT)
            rows = await conn.fetch(SEARCH, text, embedding, owner_ids, ask, offset, visibilities, locked_owner,
                                    clip_model)
            ids = [r["asset_id"] for r in rows]
            if len(ids) > size:
                return ids[:size], True
            if len(ids) == size == ask:  # a page of cnai.search's largest size: ask for the one after it
                more = await conn.fetch(SEARCH, text, embedding, owner_ids, 1, offset + size, visibilities,
                                        locked_owner, clip_model)
                return ids, bool(more)
            return ids, False
        return await self._run("search", work)

    async def has_clip_model(self, clip_model: str) -> bool:
        """Whether cnai.clip holds embeddings of `clip_model`; remembered for a minute (it changes with indexing)."""
        known = self._clip_models.get(clip_model)
        if known and time.monotonic() - known[1] < CLIP_MODEL_CHECK_EVERY_S:
            return known[0]
        found = await self._run("check its CLIP embeddings",
                                lambda conn: conn.fetchval("SELECT cnai.clip_has_model($1)", clip_model))
        self._clip_models[clip_model] = (bool(found), time.monotonic())
        return bool(found)

    async def file_reprocess_requests(self, asset_ids: list[str]) -> list[str]:
        """A reprocess request for the indexed tasks of each asset, all in one statement; where the check trigger
        refuses one (hidden, trashed, unknown), one statement per asset, so the others still go in. Returns why each refused
        asset was refused. Written only for assets Immich has just let the caller regenerate: Immich did the access
        check, cnai reads nothing of theirs."""
        async def work(conn):
            try:
                await conn.execute(REPROCESS_EACH, asset_ids)
                return []
            except asyncpg.IntegrityConstraintViolationError:
                pass
            refused = []
            for asset_id in asset_ids:
                try:
                    await conn.execute(REPROCESS_ONE, asset_id)
                except asyncpg.IntegrityConstraintViolationError as e:
                    refused.append(str(e))
            return refused
        return await self._run("file reprocess requests", work)

    async def queue_every_asset(self, task_models: dict[str, str]) -> dict[str, int]:
        """Every indexed task for every asset cnai works on, in the background (priority 1), as `cnai backfill
        --force` does; `task_models`: task -> the model name its handler records. How many jobs each task added."""
        async def work(conn):
            indexed = set(await conn.fetchval(INDEXED_TASKS))
            return {task: await conn.fetchval(QUEUE_EVERY_ASSET, task, model, timeout=QUEUE_EVERY_ASSET_TIMEOUT_S)
                    for task, model in task_models.items() if task in indexed}
        return await self._run("queue every asset", work)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
