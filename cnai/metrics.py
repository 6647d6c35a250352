"""`GET /metrics` (Prometheus text format): what the model pool, the gateway, the listener and the queue report.

Values are read when scraped (a custom collector over the parts' own counters), so nothing here runs between
scrapes; the queue's figures come from a read-only connection, refreshed at most every few seconds however often
Prometheus asks. Series (all `cnai_`): see `ServiceCollector.collect`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Hashable

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from inference.pool import ModelPool, Priority
from inference.repeated_errors import RepeatedErrorLog

from . import admin

log = logging.getLogger(__name__)

# what a caller waits for one input: a cached answer (~0) up to a big batch on a busy CPU
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
JOB_OUTCOMES = ("done", "failed", "retried", "deferred")


@dataclass
class QueueSnapshot:
    counts: list[tuple[str, str, int]] = field(default_factory=list)  # (task, queued|running, n)
    oldest_s: dict[str, float] = field(default_factory=dict)
    expired_leases: int = 0


class QueueReader:
    """The queue's figures for /metrics through one read-only connection, read at most every `min_interval_s`.

    A database that is away costs a scrape nothing but a `cnai_queue_up 0` (and one log line a minute)."""

    def __init__(self, dsn: str, min_interval_s: float = 5.0):
        self.dsn = dsn
        self.min_interval_s = min_interval_s
        self.snapshot: QueueSnapshot | None = None
        self.up = False
        self._read_at = float("-inf")
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._errors = RepeatedErrorLog(log)

    async def refresh(self) -> None:
        async with self._lock:  # concurrent scrapes share one read
            if time.monotonic() - self._read_at < self.min_interval_s:
                return
            self._read_at = time.monotonic()
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.dsn, timeout=5, command_timeout=10,
                        server_settings={"default_transaction_read_only": "on", "application_name": "cnai-metrics"})
                active = await admin.active_jobs(self._conn)
                self.snapshot = QueueSnapshot(active.counts, active.oldest_queued,
                                              await admin.expired_leases(self._conn))
                self.up = True
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                self.up = False
                self.snapshot = None  # stale figures would look like a queue that stopped moving
                self._errors.error("queue", "metrics: could not read the queue: %s", e, level=logging.WARNING)
                await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


class MeteredPool:
    """The model pool as the gateway and listener use it, timing each input from the call to its result (queue,
    batch, or a shared result) into `cnai_inference_seconds`. Everything else is the pool's own."""

    def __init__(self, pool: ModelPool, seconds: Histogram):
        self._pool = pool
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def run(self, key: str, item: Any, priority: Priority = Priority.BACKGROUND,
                  content: Hashable | None = None) -> Any:
        started = time.perf_counter()
        try:
            return await self._pool.run(key, item, priority, content=content)
        finally:
            self._seconds.labels(key, priority.name.lower()).observe(time.perf_counter() - started)


class ServiceMetrics:
    """One process's metrics page. `pool` is what the gateway and listener must be given, so their waits are timed;
    `gateway_requests`, `listener` and `queue` are read when set."""

    def __init__(self, pool: ModelPool, listener=None, queue: QueueReader | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        seconds = Histogram("cnai_inference_seconds", "Seconds from asking the pool for one input to its result "
                            "(waiting, batch, or a shared result)", ["model", "priority"], buckets=SECONDS_BUCKETS,
                            registry=self.registry)
        self.pool = MeteredPool(pool, seconds)
        self.listener = listener
        self.queue = queue
        self.gateway_requests: collections.Counter | None = None
        self.mtphotos_requests: collections.Counter | None = None
        self.registry.register(ServiceCollector(self))

    async def page(self) -> tuple[bytes, str]:
        if self.queue is not None:
            await self.queue.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.close()


def _stat(stats, name: str, default=0):
    # counters the pool's result cache adds; absent from a pool without one
    return getattr(stats, name, default)


class ServiceCollector:
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # series appear as the parts report them

    def collect(self):
        yield from self._pool()
        if self.metrics.gateway_requests is not None:
            requests = CounterMetricFamily("cnai_gateway_requests", "/predict answers by task, HTTP status and "
                                           "route (served here, forwarded upstream, refused)",
                                           labels=["task", "status", "route"])
            for (task, status, route), n in sorted(self.metrics.gateway_requests.items()):
                requests.add_metric([task, status, route], n)
            yield requests
        if self.metrics.mtphotos_requests is not None:
            requests = CounterMetricFamily("cnai_mtphotos_requests", "MT Photos AI API answers by route and HTTP "
                                           "status", labels=["route", "status"])
            for (route, status), n in sorted(self.metrics.mtphotos_requests.items()):
                requests.add_metric([route, status], n)
            yield requests
        if self.metrics.listener is not None:
            yield from self._listener(self.metrics.listener)
        if self.metrics.queue is not None:
            yield from self._queue(self.metrics.queue)

    def _pool(self):
        stats = self.metrics.pool.stats()
        families = {name: CounterMetricFamily(f"cnai_inference_{name}", text, labels=["model"]) for name, text in (
            ("items", "Inputs computed by a model"),
            ("batches", "Batches a model ran"),
            ("busy_seconds", "Seconds a model spent computing batches"),
            ("cache_hits", "Inputs answered from a result already computed"),
            ("cache_misses", "Inputs the result cache did not hold"),
            ("singleflight_joins", "Inputs that waited for the same input's computation already running"))}
        sizes = HistogramMetricFamily("cnai_inference_batch_size", "Inputs per batch", labels=["model"])
        for key, st in sorted(stats.items()):
            families["items"].add_metric([key], _stat(st, "items"))
            families["batches"].add_metric([key], _stat(st, "batches"))
            families["busy_seconds"].add_metric([key], _stat(st, "busy_s"))
            for name in ("cache_hits", "cache_misses", "singleflight_joins"):
                families[name].add_metric([key], _stat(st, name))
            by_size = _stat(st, "batch_sizes", None)
            if by_size is not None:
                buckets = [(str(le), sum(n for size, n in by_size.items() if size <= le)) for le in BATCH_SIZE_BUCKETS]
                buckets.append(("+Inf", sum(by_size.values())))
                sizes.add_metric([key], buckets, sum(size * n for size, n in by_size.items()))
        yield from families.values()
        yield sizes

    @staticmethod
    def _listener(listener):
        jobs = CounterMetricFamily("cnai_jobs", "Jobs this listener settled, by task and outcome (done, failed, "
                                   "retried later, deferred while storage is away)", labels=["task", "outcome"])
        # every served task's outcomes from 0, so a rate is defined before the first failure
        keys = {(task, outcome) for task in listener.config.tasks for outcome in JOB_OUTCOMES} | set(listener.outcomes)
        for task, outcome in sorted(keys):
            jobs.add_metric([task, outcome], listener.outcomes.get((task, outcome), 0))
        yield jobs
        yield CounterMetricFamily("cnai_lease_expiries", "Jobs this listener's reaper found past their lease (their "
                                  "listener stopped) and re-queued or failed", value=listener.lease_expiries)
        yield CounterMetricFamily("cnai_leases_lost", "Jobs whose lease this listener lost while working on them",
                                  value=listener.leases_lost)

    @staticmethod
    def _queue(queue: QueueReader):
        yield GaugeMetricFamily("cnai_queue_up", "1 when the last read of the queue succeeded", value=int(queue.up))
        snapshot = queue.snapshot
        if snapshot is None:
            return
        jobs = GaugeMetricFamily("cnai_queue_jobs", "Jobs queued (the trigger's intake included) or running, by "
                                 "task and state; finished jobs are counted by cnai_jobs", labels=["task", "state"])
        for task, state, n in sorted(snapshot.counts):
            jobs.add_metric([task, state], n)
        yield jobs
        oldest = GaugeMetricFamily("cnai_queue_oldest_queued_seconds", "Age of the oldest queued job per task",
                                   labels=["task"])
        for task, age in sorted(snapshot.oldest_s.items()):
            oldest.add_metric([task], age)
        yield oldest
        yield GaugeMetricFamily("cnai_queue_expired_leases", "Running jobs past their lease, not yet reaped",
                                value=snapshot.expired_leases)
