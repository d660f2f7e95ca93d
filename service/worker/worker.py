"""The worker: one claimer feeding a bounded set of running tasks, its background jobs and a
graceful stop; serve() runs one in a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiohttp
from pymongo import monitoring

from service import version
from service.config import Settings
from service.errors import DatabaseUnavailable
from service.models import Task
from service.plugins import Registry
from service.store import Store
from service.worker import metrics
from service.worker.callbacks import CallbackSender
from service.worker.claimer import Claimer
from service.worker.execution import Executor
from service.worker.heartbeat import Heartbeat
from service.worker.leases import LeaseKeeper
from service.worker.malformed import MalformedScan
from service.worker.owners import Owners
from service.worker.process import (
    default_worker_id,
)
from service.worker.queues import QueueGate
from service.worker.recovery import Recoverer
from service.worker.retention import Retention
from service.worker.schedules import Scheduler
from service.worker.slots import Slots
from service.worker.wakeups import WakeUps

logger = logging.getLogger(__name__)

MALFORMED_SCAN_INTERVAL = 300.0
# A worker's event loop held this long by one piece of code is stalled: logged and counted.
STALL_AFTER = 1.0


class WorkerCrashed(Exception):
    """The worker stopped because of an unexpected error (its cause is chained)."""


class Job(Protocol):
    """A background job of the worker (a Periodic, or the wake-ups' stream watcher)."""

    # Told of an unexpected error, after which the job has ended.
    on_crash: Callable[[BaseException], None] | None

    def start(self) -> None:
        """Start running in the background."""

    async def stop(self) -> None:
        """Stop, and wait (a bounded time) for the job to end."""


@dataclass
class Running:
    """A claimed task and the asyncio task executing it."""

    task: Task
    execution: asyncio.Task[None]
    lost: bool = False
    finishing: bool = False  # the task ran; its result is being written
    # time.monotonic() no later than the claim (the server stamped heartbeat_at after it).
    claimed_at: float = 0.0


class Worker:
    """Claims due tasks of the types in `registry` and runs up to `settings.concurrency`
    of them at once, each with the shared HTTP client `http`."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        registry: Registry,
        http: aiohttp.ClientSession,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry
        self.http = http
        self.worker_id = worker_id or default_worker_id()
        self.running: dict[str, Running] = {}
        # The types this worker runs: it claims, looks up and listens for no others.
        self.types: tuple[str, ...] = registry.names
        self.slots = Slots(
            store.slots,
            store.claims,
            limits=settings.limits,
            types=self.types,
            worker_id=self.worker_id,
            claim_within=settings.stale_after / 4,
        )
        self.recoverer = _recoverer(store, settings, limited=bool(self.slots.limits))
        self.queues = _queue_gate(store, slots=self.slots, recoverer=self.recoverer)
        self.leases = self._lease_keeper(store, settings)
        self.heartbeat = Heartbeat(
            store.workers,
            holder=self,
            clock=store.clock,
            sync_clock=store.sync_clock,
            database_lost=self.recoverer.database_lost,
            interval=settings.heartbeat_interval,
            stale_after=settings.stale_after,
        )
        self.wakeups = WakeUps(
            store.watch,
            clock=store.clock,
            types=self.types,
            max_poll=settings.max_poll_interval,
            change_stream=settings.change_streams,
            lookup_types=lambda: None if self.claimer.claims_any_type() else self.types,
            owners=Owners(
                store.workers, worker_id=self.worker_id, stale_after=settings.stale_after
            ),
        )
        # The stream tells of changes to the queues' settings: no read before each claim.
        self.queues.told_until = self.wakeups.progress.told_until
        self.wakeups.on_settings = self.queues.stale
        self.claimer = Claimer(
            store.claims,
            slots=self.slots,
            queues=self.queues,
            wakeups=self.wakeups,
            worker_id=self.worker_id,
            types=self.types,
        )
        self.executor = Executor(
            store.claims,
            clock=store.clock,
            slots=self.slots,
            registry=registry,
            settings=settings,
            http=http,
            worker_id=self.worker_id,
        )
        self.executor.results.full = lambda: len(self.running) >= settings.concurrency
        self.malformed, self.retention, self.scheduler = _upkeep(store, settings)
        self.callbacks = _callbacks(store, settings, self.executor)
        for job in self.jobs:
            job.on_crash = self._crash
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        self._finished = asyncio.Event()  # a running task ended
        self.fatal: BaseException | None = None
        self.version = version()
        self.started_at = store.clock.now()

    def _lease_keeper(self, store: Store, settings: Settings) -> LeaseKeeper:
        return LeaseKeeper(
            url=settings.effective_mongodb_url,
            database=settings.database,
            db_timeout=settings.db_timeout,
            clock=store.clock,
            interval=settings.heartbeat_interval,
            stall_after=STALL_AFTER,
            on_lost=self._leases_gone,
            on_unavailable=self.recoverer.database_lost,
            on_crash=self._crash,
            # The worker's own (its command counts in /metrics): the keeper's count too.
            # (PyMongo annotates these as its internal _EventListeners: they are listeners.)
            event_listeners=cast(
                list[monitoring._EventListener], store.client.options.event_listeners
            ),
        )

    @property
    def jobs(self) -> tuple[Job, ...]:
        """The background jobs, in the order they start."""
        # They stop in the reverse order: the wake-ups first (nothing more is claimed), the
        # heartbeat last (the leases of tasks still running stay fresh while the others stop).
        return (
            self.heartbeat,
            self.recoverer,
            self.malformed,
            self.retention,
            self.scheduler,
            self.callbacks,
            self.wakeups,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run tasks until stop(); then drain within the grace period."""
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        limits = ",".join(f"{t}={n}" for t, n in sorted(self.settings.limits.items()))
        logger.info(
            "worker %s started: types %s, limits %s, concurrency %d, event loop %s",
            self.worker_id,
            ",".join(self.types),
            limits or "none",
            self.settings.concurrency,
            loop,
        )
        metrics.prepare(worker_id=self.worker_id, version=self.version, types=self.types)
        metrics.count_running(lambda: len(self.running))
        await self._register()
        try:
            await self.retention.ensure()
        except DatabaseUnavailable as exc:
            logger.warning("retention index not checked (%s); the next start will", exc)
        self.leases.start()
        for job in self.jobs:
            job.start()
        try:
            await self._claim_loop()
            # Draining: nothing new is claimed, scheduled or recovered by this worker; the
            # heartbeat alone goes on, for the tasks still running.
            for job in reversed(self.jobs):
                if job is not self.heartbeat:
                    await job.stop()
            await self._drain(self.settings.shutdown_grace)
        finally:
            for job in reversed(self.jobs):
                await job.stop()
            await self._release_all()
            await self.executor.results.stop()
            await self.leases.stop()
            await self.callbacks.close()
            if self.fatal is None:
                await self._unregister()
        if self.fatal is not None:
            raise WorkerCrashed(f"worker {self.worker_id} stopped on an error") from self.fatal
        logger.info("worker %s stopped", self.worker_id)

    def stop(self) -> None:
        """Stop claiming; running tasks get the grace period to finish."""
        self._stopping.set()
        self.wakeups.nudge()

    def stop_now(self) -> None:
        """Stop without waiting: running tasks are cancelled and released at once."""
        self._hurry.set()
        self._finished.set()
        self.stop()

    def _crash(self, exc: BaseException) -> None:
        """An error nobody planned for: stop now; run() then raises, and the process exits
        non-zero for its supervisor to restart it."""
        if self.fatal is None:
            self.fatal = exc
            logger.critical("unexpected error; stopping", exc_info=exc)
        self.stop_now()

    # -- the registry: who this worker is and what it holds -------------------------------

    def holds(self, *, claimed_before: float) -> tuple[str, ...]:
        """The ids of the tasks this worker runs now, claimed before `claimed_before`
        (time.monotonic()), sorted. The registry lists those held for a quarter heartbeat
        interval: a task done sooner would be gone before anyone read it, and a burst of
        short tasks would change the record, and cost a write, every round."""
        return tuple(
            sorted(r.task.id for r in self.running.values() if r.claimed_at < claimed_before)
        )

    def _leases_gone(self, leases: Collection[str]) -> None:
        """The lease keeper found these leases gone: stop their tasks, free their slots."""
        gone = [r.task for lease in leases if (r := self.running.get(lease)) is not None]
        for lease in leases:
            self.abandon(lease)
        if gone and any(self.slots.holds(task) for task in gone):
            freeing = asyncio.create_task(self._free_slots(gone), name="free-lost-slots")
            self._background.add(freeing)
            freeing.add_done_callback(self._background.discard)

    async def _free_slots(self, tasks: list[Task]) -> None:
        """No longer STARTED under our leases: their slots can go now (else recovery frees
        them a stale threshold later)."""
        try:
            for task in tasks:
                await self.slots.free(task)
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.inc()
            logger.warning("slots of stopped tasks not freed (%s); recovery will", exc)

    def registration(self, holds: tuple[str, ...]) -> dict[str, Any]:
        """This worker's record in the registry (the store adds last_seen)."""
        host, _, pid = self.worker_id.rpartition(":")
        return {
            "host": host or socket.gethostname(),
            "pid": int(pid) if pid.isdigit() else os.getpid(),
            "started_at": self.started_at,
            "concurrency": self.settings.concurrency,
            "running": len(holds),
            "tasks": list(holds),
            "version": self.version,
            "types": list(self.types),
            "metrics_port": self.settings.metrics_port,
        }

    async def _register(self) -> None:
        try:
            await self.heartbeat.register(force=True)
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.inc()
            logger.warning("worker not registered yet (%s); the heartbeat will", exc)

    async def _unregister(self) -> None:
        try:
            await self.store.workers.unregister(self.worker_id)
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.inc()
            logger.warning("worker record not removed (%s); it will show as gone", exc)

    def _execution_done(self, execution: asyncio.Task[None]) -> None:
        if not execution.cancelled() and execution.exception() is not None:
            self._crash(execution.exception())  # type: ignore[arg-type]

    def abandon(self, lease: str) -> None:
        """The task's lease is gone (deleted or recovered): stop it and write nothing back."""
        running = self.running.get(lease)
        # A result being written finds out by itself: its write is fenced on the lease.
        if running is not None and not running.lost and not running.finishing:
            running.lost = True
            running.execution.cancel()
            metrics.lease_lost(running.task.type)
            logger.warning(
                "task %s lease lost (deleted or recovered); stopped without writing",
                running.task.id,
            )

    # -- claiming ---------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            if len(self.running) >= self.settings.concurrency:
                await self.wakeups.wait()
                continue
            try:
                began = time.monotonic()  # no later than the server stamped heartbeat_at
                task, looked = await self.claimer.claim_round()
                if task is not None:
                    metrics.CLAIMED.inc()
                    self._start(task, claimed_at=began)
                    self.wakeups.claimed(task)
                elif looked:
                    metrics.EMPTY.inc()
                    await self.wakeups.found_nothing()
                else:
                    await self.claimer.wait()
                backoff = 0.1
            except DatabaseUnavailable as exc:
                metrics.DATABASE_ERRORS.inc()
                self.recoverer.database_lost()
                logger.warning("claim failed: %s; retrying in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, self.settings.max_poll_interval)
            except Exception as exc:
                self._crash(exc)
                return

    # -- running ----------------------------------------------------------------------

    def _start(self, task: Task, *, claimed_at: float) -> None:
        assert task.lease is not None
        metrics.started(task.run_at, task.started_at)
        execution = asyncio.create_task(self._execute(task), name=f"task-{task.id}")
        execution.add_done_callback(self._execution_done)
        self.running[task.lease] = Running(task, execution, claimed_at=claimed_at)
        self.leases.add(task.lease, claimed_at=claimed_at)

    async def _execute(self, task: Task) -> None:
        try:
            outcome = await self.executor.run(task)
            self._mark_finishing(task)
            await self.executor.finish(task, outcome)
        finally:
            self._forget(task)

    def _mark_finishing(self, task: Task) -> None:
        assert task.lease is not None
        running = self.running.get(task.lease)
        if running is not None:
            running.finishing = True

    def _forget(self, task: Task) -> None:
        assert task.lease is not None
        self.running.pop(task.lease, None)
        self.leases.remove(task.lease)
        self._finished.set()
        self.wakeups.nudge()

    # -- stopping ---------------------------------------------------------------------

    async def _drain(self, grace: float) -> None:
        if self.running:
            logger.info("waiting up to %.1fs for %d running task(s)", grace, len(self.running))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.running and not self._hurry.is_set() and loop.time() < deadline:
            self._finished.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), deadline - loop.time())

    async def _release_all(self) -> None:
        """Cancel what is still running and give it back without counting the attempt."""
        left = list(self.running.values())
        for running in left:
            running.execution.cancel()
        await asyncio.gather(*(r.execution for r in left), return_exceptions=True)
        for running in left:
            try:
                if not running.lost and await self.store.claims.release(running.task):
                    logger.info("task %s released back to the queue", running.task.id)
                # Only once the task has left STARTED: the limit holds throughout.
                await self.slots.free(running.task)
            except DatabaseUnavailable as exc:
                metrics.DATABASE_ERRORS.inc()
                logger.warning(
                    "task %s not released (%s); recovery will return it", running.task.id, exc
                )


def _recoverer(store: Store, settings: Settings, *, limited: bool) -> Recoverer:
    """Recovery every stale threshold; where types are `limited`, it frees lost slots too."""
    return Recoverer(
        store.claims,
        clock=store.clock,
        ping=store.ping,
        stale_after=settings.stale_after,
        interval=settings.stale_after,
        slots=store.slots if limited else None,
    )


def _queue_gate(store: Store, *, slots: Slots, recoverer: Recoverer) -> QueueGate:
    """The worker's side of queues, wired to its type slots; once a queue has a concurrency,
    the worker's recovery frees lost slots too."""
    gate = QueueGate(
        store.queues,
        store.slots,
        store.claims,
        type_slots=slots,
        worker_id=slots.worker_id,
        claim_within=slots.claim_within,
    )
    slots.queues = gate
    gate.on_slots = functools.partial(setattr, recoverer, "slots", store.slots)
    return gate


def _upkeep(store: Store, settings: Settings) -> tuple[MalformedScan, Retention, Scheduler]:
    """The jobs every worker runs for the whole database, whatever it runs itself: the
    malformed scan, retention and the schedules."""
    return (
        MalformedScan(store.figures, interval=MALFORMED_SCAN_INTERVAL),
        Retention(store.retention, clock=store.clock, retention=settings.retention),
        Scheduler(store.schedules, clock=store.clock, interval=settings.schedule_interval),
    )


def _callbacks(store: Store, settings: Settings, executor: Executor) -> CallbackSender:
    """The delivery of completion callbacks, woken by `executor` when a task it ran ends
    with one; its guarded client (open while it runs) is the http tasks' too."""
    callbacks = CallbackSender(store.callbacks, clock=store.clock, settings=settings)
    executor.callback_due = callbacks.nudge
    executor.outbound = lambda: callbacks.session
    return callbacks
