"""The heartbeat: one write per interval keeps a worker's leases and its registry record fresh."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from service.clock import DbClock
from service.periodic import Periodic
from service.store.claims import Claims
from service.store.workers import WorkerRegistry
from service.worker import metrics

logger = logging.getLogger(__name__)

# A lease claimed or refreshed less than this share of a heartbeat interval ago is fresh:
# the heartbeat leaves it for the next round, and the registry does not list it yet.
FRESH_SHARE = 0.25


class Holder(Protocol):
    """What the heartbeat needs of the worker whose leases it keeps (Worker is one)."""

    worker_id: str

    def leases_to_refresh(self, *, now: float, fresh: float) -> list[str]:
        """The leases of running tasks refreshed (or claimed) `fresh` seconds or more before
        `now` (time.monotonic())."""

    def refreshed(self, leases: Collection[str], *, at: float) -> None:
        """These leases' heartbeat_at was written no earlier than `at` (time.monotonic())."""

    async def leases_lost(self, leases: Collection[str]) -> None:
        """These leases are gone: stop their tasks without writing, free their slots."""

    def holds(self, *, claimed_before: float) -> tuple[str, ...]:
        """The ids of the tasks running now, claimed before `claimed_before`, sorted."""

    def registration(self, holds: tuple[str, ...]) -> dict[str, Any]:
        """The worker's record in the registry, listing `holds`."""


class Heartbeat(Periodic):
    """One write per interval refreshes the running tasks; lost leases are cancelled.

    A task claimed or refreshed less than a quarter interval ago is left out: its
    heartbeat_at is fresh enough (at most 1.25 intervals old before the next refresh, where
    the stale threshold is at least 3), so in a burst of short tasks most finish before
    their first heartbeat and cost none.

    The worker's record in the registry is refreshed in the same round: whenever the tasks
    it has held for a quarter interval changed, and otherwise every `refresh_every` rounds (a
    third of the stale threshold), so an idle worker stays alive in the registry for a write
    every few seconds. The database clock's offset is measured again in a round when due.
    """

    def __init__(
        self,
        claims: Claims,
        workers: WorkerRegistry,
        *,
        holder: Holder,
        clock: DbClock,
        sync_clock: Callable[[], Awaitable[None]],
        database_lost: Callable[[], None],
        interval: float,
        stale_after: float,
    ) -> None:
        super().__init__(interval=interval, jitter=0.0)
        self.claims = claims
        self.workers = workers
        self.holder = holder
        self.clock = clock
        self.sync_clock = sync_clock
        # Told when a round found no database: recovery must then wait for it long enough.
        self.database_lost = database_lost
        self.refresh_every = max(1, int(stale_after / 3 / interval))
        self._rounds_unregistered = 0
        self._registered: tuple[str, ...] | None = None

    async def run_once(self) -> set[str]:
        """Refresh the leases; stop the tasks whose lease is gone. Returns the lost leases."""
        if self.clock.needs_sync():
            await self.sync_clock()
        began = time.monotonic()
        due = self.holder.leases_to_refresh(now=began, fresh=self.interval * FRESH_SHARE)
        lost = await self.claims.heartbeat(due)
        self.holder.refreshed(due, at=began)
        took = time.monotonic() - began
        if took > self.interval:
            # Heartbeats this slow eat into the stale threshold: say so before it bites.
            logger.warning("heartbeat for %d task(s) took %.2fs", len(due), took)
        await self.holder.leases_lost(lost)
        await self.register()
        return lost

    async def register(self, *, force: bool = False) -> None:
        """Write the worker's record if what it holds changed or it is due for a refresh."""
        holds = self.holder.holds(claimed_before=time.monotonic() - self.interval * FRESH_SHARE)
        self._rounds_unregistered += 1
        if force or holds != self._registered or self._rounds_unregistered >= self.refresh_every:
            # Marked first: a failed write is retried by the next round, not every one after.
            self._rounds_unregistered = 0
            self._registered = None
            await self.workers.register(self.holder.worker_id, self.holder.registration(holds))
            self._registered = holds

    def on_unavailable(self) -> None:
        """A heartbeat failed: recovery must wait for the database to be back long enough."""
        metrics.DATABASE_ERRORS.inc()
        self.database_lost()
