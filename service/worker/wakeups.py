"""When a worker's claimer should try to claim: on time, without polling in a loop.

A change stream announces every task that becomes claimable (an insert, a retry, a
release, a recovery, a requeue, a waiting task's run_at moved) with its id and run_at; an
announcement of a task already known replaces what was known of it. The claimer tries a
claim when an announced task is due, or when it must look for itself: at start, after the
stream was (re)opened, and at a safety poll every `max_poll` seconds. So a task created into an idle
worker costs one claim, and an idle worker sends a few commands per poll interval. Where
the server has no change streams, the safety poll and the earliest-run_at look-up do all
the work.

The bookkeeping cannot drift from what the database holds:

- An announcement is forgotten when a claim returns *that* task (by id), or when the
  stream announces another worker's claim of it (it comes after the announcement, in the
  order the database made them), never because some other claim succeeded: a claim that
  takes another task than expected leaves the expected one due, and the claimer claims
  again.
- After a claim comes back empty, the database has said that nothing due before the claim
  is waiting: only then are announcements older than the claim dropped (those that came
  while it was in flight stay).
- What was never announced (waiting before the worker started or while no stream was
  open) is found by a look-up: the earliest waiting run_at from the claim's time on *among
  tasks not announced* (announced ones are skipped by id), so a look-up and an
  announcement of the same task are not counted twice. Its answer is a lower bound for
  every task not announced since, so it is asked again only after an empty claim that
  may have taken the task it found, or that was a drain (start, a reopened stream, the
  safety poll): while the stream keeps announcing, an empty claim costs no look-up.
- A task is due once the database clock is certainly past its run_at, not at it: BSON
  dates hold milliseconds, and SecantusDB's `$lte` over the claim index leaves out a
  run_at equal to the bound, so a claim at `run_at` itself may not find the task.

Only one worker tries an announced task at once, its owner (owners.py); this worker tries
a task another owns HANDOFF or 2 x HANDOFF after its run_at (or after it heard of it, if
later), unless that worker's claim is announced first.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import Any

from service.clock import DbClock
from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable
from service.models import Task
from service.periodic import stop_task
from service.store.streams import Announcement, StreamProgress, TaskWatch
from service.worker import metrics
from service.worker.owners import HANDOFF, Owners

logger = logging.getLogger(__name__)

# Announced tasks kept at most; beyond, the look-up and the safety poll find the rest.
MAX_KNOWN = 100_000
# The earliest announced tasks a look-up passes over by id. A later announced task it
# finds costs at most one empty claim when it comes due.
LOOKUP_EXCLUDES = 100
# After a batch of announcements of tasks all due later on, the stream is read again this
# much later, so that tasks created ahead of time in bulk come a batch per getMore (one
# getMore per task per listening worker otherwise). A task due at once created meanwhile
# is announced up to this late.
GATHER = 0.05
# A claim finds a task once the clock is past its run_at: one BSON millisecond later.
RESOLUTION = timedelta(milliseconds=1)
# Stopping the watcher: given up waiting for after this long (see periodic.stop_task).
STOP_WITHIN = 5.0
# How long one change-stream read waits for an event. MongoDB answers sooner only with a
# matching event, so an idle worker reads the stream four times a minute (SecantusDB also
# answers on any write); the safety poll still looks every max_poll whatever the stream does.
STREAM_AWAIT = 15.0


class WakeUps:
    """Tracks what is known to be due and wakes the claimer when something is."""

    def __init__(
        self,
        watch: TaskWatch,
        *,
        clock: DbClock,
        types: Iterable[str],
        max_poll: float,
        change_stream: bool,
        lookup_types: Callable[[], Collection[str] | None] | None = None,
        owners: Owners | None = None,
    ) -> None:
        self.task_watch = watch
        self.clock = clock
        self.types = tuple(types)
        # The types a look-up names (None: any), as the worker's claim names them.
        self.lookup_types = lookup_types or (lambda: self.types)
        self.max_poll = max_poll
        self.change_stream = change_stream
        # Who tries an announced task first (None: this worker, always: see owners.py).
        self.owners = owners
        # Announced tasks by id: (when to try it: its run_at, or later when another worker
        # is to try it first; sequence number of the announcement; raw _id; run_at).
        self._known: dict[str, tuple[datetime, int, Any, datetime]] = {}
        self._heap: list[tuple[datetime, int, str]] = []  # (when to try, seq, id); may be outdated
        self._seq = 0
        # The earliest waiting run_at the last look-up found among tasks not announced.
        self._next: datetime | None = None
        self._drain = True  # claim until empty: we do not know what is waiting
        self._claim_floor = clock.surely_now()  # the claim's filter time is later
        self._claim_seq = 0  # announcements before the claim
        self._poll_at = clock.surely_now()
        self._changed = asyncio.Event()
        # Set while the claimer waits. A claimer that is busy claiming needs no
        # announcements (it claims until empty, then looks up what is next), so the stream
        # is not read meanwhile: no getMore per write while a backlog drains.
        self._listening = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        # Told when the watcher fails unexpectedly (the worker then stops).
        self.on_crash: Callable[[BaseException], None] | None = None
        # How far the stream has been read (QueueGate: the settings need no read while it
        # tells of their changes), and whom to tell of a change to a queue's settings, or
        # of a stream (re)opened, which may have missed some.
        self.progress = StreamProgress()
        self.on_settings: Callable[[], None] = lambda: None

    # -- the claimer's side -----------------------------------------------------------

    def due(self) -> bool:
        """Should the claimer try a claim now? The claimer claims right after a yes."""
        now = self.clock.surely_now()
        head = self._head()
        if self._drain or (head is not None and head < now):
            self._claim_floor, self._claim_seq = now, self._seq
            return True
        return False

    async def nothing_due(self) -> bool:
        """Right after due() said yes: is it a drain with nothing known to be due, and does
        the earliest waiting task, whatever its run_at, say that no claim could find one?

        Then that one read stands for the claims and the look-up of an empty drain (the
        safety poll of an idle worker: one command rather than a claim per limited type and
        its slot's take and give-back, the others' claim and the look-up), and the
        bookkeeping is as after an empty claim. The task it found is a lower bound for
        everything waiting, announced or not, so it is kept as the next to wake up at.
        False (something may be due, or the drain was not alone): claim as ever.
        """
        floor = self._claim_floor
        head = self._head()
        if not self._drain or (head is not None and head < floor):
            return False
        found = await self.task_watch.earliest_waiting(after=None, types=self.lookup_types())
        if found and found[0][1] < floor:
            return False
        self._drain = False
        self._drop_before(floor, self._claim_seq)
        self._next = found[0][1] if found else None
        self._poll_at = self.clock.surely_now() + timedelta(seconds=self.max_poll)
        return True

    def claimed(self, task: Task) -> None:
        """A claim took `task`: its announcement, if any, is accounted for."""
        self._known.pop(task.id, None)

    async def found_nothing(self) -> None:
        """A claim came back empty: nothing due before it is waiting. Find what is next,
        unless the stream has kept this worker told since the last look-up."""
        floor = self._claim_floor
        # The look-up's answer is a lower bound on every task not announced since; it
        # needs asking again only if this claim may have taken the task it found (it was
        # due), or if this claim was a drain (nothing known of what is waiting).
        must_look = self._drain or (self._next is not None and self._next < floor)
        self._drain = False
        self._drop_before(floor, self._claim_seq)
        if must_look:
            await self._look_up(floor)
        self._poll_at = self.clock.surely_now() + timedelta(seconds=self.max_poll)

    async def _look_up(self, floor: datetime) -> None:
        """The earliest waiting run_at from the claim's time on among tasks not announced
        (announced ones are skipped here, not in the query: SecantusDB would scan for it).
        If the first LOOKUP_EXCLUDES found were all announced, the last of them is a lower
        bound to wake up at and look again."""
        self._next = None
        announced = sum(1 for entry in self._live() if entry[0] >= floor)
        limit = min(announced, LOOKUP_EXCLUDES) + 1
        found = await self.task_watch.earliest_waiting(
            after=floor, types=self.lookup_types(), limit=limit
        )
        for task_id, run_at in found:
            if str(task_id) not in self._known:
                self._next = run_at
                return
        if len(found) == limit:
            self._next = found[-1][1]

    async def wait(self, *, free: bool = False) -> None:
        """Sleep until something may be due: an announcement, the earliest known run_at, a
        safety poll, or a nudge (a slot freed, a stop).

        `free`: the claimer has a free slot and due() has just said no. A head that has come
        due since (the clock passed its millisecond between the two, or a clock resync moved
        surely_now back and forth) is then due now: return at once so it is claimed, never
        leave it to the safety poll (with full slots it waits for the nudge of a freed one).
        """
        now = self.clock.surely_now()
        if now >= self._poll_at and not self._drain:
            self._drain = True  # the safety poll is due
            return
        head = self._head()
        if free and head is not None and head < now:
            return
        # What is already due (a task, the poll) waits for a free slot, and a freed slot
        # nudges: sleeping zero seconds would spin while the slots are full.
        wake_at = [t for t in (self._poll_at, head and head + RESOLUTION) if t and t > now]
        seconds = self.max_poll
        if wake_at:
            seconds = min(seconds, (min(wake_at) - now).total_seconds())
        self._listening.set()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that comes just as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._changed.wait()
        finally:
            self._listening.clear()
        self._changed.clear()
        if self.clock.surely_now() >= self._poll_at:
            self._drain = True

    def nudge(self) -> None:
        """Make a waiting claimer look again."""
        self._changed.set()

    # -- the change stream ------------------------------------------------------------

    def start(self) -> None:
        """Start listening to the change stream."""
        self._watcher = asyncio.create_task(self.watch(), name="wakeups")
        self._watcher.add_done_callback(self._watcher_done)

    async def stop(self) -> None:
        """Stop listening, within STOP_WITHIN seconds whatever the stream is doing.

        A cancelled read closes its cursor, which is a round trip to the server; and a
        cancellation can be lost (see periodic.stop_task), after which the watcher would
        read on forever and the worker could never exit.
        """
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await stop_task(watcher, within=STOP_WITHIN)

    def _watcher_done(self, watcher: asyncio.Task[None]) -> None:
        if watcher.cancelled() or watcher.exception() is None:
            return
        exc = watcher.exception()
        assert exc is not None
        if self.on_crash is None:
            logger.error("change stream watcher failed; polling only", exc_info=exc)
        else:
            self.on_crash(exc)

    async def watch(self) -> None:
        """Listen to the change stream until cancelled (or for good, if there is none)."""
        if not self.change_stream:
            logger.info("change streams off; polling at most every %.1fs", self.max_poll)
            return
        backoff = 1.0
        while True:
            try:
                async for announced in self.task_watch.announcements(
                    types=self.types,
                    max_await=STREAM_AWAIT,
                    on_open=self._stream_opened,
                    ready=self._listening,
                    gather=GATHER,
                    claims_not_by=None if self.owners is None else self.owners.worker_id,
                    progress=self.progress,
                ):
                    await self._heard(announced)
                    backoff = 1.0
            except ChangeStreamsUnavailable as exc:
                logger.info(
                    "no change streams (%s); polling at most every %.1fs", exc, self.max_poll
                )
                return
            except DatabaseUnavailable as exc:
                metrics.DATABASE_ERRORS.inc()
                logger.warning("change stream: %s; reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _heard(self, announced: Announcement) -> None:
        """Note an announcement: a claimable task (tried after the delay its owner gives
        this worker), a claim (a task no longer to try), or a queue's settings changed (a
        resumed or unlimited queue's tasks may be due: claim until empty)."""
        if announced.settings:
            self.on_settings()
            self._drain = True
            self.nudge()
            return
        if announced.taken:
            self._known.pop(str(announced.id), None)
            return
        now = self.clock.surely_now()
        run_at = announced.run_at or now
        delay = 0.0
        if self.owners is not None:
            await self.owners.refresh()
            delay = self.owners.delay(str(announced.id), announced.type)
        # Measured from when it is heard, if later: an announcement read late (the worker
        # was busy) is still left to its owner for the same time.
        self._announce(announced.id, run_at, delay=delay, now=now)
        self.nudge()

    def _stream_opened(self) -> None:
        # Whatever happened while no stream was open went unannounced: look for ourselves.
        self.on_settings()
        self._drain = True
        self.nudge()

    # -- bookkeeping ------------------------------------------------------------------

    def _announce(
        self, task_id: Any, run_at: datetime, *, delay: float = 0.0, now: datetime | None = None
    ) -> None:
        """Keep an announced task, to be tried at its run_at or, `delay` seconds being
        another worker's turn to try it first, that long after its run_at or `now`."""
        key = str(task_id)
        if key not in self._known and len(self._known) >= MAX_KNOWN:
            self._drain = True  # not kept: claim until empty, then look up what waits
            return
        self._seq += 1
        try_at = run_at
        if delay:
            try_at = max(run_at, now or run_at) + timedelta(seconds=delay)
        self._known[key] = (try_at, self._seq, task_id, run_at)
        heapq.heappush(self._heap, (try_at, self._seq, key))

    def _is_live(self, entry: tuple[datetime, int, str]) -> bool:
        known = self._known.get(entry[2])
        return known is not None and known[:2] == entry[:2]

    def _live(self) -> list[tuple[datetime, int, str]]:
        return [entry for entry in self._heap if self._is_live(entry)]

    def _head(self) -> datetime | None:
        """The earliest run_at known to be waiting: announced, or found by a look-up."""
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)
        announced = self._heap[0][0] if self._heap else None
        if announced is None or (self._next is not None and self._next < announced):
            return self._next
        return announced

    def _drop_before(self, floor: datetime, seq: int) -> None:
        """Forget announcements made before an empty claim of run_ats before its time."""
        kept = []
        # Left to another worker, a task is tried up to 2 x HANDOFF after its run_at.
        within = floor + timedelta(seconds=2 * HANDOFF)
        while self._heap and self._heap[0][0] < within:
            entry = heapq.heappop(self._heap)
            if self._is_live(entry):
                if entry[1] <= seq and self._known[entry[2]][3] < floor:
                    del self._known[entry[2]]
                else:  # announced while the claim was in flight (maybe inserted after
                    kept.append(entry)  # it), or not due at the claim's time
        for entry in kept:
            heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._known) + 1000:  # outdated entries pile up
            self._heap = self._live()
            heapq.heapify(self._heap)
