"""The registry's heartbeat: the worker's record is kept fresh, and the database clock
measured again when due. The leases themselves are kept from a thread (leases.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from service.clock import DbClock
from service.periodic import Periodic
from service.store.workers import WorkerRegistry
from service.worker import metrics
from service.worker.leases import FRESH_SHARE

logger = logging.getLogger(__name__)


class Holder(Protocol):
    """What the heartbeat needs of the worker it registers (Worker is one)."""

    worker_id: str

    def holds(self, *, claimed_before: float) -> tuple[str, ...]:
        """The ids of the tasks running now, claimed before `claimed_before`, sorted."""

    def registration(self, holds: tuple[str, ...]) -> dict[str, Any]:
        """The worker's record in the registry, listing `holds`."""


class Heartbeat(Periodic):
    """Refreshes the worker's record in the registry: whenever the tasks it has held for a
    quarter interval changed, and otherwise every `refresh_every` rounds (half the stale
    threshold: a failed write, retried the next round, still leaves the record fresh), so
    an idle worker stays alive in the registry for a write every few seconds, and a burst of
    short tasks costs none. The database clock's offset is measured again in a round when
    due.
    """

    def __init__(
        self,
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
        self.workers = workers
        self.holder = holder
        self.clock = clock
        self.sync_clock = sync_clock
        # Told when a round found no database: recovery must then wait for it long enough.
        self.database_lost = database_lost
        self.refresh_every = max(1, int(stale_after / 2 / interval))
        self._rounds_unregistered = 0
        self._registered: tuple[str, ...] | None = None

    async def run_once(self) -> None:
        """Measure the clock if due; write the record if due."""
        if self.clock.needs_sync():
            await self.sync_clock()
        await self.register()

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
        """A round failed: recovery must wait for the database to be back long enough."""
        metrics.DATABASE_ERRORS.inc()
        self.database_lost()
