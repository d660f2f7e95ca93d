"""When a worker's claimer should try to claim: on time, without polling in a loop.

A change stream announces every task that becomes claimable (an insert, a retry, a
release, a recovery, a requeue) with its run_at. The claimer tries a claim only when an
announced task is due, or when it must look for itself: at start, after the stream was
(re)opened, and at a safety poll every `max_poll` seconds. After a claim comes back empty
it asks the database for the earliest waiting run_at and sleeps until then. So a task
created into an idle worker costs one claim, not a claim plus an empty one plus a look-up,
and an idle worker sends a few commands per poll interval. Where the server has no change
streams, the safety poll and the earliest-run_at look-up do all the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from datetime import datetime, timedelta

from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable
from service.store import TaskStore

logger = logging.getLogger(__name__)

# Announced run_ats kept at most; beyond, the safety poll finds the rest.
MAX_KNOWN = 100_000


class WakeUps:
    """Tracks what is known to be due and wakes the claimer when something is."""

    def __init__(self, store: TaskStore, *, max_poll: float, change_stream: bool) -> None:
        self.store = store
        self.max_poll = max_poll
        self.change_stream = change_stream
        self._known: list[datetime] = []  # heap of announced run_ats
        self._drain = True  # claim until empty: we do not know what is waiting
        self._poll_at = store.clock.surely_now()
        self._changed = asyncio.Event()
        # Set while the claimer waits. A claimer that is busy claiming needs no
        # announcements (it claims until empty, then looks up what is next), so the stream
        # is not read meanwhile: no getMore per write while a backlog drains.
        self._listening = asyncio.Event()

    def due(self) -> bool:
        """Should the claimer try a claim now?"""
        return self._drain or bool(self._known and self._known[0] <= self.store.clock.surely_now())

    def claimed(self) -> None:
        """A claim took a task: one announced due task is accounted for."""
        if self._known and self._known[0] <= self.store.clock.surely_now():
            heapq.heappop(self._known)

    async def found_nothing(self) -> None:
        """A claim came back empty: what was announced as due is taken; find what is next."""
        self._drain = False
        now = self.store.clock.surely_now()
        while self._known and self._known[0] <= now:
            heapq.heappop(self._known)
        next_run_at = await self.store.next_run_at()
        if next_run_at is not None and next_run_at > now and next_run_at not in self._known:
            self._remember(next_run_at)
        self._poll_at = now + timedelta(seconds=self.max_poll)

    async def wait(self) -> None:
        """Sleep until something may be due: an announcement, the earliest known run_at, a
        safety poll, or a nudge (a slot freed, a stop)."""
        wake_at = min(self._poll_at, self._known[0]) if self._known else self._poll_at
        seconds = max((wake_at - self.store.clock.surely_now()).total_seconds(), 0.0)
        self._listening.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), seconds)
        finally:
            self._listening.clear()
        self._changed.clear()
        if self.store.clock.surely_now() >= self._poll_at:
            self._drain = True

    def nudge(self) -> None:
        """Make a waiting claimer look again."""
        self._changed.set()

    async def watch(self) -> None:
        """Listen to the change stream until cancelled (or for good, if there is none)."""
        if not self.change_stream:
            logger.info("change streams off; polling at most every %.1fs", self.max_poll)
            return
        backoff = 1.0
        while True:
            try:
                async for run_at in self.store.wakeups(
                    max_await=self.max_poll, on_open=self._stream_opened, ready=self._listening
                ):
                    self._remember(run_at or self.store.clock.surely_now())
                    self.nudge()
                    backoff = 1.0
            except ChangeStreamsUnavailable as exc:
                logger.info(
                    "no change streams (%s); polling at most every %.1fs", exc, self.max_poll
                )
                return
            except DatabaseUnavailable as exc:
                logger.warning("change stream: %s; reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _stream_opened(self) -> None:
        # Whatever happened while no stream was open went unannounced: look for ourselves.
        self._drain = True
        self.nudge()

    def _remember(self, run_at: datetime) -> None:
        if len(self._known) < MAX_KNOWN:
            heapq.heappush(self._known, run_at)
