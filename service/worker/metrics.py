"""A worker's own Prometheus metrics, served on `settings.metrics_port` when it is set.

The metrics live in a registry of their own (not prometheus_client's global one), so that
nothing else imported into the process (the API in tests, say) shows up in, or collides
with, a worker's scrape. Labels are bounded: task types and fixed outcomes, never a task id.

Served by prometheus_client's `start_http_server`: a small HTTP server in a thread of its
own. A scrape then answers even while the event loop is busy or stuck (when it is most
worth looking), costs the loop nothing, and the port is bound before the worker connects
to the database, so a port that cannot be used stops start-up at once.
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from pymongo import monitoring

REGISTRY = CollectorRegistry(auto_describe=True)
# This process's CPU, memory and file descriptors, as every Prometheus client shows them.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

OUTCOMES = ("complete", "retry", "failed", "lease_lost")
CALLBACK_OUTCOMES = ("delivered", "retry", "failed", "lease_lost")
# From a task picked up at once (milliseconds) to a backlog minutes deep.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
RUN_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

INFO = Info("task_runner_worker", "This worker process: its id and version.", registry=REGISTRY)
TASKS = Counter(
    "task_runner_worker_tasks",
    "Tasks this worker finished, by type and outcome: complete, retry (failed, will run "
    "again), failed (for good), lease_lost (deleted or recovered meanwhile; nothing written).",
    ["type", "outcome"],
    registry=REGISTRY,
)
LAG = Histogram(
    "task_runner_worker_lag_seconds",
    "How late tasks started: started_at - run_at, both on the database clock.",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
RUN = Histogram(
    "task_runner_worker_run_seconds",
    "How long a task ran, from its start to its result written, by type.",
    ["type"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)
RUNNING = Gauge(
    "task_runner_worker_running", "Tasks this worker is running now.", registry=REGISTRY
)
CLAIMS = Counter(
    "task_runner_worker_claims",
    "Claims this worker made: result=task took one, result=empty found none due.",
    ["result"],
    registry=REGISTRY,
)
CALLBACKS = Counter(
    "task_runner_worker_callbacks",
    "Completion callback deliveries this worker made, by outcome: delivered (answered 2xx), "
    "retry (failed, will be sent again), failed (for good), lease_lost (another worker took "
    "it meanwhile; nothing written).",
    ["outcome"],
    registry=REGISTRY,
)
CLAIMED = CLAIMS.labels(result="task")
EMPTY = CLAIMS.labels(result="empty")
LEASES_LOST = Counter(
    "task_runner_worker_leases_lost",
    "Tasks this worker held whose lease it found gone (deleted or recovered): stopped "
    "mid-run by the heartbeat, or the result dropped when written.",
    registry=REGISTRY,
)
RECOVERED = Counter(
    "task_runner_worker_recovered",
    "Stale tasks (their worker silent) this worker's recovery put back or failed.",
    registry=REGISTRY,
)
DATABASE_COMMANDS = Counter(
    "task_runner_worker_database_commands",
    "Database commands this worker sent, by command name (findAndModify: claims; update: "
    "results and heartbeats; getMore: the change stream; find: look-ups), successful or not. "
    "Divided by tasks finished: what a task costs the database.",
    ["command"],
    registry=REGISTRY,
)
LOOP_STALLS = Counter(
    "task_runner_worker_loop_stalls",
    "Times this worker's event loop was blocked for over a second, by the type of the task "
    "whose code held it ((none): not task code). Heartbeats go on meanwhile (their own "
    "thread), but nothing else this worker does.",
    ["type"],
    registry=REGISTRY,
)
DATABASE_ERRORS = Counter(
    "task_runner_worker_database_errors",
    "Database calls of this worker that failed for want of the database (unreachable or "
    "timed out): claims, result writes, heartbeats, recovery, registration.",
    registry=REGISTRY,
)


def prepare(*, worker_id: str, version: str, types: Iterable[str]) -> None:
    """Name the process and create every label set at zero, so rates work from the start."""
    INFO.info({"worker": worker_id, "version": version})
    for task_type in types:
        RUN.labels(type=task_type)
        for outcome in OUTCOMES:
            TASKS.labels(type=task_type, outcome=outcome)
    for outcome in CALLBACK_OUTCOMES:
        CALLBACKS.labels(outcome=outcome)


def count_running(running: Callable[[], int]) -> None:
    """Read the running count when scraped: nothing to keep up to date per task."""
    RUNNING.set_function(running)


def finished(task_type: str, outcome: str, seconds: float) -> None:
    """A task ended with one of OUTCOMES after `seconds`."""
    TASKS.labels(type=task_type, outcome=outcome).inc()
    RUN.labels(type=task_type).observe(seconds)
    if outcome == "lease_lost":
        LEASES_LOST.inc()


def lease_lost(task_type: str) -> None:
    """The heartbeat found a running task's lease gone; the task was stopped."""
    TASKS.labels(type=task_type, outcome="lease_lost").inc()
    LEASES_LOST.inc()


def started(run_at: datetime | None, started_at: datetime | None) -> None:
    """A claimed task's scheduling lag (when both times are readable)."""
    if isinstance(run_at, datetime) and isinstance(started_at, datetime):
        LAG.observe(max(0.0, (started_at - run_at).total_seconds()))


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends, by command name, as they start (whether they
    succeed or not).

    A worker's (`export=True`, the default) adds each to DATABASE_COMMANDS, its /metrics.
    Tests and benchmarks make theirs with `export=False` and read `counts` and `total`:
    `collection` keeps only the commands on that collection, and nothing is counted while
    `recording` is false. Safe to share between threads: a synchronous client calls its
    listeners from whichever thread sends the command.
    """

    def __init__(
        self, *, export: bool = True, collection: str | None = None, recording: bool = True
    ) -> None:
        self.export = export
        self.collection = collection
        self.recording = recording
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._children: dict[str, Any] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count the command under its name (while recording)."""
        if not self.recording:
            return
        name = event.command_name
        if self.collection is not None and event.command.get(name) != self.collection:
            return
        with self._lock:
            self._counts[name] += 1
        if self.export:
            child = self._children.get(name)
            if child is None:
                child = self._children[name] = DATABASE_COMMANDS.labels(command=name)
            child.inc()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing more to count: the command was counted when sent."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing more to count: the command was counted when sent."""

    @property
    def counts(self) -> collections.Counter[str]:
        """A copy of the counts so far, by command name."""
        with self._lock:
            return self._counts.copy()

    @property
    def total(self) -> int:
        """Every command counted so far."""
        with self._lock:
            return self._counts.total()

    def reset(self) -> None:
        """Forget what was counted (DATABASE_COMMANDS, a Prometheus counter, keeps it)."""
        with self._lock:
            self._counts.clear()


class MetricsPortUnusable(Exception):
    """The metrics port cannot be listened on; the message says why in one line."""


def serve(*, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Listen on host:port and serve REGISTRY at /metrics (any path) from a thread."""
    try:
        return start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (
            "stop what holds the port, or choose another"
            if exc.errno in (errno.EADDRINUSE, errno.EACCES)
            else "choose another"
        )
        raise MetricsPortUnusable(
            f"cannot serve metrics on {host}:{port}: {reason.lower()}; {hint} with "
            "--metrics-port (TASK_RUNNER_METRICS_PORT), or leave it unset for none"
        ) from None
