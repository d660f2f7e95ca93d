"""The lease keeper: the running tasks' heartbeats, written from a thread of the worker's own.

Task code runs on the worker's event loop, and a task type may block it by mistake (a
`time.sleep` or a blocking client inside `async def run`). If heartbeats lived on that loop
too, a blocked loop would let them go stale, another worker would recover the task and run
it again while the first run goes on. So the leases are kept by a thread with its own
event loop and its own database client: one write per interval refreshes every lease it
holds (those claimed or refreshed a quarter interval ago or more), whatever the worker's loop
is doing. The leases it finds gone are handed back to the worker's loop, which stops their
tasks as soon as it runs again.

The same thread watches the worker's loop: the loop stamps a time every TICK seconds, and
when that stamp is older than `stall_after`, the loop is stalled. The thread then reads
the loop thread's stack for the task whose code holds it, logs it once (its id and type)
and counts it in /metrics; when the loop runs again it logs how long the stall lasted.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Collection
from types import FrameType

from pymongo import monitoring

from service.clock import DbClock
from service.errors import DatabaseUnavailable
from service.plugins import TaskContext, TaskDefinition, run_task
from service.store import Database, open_client
from service.store.claims import Claims
from service.worker import metrics

logger = logging.getLogger(__name__)

# A lease claimed or refreshed less than this share of a heartbeat interval ago is fresh:
# it is left for the next round, so in a burst of short tasks most finish before their
# first heartbeat and cost none (heartbeat_at is then at most 1.25 intervals old before its
# refresh, where the stale threshold is at least 3).
FRESH_SHARE = 0.25
# How often the worker's loop stamps the time, and the keeper looks at the stamp.
TICK = 0.2


class LeaseKeeper:
    """Refreshes the leases it is given from its own thread; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        database: str,
        db_timeout: float,
        clock: DbClock,
        interval: float,
        stall_after: float,
        on_lost: Callable[[set[str]], None],
        on_unavailable: Callable[[], None],
        on_crash: Callable[[BaseException], None],
        event_listeners: Collection[monitoring._EventListener] = (),
    ) -> None:
        self.url, self.database, self.db_timeout = url, database, db_timeout
        self.clock = clock
        self.interval = interval
        self.stall_after = stall_after
        self.on_lost = on_lost  # called on the worker's loop
        self.on_unavailable = on_unavailable  # called on the worker's loop
        self.on_crash = on_crash  # called on the worker's loop: it stops the worker
        self.event_listeners = tuple(event_listeners)
        self._leases: dict[str, float] = {}  # lease -> time.monotonic() of its last write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's
        self._loop_thread = 0
        self._tick = time.monotonic()  # the worker's loop's last stamp
        self._stall: tuple[float, str | None] | None = None  # when it began, what held it

    # -- called on the worker's loop ------------------------------------------------------

    def add(self, lease: str, *, claimed_at: float) -> None:
        """Keep this lease from now on; its heartbeat_at was written no earlier than
        `claimed_at` (time.monotonic())."""
        with self._lock:
            self._leases[lease] = claimed_at

    def remove(self, lease: str) -> None:
        """Stop keeping this lease (its task left STARTED, or was abandoned)."""
        with self._lock:
            self._leases.pop(lease, None)

    def start(self) -> None:
        """Start the thread, and the worker loop's time stamps it watches."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stamp()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread (within a heartbeat interval and the database timeout)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, self.interval + self.db_timeout + 5)

    def _stamp(self) -> None:
        self._tick = time.monotonic()
        if not self._stop.is_set() and self._loop is not None:
            self._loop.call_later(TICK, self._stamp)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            # Leases unrefreshed would be recovered from under their tasks: stop the worker.
            self._to_worker(self.on_crash, exc)

    async def _main(self) -> None:
        client = open_client(
            self.url,
            timeout=self.db_timeout,
            appname="task-runner-leases",
            event_listeners=self.event_listeners,
        )
        claims = Claims(Database.open(client, database=self.database, clock=self.clock))
        try:
            next_round = time.monotonic() + self.interval
            while not self._stop.is_set():
                self._watch_loop()
                if time.monotonic() >= next_round:
                    next_round = time.monotonic() + self.interval
                    await self._refresh(claims)
                await asyncio.sleep(TICK)
        finally:
            await client.close()

    async def _refresh(self, claims: Claims) -> None:
        """One write for every lease due; the gone ones are handed to the worker."""
        began = time.monotonic()
        fresh = self.interval * FRESH_SHARE
        with self._lock:
            due = [lease for lease, at in self._leases.items() if began - at >= fresh]
        try:
            lost = await claims.heartbeat(due)
        except DatabaseUnavailable as exc:
            logger.warning("heartbeat skipped: %s", exc)
            self._to_worker(self.on_unavailable)
            return
        with self._lock:
            for lease in due:
                if lease in self._leases:
                    self._leases[lease] = began
        took = time.monotonic() - began
        if took > self.interval:
            # Heartbeats this slow eat into the stale threshold: say so before it bites.
            logger.warning("heartbeat for %d task(s) took %.2fs", len(due), took)
        if lost:
            self._to_worker(self.on_lost, lost)

    def _to_worker(self, call: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(call, *args)

    # -- the worker's loop, watched -------------------------------------------------------

    def _watch_loop(self) -> None:
        now = time.monotonic()
        stalled = now - self._tick
        if self._stall is None and stalled > self.stall_after:
            task_id, task_type = self._holding()
            self._stall = (self._tick, task_id)
            metrics.LOOP_STALLS.labels(type=task_type or "(none)").inc()
            if task_id is None:
                logger.warning(
                    "the event loop has been blocked for %.1fs, not in task code", stalled
                )
            else:
                logger.warning(
                    "the event loop has been blocked for %.1fs by task %s type=%s: its run "
                    "blocks instead of awaiting (make it a plain def run, which runs in a "
                    "thread, or await the blocking call in asyncio.to_thread)",
                    stalled,
                    task_id,
                    task_type,
                )
        elif self._stall is not None and stalled < self.stall_after:
            began, task_id = self._stall
            self._stall = None
            logger.warning(
                "the event loop runs again after a stall of %.1fs%s",
                self._tick - began,
                "" if task_id is None else f" (task {task_id})",
            )

    def _holding(self) -> tuple[str | None, str | None]:
        """The task whose code the worker's loop is running now (its id and type), read
        off the loop thread's stack: the frame of run_task holds both."""
        frame: FrameType | None = sys._current_frames().get(self._loop_thread)
        while frame is not None:
            if frame.f_code is run_task.__code__:
                ctx, definition = frame.f_locals.get("ctx"), frame.f_locals.get("definition")
                if isinstance(ctx, TaskContext) and isinstance(definition, TaskDefinition):
                    return ctx.task_id, definition.name
            frame = frame.f_back
        return None, None
