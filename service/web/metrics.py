"""The API's Prometheus metrics: the queue as the database sees it, and its own requests.

Each app has its own registry (tests build many apps in one process). The queue figures
come from one batch of indexed reads (Figures.queue_figures), cached for
TASK_RUNNER_METRICS_CACHE seconds and refreshed by one batch at a time however many
scrapes arrive: scraping every replica every second costs the database one batch per
replica per cache period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from pymongo.errors import PyMongoError

from service.config import Settings
from service.errors import DatabaseUnavailable
from service.models import State, TaskType
from service.store.figures import Figures, QueueFigures

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
UNMATCHED = "unmatched"
KNOWN_STATES = frozenset(s.value for s in State)
BUILTIN_TYPES = tuple(t.value for t in TaskType)


def state_label(value: Any) -> str:
    """A stored state as a label: one of the four, or `unknown` (bounded cardinality)."""
    return value if isinstance(value, str) and value in KNOWN_STATES else UNKNOWN


def type_label(value: Any, types: Collection[str] = BUILTIN_TYPES) -> str:
    """A stored type as a label: one of the loaded `types` in lowercase ("FOO" is foo), or
    `unknown` (bounded cardinality, whatever the database holds)."""
    if isinstance(value, str) and value.lower() in types:
        return value.lower()
    return UNKNOWN


@dataclass(frozen=True)
class Snapshot:
    """The last refresh: the figures, or None when the database did not answer."""

    figures: QueueFigures | None
    taken: float  # time.monotonic()


class QueueCollector:
    """Serves the cached queue figures as gauges; `refresh` keeps them fresh."""

    def __init__(
        self,
        *,
        ttl: float,
        stale_after: float,
        types: Collection[str] = BUILTIN_TYPES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.types = tuple(types)  # the task types the API has loaded
        self.stale_after = stale_after
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self.refreshes = 0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self.snapshot is not None and self.clock() - self.snapshot.taken < self.ttl

    async def refresh(self, figures: Figures) -> None:
        """Read the figures unless a refresh within the last `ttl` seconds holds. One refresh
        at a time: scrapes that arrive meanwhile are served the last figures (their age is
        exported) rather than wait, since a refresh can take seconds on a large collection
        of a slow server; only the very first scrapes, with nothing to serve, wait for it."""
        if self._fresh():
            return
        if self._lock.locked() and self.snapshot is not None:
            return
        async with self._lock:
            if self._fresh():
                return
            self.refreshes += 1
            try:
                read: QueueFigures | None = await figures.queue_figures(
                    stale_after=self.stale_after
                )
            except (DatabaseUnavailable, PyMongoError) as exc:
                # /metrics still answers (database_up 0); the next scrape after ttl retries.
                logger.warning("queue figures for /metrics unavailable: %s", exc)
                read = None
            self.snapshot = Snapshot(read, self.clock())

    def collect(self) -> Iterator[Metric]:
        """The gauges of the last snapshot (prometheus_client's Collector protocol)."""
        figures = None if self.snapshot is None else self.snapshot.figures
        yield GaugeMetricFamily(
            "task_runner_database_up",
            "1 if the queue figures below come from the database, 0 if it did not answer",
            value=0 if figures is None else 1,
        )
        if figures is None:
            return
        tasks = GaugeMetricFamily(
            "task_runner_tasks", "tasks in the database by state and type", labels=["state", "type"]
        )
        counts: dict[tuple[str, str], int] = {}
        for (state, task_type), n in figures.by_state_and_type.items():
            key = (state_label(state), type_label(task_type, self.types))
            counts[key] = counts.get(key, 0) + n
        for state in State:  # every known series, zeros included, so that rates work
            for known in self.types:
                counts.setdefault((state.value, known), 0)
        for (state, task_type), n in sorted(counts.items()):
            tasks.add_metric([state, task_type], n)
        yield tasks
        yield GaugeMetricFamily(
            "task_runner_tasks_due", "NOTSTARTED tasks whose run_at has come", value=figures.due
        )
        age = 0.0
        if figures.oldest_due is not None:
            age = max((figures.now - figures.oldest_due).total_seconds(), 0.0)
        yield GaugeMetricFamily(
            "task_runner_oldest_due_seconds",
            "how long the oldest due NOTSTARTED task has been due (0 when none is)",
            value=age,
        )
        yield GaugeMetricFamily(
            "task_runner_tasks_stale",
            "STARTED tasks whose heartbeat is older than the stale threshold",
            value=figures.stale,
        )
        assert self.snapshot is not None
        yield GaugeMetricFamily(
            "task_runner_queue_figures_age_seconds",
            "seconds since the queue figures above were read from the database",
            value=max(self.clock() - self.snapshot.taken, 0.0),
        )


class ApiMetrics:
    """The app's registry: request counters and latency, and the queue collector."""

    def __init__(self, settings: Settings, *, types: Collection[str] = BUILTIN_TYPES) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "task_runner_http_requests",
            "HTTP requests answered, by route pattern, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "task_runner_http_request_duration_seconds",
            "time to answer an HTTP request, by route pattern and method",
            ["route", "method"],
            registry=self.registry,
        )
        self.queue = QueueCollector(
            ttl=settings.metrics_cache, stale_after=settings.stale_after, types=types
        )
        self.registry.register(self.queue)

    def observe(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)

    async def render(self, figures: Figures, accept: str) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for, and its content type."""
        await self.queue.refresh(figures)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
