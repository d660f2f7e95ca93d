"""Recovery: STARTED tasks whose worker went silent go back to the queue (or FAILED)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo import monitoring

from service.clock import DbClock
from service.periodic import Periodic
from service.store.claims import Claims
from service.store.slots import SlotTable
from service.worker import metrics

logger = logging.getLogger(__name__)


class Recoverer(Periodic):
    """Runs the store's single conditional recovery update every `interval` seconds.

    After this process starts or loses the database, it waits until it has seen the
    database answer for a whole stale threshold before recovering anything: when the
    database comes back from an outage every heartbeat looks old, and live workers need
    that long to refresh theirs. Without the wait, a restart of the database would
    requeue every running task and run it twice.

    With `slots` (this worker has TASK_RUNNER_TYPE_LIMITS), each round then frees the
    concurrency-limit slots whose lease no longer holds a STARTED task: those of the tasks
    just recovered, of dead workers, of claims that never landed.
    """

    def __init__(
        self,
        claims: Claims,
        *,
        clock: DbClock,
        ping: Callable[[], Awaitable[None]],
        stale_after: float,
        interval: float,
        slots: SlotTable | None = None,
    ) -> None:
        super().__init__(interval=interval, jitter=0.25)
        self.claims = claims
        self.clock = clock
        self.ping = ping
        self.stale_after = stale_after
        self.slots = slots
        self._reachable_since: float | None = None

    def database_lost(self) -> None:
        """Note that the database did not answer (from any of this process's calls)."""
        self._reachable_since = None

    async def run_once(self) -> int:
        """Recover what is stale now; returns how many tasks were moved."""
        if self._reachable_since is None:
            await self.ping()
            self._reachable_since = time.monotonic()
        if time.monotonic() - self._reachable_since < self.stale_after:
            return 0
        began = self.clock.surely_now()
        moved = await self.claims.recover_stale(self.stale_after, within=self.stale_after / 4)
        logger.debug(
            "recovery began %s (reachable %.2fs), moved %d",
            began.isoformat(),
            time.monotonic() - self._reachable_since,
            moved,
        )
        if moved:
            metrics.RECOVERED.inc(moved)
            logger.warning(
                "recovered %d stale task(s) (no heartbeat for %.1fs)", moved, self.stale_after
            )
        if self.slots is not None:
            # After the tasks: a slot is freed only once its task has left STARTED.
            freed = await self.slots.free_lost(self.stale_after, within=self.stale_after / 4)
            if freed:
                logger.warning("freed %d concurrency slot(s) held by no running task", freed)
        return moved

    def on_unavailable(self) -> None:
        """Periodic's hook: the last round failed for want of the database."""
        metrics.DATABASE_ERRORS.inc()
        self.database_lost()


class OutageWatch(monitoring.ServerHeartbeatListener):
    """The driver's own server monitor, watched for outages that this process's calls may
    not have met (an idle worker sends few): a failed check (the monitor streams its
    checks, so a server that goes away is seen at once) or another server process answering
    (its topologyVersion's processId changed: a restart between two checks) calls
    `on_outage`, which the worker points at Recoverer.database_lost, so that recovery waits
    a whole stale threshold again before it judges any heartbeat."""

    def __init__(self) -> None:
        self.on_outage: Callable[[], None] = _nothing
        self._process: dict[Any, Any] = {}  # the server process seen at each address

    def started(self, event: monitoring.ServerHeartbeatStartedEvent) -> None:
        """Nothing to see until the check ends."""

    def succeeded(self, event: monitoring.ServerHeartbeatSucceededEvent) -> None:
        """A new process at an address that answered before: the server restarted."""
        version = event.reply.topology_version
        process = None if version is None else version.get("processId")
        seen = self._process.get(event.connection_id)
        self._process[event.connection_id] = process
        if seen is not None and process != seen:
            self.on_outage()

    def failed(self, event: monitoring.ServerHeartbeatFailedEvent) -> None:
        """The server did not answer the driver's check."""
        self.on_outage()


def _nothing() -> None:
    pass
