"""The listener: wakes on NOTIFY or its poll timer, claims batches under a lease, runs them, writes results.

Guarantees (see DESIGN.md): notifications are hints (it polls, and catches up on every (re)connect); a job it
claims is leased and the lease renewed while it works; if it dies, the reaper in any listener re-queues the job
once the lease expires; results and job completion commit in one transaction, after checking it still holds
the job; SIGTERM finishes the batch in hand (up to a grace period) and hands back the rest at once, without
spending their attempts. Its queries are in listener/queue.py.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from inference import images
from inference.cache import content_digest
from inference.images import DETAIL_SEPARATOR, ImageDecodeError
from inference.pool import ModelPool, Priority
from inference.repeated_errors import RepeatedErrorLog
from inference.runtime import ModelMissingError

from .errors import PermanentJobError, StorageUnavailableError
from .paths import map_path
from .queue import CHANNEL, Claimed, JobQueue
from .tasks import TaskHandler

log = logging.getLogger(__name__)

# Errors that say "the database is away or busy", not "this result is wrong": lost or refused connections, a
# server shutting down or starting up, too many clients, deadlock/serialization. Worth retrying as they are.
TRANSIENT_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
                    asyncpg.exceptions.TransactionRollbackError)


def is_transient(e: BaseException) -> bool:
    return isinstance(e, TRANSIENT_ERRORS)


@dataclass
class ListenerConfig:
    tasks: list[str]
    path_map: list = field(default_factory=list)
    batch_size: int = 16
    concurrency: int = 2          # batches in flight at once
    poll_interval_s: float = 2.0
    lease_s: float = 60.0
    max_attempts: int = 5
    backoff_base_s: float = 5.0
    grace_s: float = 8.0          # SIGTERM: how long the batch in hand may take to finish before it is handed back
    prune_after_s: float = 7 * 86400
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**4):04x}")


# What running one job came to.
@dataclass
class Done:
    size: tuple[int, int]  # the decoded preview's (width, height), which face boxes are measured on
    output: Any


@dataclass
class Failed:
    error: str
    permanent: bool


@dataclass
class Deferred:  # its storage is away: it waits, without spending an attempt
    error: StorageUnavailableError


class Listener:
    def __init__(self, dsn: str, pool: ModelPool, handlers: dict[str, TaskHandler], config: ListenerConfig):
        self.dsn = dsn
        self.pool = pool
        self.handlers = handlers
        self.config = config
        self.worker = config.worker_id
        self.queue = JobQueue(self.worker, config.lease_s, config.max_attempts, config.backoff_base_s)
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.held: set[int] = set()
        self.missing_roots: set[Path] = set()  # while any is missing, nothing is claimed
        self.db: asyncpg.Pool | None = None
        self.processed = 0
        # read by the metrics page: settled jobs by (task, outcome: done|failed|retried|deferred), jobs this
        # listener's reaper found with an expired lease, and jobs whose lease this listener lost while working
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lease_expiries = 0
        self.leases_lost = 0
        self.repeated_errors = RepeatedErrorLog(log)
        self.connected = asyncio.Event()
        self._handing_back: set[asyncio.Task] = set()
        unknown = set(config.tasks) - set(handlers)
        if unknown:
            raise ValueError(f"no handler for task(s) {sorted(unknown)}")

    # --- lifecycle --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("listener %s starting (tasks %s)", self.worker, ",".join(self.config.tasks))
        self.db = await self._connect_pool()
        await self._index_tasks()
        aux = [asyncio.create_task(self._listen_forever(), name="listen"),
               asyncio.create_task(self._maintain_forever(), name="maintain"),
               asyncio.create_task(self._renew_forever(), name="renew")]
        workers = [asyncio.create_task(self._work_forever(i), name=f"worker-{i}")
                   for i in range(self.config.concurrency)]
        try:
            await self.stopping.wait()
            log.info("listener %s stopping: finishing the batch in hand (up to %.0f s)", self.worker,
                     self.config.grace_s)
            done, pending = await asyncio.wait(workers, timeout=self.config.grace_s)
            for t in pending:
                t.cancel()  # a cancelled batch hands its jobs back (_process)
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for t in aux + workers:
                t.cancel()
            await asyncio.gather(*aux, *workers, return_exceptions=True)
            await asyncio.gather(*self._handing_back, return_exceptions=True)
            if self.held:
                await self._release(list(self.held))
            await self.db.close()
            log.info("listener %s stopped", self.worker)

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()

    async def _connect_pool(self) -> asyncpg.Pool:
        delay = 0.5
        while True:
            try:
                return await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.config.concurrency + 2,
                                                 command_timeout=120)
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
                if self.stopping.is_set():
                    raise
                log.warning("database not reachable (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def _index_tasks(self) -> None:
        """Background work (uploads, Immich's re-runs) makes jobs for the tasks some listener serves: add ours, once
        at start (before the first claim: the intake it takes then makes their jobs). Nothing takes a task out again
        but `cnai tasks --drop`."""
        delay = 0.5
        while True:
            try:
                async with self.db.acquire() as conn:
                    added = await self.queue.index_tasks(conn, list(self.config.tasks))
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as e:
                if self.stopping.is_set():
                    return
                log.warning("could not add tasks %s to cnai.indexed_task (%s); retrying in %.1f s",
                            ",".join(self.config.tasks), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
        for task in added:
            log.info("task %s is indexed from now on: new photos get %s jobs; `cnai backfill --task %s` queues the "
                     "photos already there", task, task, task)

    # --- LISTEN: a dedicated connection that never sits in a transaction ---------------------------------------
    async def _listen_forever(self) -> None:
        delay = 0.5
        while not self.stopping.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(CHANNEL, lambda *_: self.wakeup.set())
                delay = 0.5
                self.connected.set()
                self.wakeup.set()  # catch up: anything queued while we weren't listening
                while not lost.is_set() and not self.stopping.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=10)
                    except asyncio.TimeoutError:
                        await self.queue.ping(conn)  # notice a dead connection even when idle
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", e, delay)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not self.stopping.is_set():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    # --- maintenance: reaper and pruning ------------------------------------------------------------------------
    async def _maintain_forever(self) -> None:
        last_prune = 0.0
        while True:
            try:
                async with self.db.acquire() as conn:
                    reaped = await self.queue.reap(conn)
                    if reaped:
                        self.lease_expiries += reaped
                        log.warning("re-queued %d job(s) whose lease expired", reaped)
                        self.wakeup.set()
                    if time.monotonic() - last_prune > 600:
                        pruned = await self.queue.prune(conn, self.config.prune_after_s)
                        last_prune = time.monotonic()
                        if pruned:
                            log.info("pruned %d finished job(s)", pruned)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("maintenance failed: %s", e)
            await asyncio.sleep(max(self.config.poll_interval_s, min(self.config.lease_s / 4, 5)))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            if not self.held:
                continue
            try:
                asked = set(self.held)
                async with self.db.acquire() as conn:
                    kept = await self.queue.renew(conn, list(asked))
                lost = (asked - kept) & self.held  # a batch that settled meanwhile let go of its jobs itself
                if lost:
                    self.leases_lost += len(lost)
                    log.warning("lost the lease on %d job(s); their results will not be written", len(lost))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease renewal failed: %s", e)

    # --- work ---------------------------------------------------------------------------------------------------
    async def _work_forever(self, index: int) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()  # before claiming, so a NOTIFY during the claim is not lost
            jobs = []
            if await self._storage_ready():
                try:
                    jobs = await self._claim()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("claim failed: %s", e)
                    await asyncio.sleep(min(self.config.poll_interval_s, 1.0))
            if not jobs:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=self.config.poll_interval_s)
                except asyncio.TimeoutError:
                    pass
                continue
            self.wakeup.set()  # there may be more: let a sibling worker claim in parallel
            try:
                await self._process(jobs)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # e.g. the database went away mid-batch: the jobs' leases lapse and the reaper re-queues them
                log.warning("batch of %d job(s) abandoned: %s", len(jobs), e)
                await asyncio.sleep(min(self.config.poll_interval_s, 1.0))

    async def _claim(self) -> list[Claimed]:
        async with self.db.acquire() as conn:
            jobs = await self.queue.claim(conn, self.config.tasks, self.config.batch_size)
        self.held.update(j.id for j in jobs)
        return jobs

    async def _process(self, jobs: list[Claimed]) -> None:
        try:
            paths = await self._preview_paths([j.asset_id for j in jobs])
            # one read per preview, and at most one decode, shared by the asset's clip/ocr/face jobs
            previews: dict = {}
            gone = (None, "asset no longer exists")
            outcomes = await asyncio.gather(*(self._run_job(j, paths.get(j.asset_id, gone), previews)
                                              for j in jobs))
            await self._settle(jobs, outcomes)
        except asyncio.CancelledError:
            # the stop's grace period ran out: hand the batch back now rather than when its leases expire
            await self._hand_back([j.id for j in jobs])
            raise
        finally:
            self.held.difference_update(j.id for j in jobs)

    async def _hand_back(self, ids: list[int]) -> None:
        """Release the jobs even if the caller is cancelled again: run() waits for it before closing the pool."""
        task = asyncio.ensure_future(self._release(ids))
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)
        await asyncio.shield(task)

    async def _preview_paths(self, asset_ids: list) -> dict:
        return await self._retry_transient("reading preview paths", self._preview_paths_once, asset_ids)

    async def _retry_transient(self, what: str, fn, *args, attempts: int = 6):
        """Run fn, retrying while the database is away (0.2 s doubling to 5 s, about 11 s in all)."""
        delay = 0.2
        for attempt in range(attempts):
            try:
                return await fn(*args)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not is_transient(e) or attempt == attempts - 1:
                    raise
                log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def _preview_paths_once(self, asset_ids: list) -> dict:
        async with self.db.acquire() as conn:
            return await self.queue.preview_paths(conn, asset_ids)

    async def _run_job(self, job: Claimed, preview_path: tuple, previews: dict) -> Done | Failed | Deferred:
        handler = self.handlers[job.task]
        path, skip_reason = preview_path
        try:
            if path is None:
                raise PermanentJobError(skip_reason)
            local = map_path(path, self.config.path_map)
            if local not in previews:
                previews[local] = asyncio.get_running_loop().run_in_executor(
                    None, read_preview, local, mapped_root(local, self.config.path_map))
            preview = await asyncio.shield(previews[local])
            # named by the file's bytes: a result the gateway computed for Immich's request answers this job, and
            # then the preview is not decoded at all (the request's content is left out: only its options count)
            found, output = self.pool.stored_result(handler.model_key, handler.request(None), preview.digest)
            if found:
                return Done(await preview.size(), output)
            image = await preview.image()
            output = await self.pool.run(handler.model_key, handler.request(image), Priority.BACKGROUND,
                                         content=preview.digest)
            return Done(image.size, output)
        except asyncio.CancelledError:
            raise
        except StorageUnavailableError as e:
            self._storage_missing(e.root)
            return Deferred(e)
        except ModelMissingError as e:
            # every job of the task fails alike until the model is installed: said once a minute, not per job
            self.repeated_errors.error(f"missing:{handler.model_key}", "%s jobs fail: %s", job.task, e)
            return Failed(str(e), True)
        except PermanentJobError as e:
            return Failed(str(e), True)
        except Exception as e:
            log.exception("job %s (%s) failed", job.id, job.task)
            return Failed(f"{type(e).__name__}: {e}", False)

    # --- storage outages: wait for the mapped root instead of failing every job ----------------------------------
    def _storage_missing(self, root: Path) -> None:
        if root not in self.missing_roots:
            self.missing_roots.add(root)
            log.warning("mapped root %s is missing or empty (unmounted?): its jobs wait without spending attempts, "
                        "and this listener claims nothing until it is back", root)

    async def _storage_ready(self) -> bool:
        for root in list(self.missing_roots):
            if not await asyncio.get_running_loop().run_in_executor(None, root_is_missing, root):
                self.missing_roots.discard(root)
                log.warning("mapped root %s is back: claiming again", root)
        return not self.missing_roots

    # --- settling -----------------------------------------------------------------------------------------------
    async def _settle(self, jobs: list[Claimed], outcomes: list) -> None:
        try:
            await self._retry_transient("writing results", self._settle_batch, jobs, outcomes)
        except asyncpg.PostgresError as e:
            if is_transient(e):
                log.error("could not write a batch of %d results (%s); the jobs will be re-run after their "
                          "lease expires", len(jobs), e)
                return
            if len(jobs) == 1:
                # the database refused this result (e.g. a constraint): a retryable failure, with the reason
                await self._retry_transient("writing results", self._settle_batch, jobs,
                                            [Failed(f"writing the result failed: {e}", False)])
            else:  # find the offending result: settle one by one
                for job, outcome in zip(jobs, outcomes):
                    await self._settle([job], [outcome])

    async def _settle_batch(self, jobs: list[Claimed], outcomes: list) -> None:
        """Job states and results in one transaction; results only of the jobs this worker still held."""
        done = [(j, o) for j, o in zip(jobs, outcomes) if isinstance(o, Done)]
        failed = [(j, o) for j, o in zip(jobs, outcomes) if isinstance(o, Failed)]
        deferred: dict[str, list[int]] = {}
        for j, o in zip(jobs, outcomes):
            if isinstance(o, Deferred):
                deferred.setdefault(str(o.error), []).append(j.id)
        settled: set[int] = set()
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        async with self.db.acquire() as conn, conn.transaction():
            if done:
                completed = await self.queue.complete(conn, [j.id for j, _ in done])
                for job, outcome in done:
                    if job.id in completed:
                        await self.handlers[job.task].write(conn, job.asset_id, outcome.size, outcome.output)
                        outcomes[job.task, "done"] += 1
                settled |= completed
            if failed:
                held = await self.queue.fail(conn, [j.id for j, _ in failed], [o.error for _, o in failed],
                                             [o.permanent for _, o in failed])
                for job, outcome in failed:
                    if job.id in held:  # cnai.fail_jobs' rule: permanent, or out of attempts, ends it
                        ended = outcome.permanent or job.attempts >= self.config.max_attempts
                        outcomes[job.task, "failed" if ended else "retried"] += 1
                settled |= held
            for reason, ids in deferred.items():
                released = await self.queue.release(conn, ids, reason, self.config.backoff_base_s)
                outcomes.update((j.task, "deferred") for j in jobs if j.id in released)
                settled |= released
        # counted once committed: a retried settle after a lost answer settles nothing the second time
        self.outcomes.update(outcomes)
        self.processed += len(settled)
        if len(settled) < len(jobs):
            # a retry after a commit whose answer was lost lands here too: nothing is written twice
            log.warning("%d job(s) of this batch were not held any more (lease lost, asset deleted, or already "
                        "settled); not written", len(jobs) - len(settled))

    async def _release(self, ids: list[int]) -> None:
        try:
            async with self.db.acquire() as conn:
                released = await self.queue.release(conn, ids)
            log.info("handed back %d unfinished job(s)", len(released))
        except Exception as e:
            log.warning("could not hand back %d job(s) (%s); they return when their lease expires", len(ids), e)


def mapped_root(local: Path, path_map: list[tuple[str, Path]]) -> Path | None:
    """The local root of CNAI_PATH_MAP that `local` lies under.

    Without a map there is none, and a missing preview is always the job's own failure: paths are Immich's
    own, and any folder above a preview may rightly be missing or empty once Immich removed an asset's files, so
    taking that for an outage would retry a deleted photo forever. (An identity map, /usr/src/app/upload=
    /usr/src/app/upload, turns the check on for a share mounted at Immich's own path.)
    """
    for _, root in path_map:
        for candidate in (Path(os.path.normpath(root)), Path(os.path.realpath(root))):  # map_path resolves links
            if candidate == local or candidate in local.parents:
                return Path(os.path.normpath(root))
    return None


def root_is_missing(root: Path) -> bool:
    """Missing, or an empty folder: what an unmounted share's mount point looks like."""
    try:
        with os.scandir(root) as entries:
            return next(entries, None) is None
    except (FileNotFoundError, NotADirectoryError):
        return True


class Preview:
    """One preview file of a batch: its bytes, read once, and their digest (the pool's name for its content); the
    image is decoded when a job needs its pixels, once, for all the asset's jobs."""

    def __init__(self, path: Path, data: bytes):
        self.path = path
        self.data = data
        self.digest = content_digest(data)
        self._image: asyncio.Future | None = None

    async def image(self):
        if self._image is None:
            self._image = asyncio.get_running_loop().run_in_executor(None, self.decode)
        return await asyncio.shield(self._image)

    async def size(self) -> tuple[int, int]:
        """The decoded image's size: the image's own once decoded, otherwise read from the file's header."""
        if self._image is not None:
            return (await self.image()).size
        try:
            return images.decoded_size(self.data)
        except ImageDecodeError as e:
            raise self._decode_failure(e) from None

    def decode(self):
        try:
            return images.decode_image(self.data)
        except ImageDecodeError as e:
            raise self._decode_failure(e) from None

    def _decode_failure(self, e: ImageDecodeError) -> PermanentJobError:
        # a stable reason first, the file after DETAIL_SEPARATOR: `cnai status` groups failures by the reason
        return PermanentJobError(f"{e}{DETAIL_SEPARATOR if DETAIL_SEPARATOR not in str(e) else ', '}{self.path}")


def read_preview(path: Path, root: Path | None = None) -> Preview:
    """The preview's bytes; a missing file under an empty or missing mapped root is an outage, not the job's fault."""
    # a stable reason first, the file after DETAIL_SEPARATOR: `cnai status` groups failures by the reason
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if root is not None and root_is_missing(root):
            raise StorageUnavailableError(root) from None
        raise PermanentJobError(f"preview file not found{DETAIL_SEPARATOR}{path}") from None
    except IsADirectoryError:
        raise PermanentJobError(f"preview path is a directory{DETAIL_SEPARATOR}{path}") from None
    except PermissionError:
        raise PermanentJobError(f"preview file not readable (permission denied){DETAIL_SEPARATOR}{path}") from None
    return Preview(path, data)
