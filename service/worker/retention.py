"""Retention: COMPLETE and FAILED tasks are deleted TASK_RUNNER_RETENTION seconds after
they finished, so the collection (and with it the claim's cost on servers whose claim
grows with the collection) does not grow for ever.

A TTL index on `finished_at` does the work where the server has a TTL monitor (MongoDB and
SecantusDB both do: each sweeps about once a minute). Behind it, each worker runs a bounded
delete now and then for what the monitor has left well past its time: on a server without
one it does the work, on a server with one it finds nothing (one indexed read).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from service.clock import DbClock
from service.periodic import Periodic
from service.store.retention import Expiry
from service.worker import metrics

logger = logging.getLogger(__name__)

# A TTL monitor sweeps about every 60 s; past this much more, the sweep is ours to do.
TTL_GRACE = 300.0
SWEEP_LIMIT = 1000


class Retention(Periodic):
    """Keeps the TTL index in step with the setting; deletes what a TTL monitor left."""

    def __init__(
        self,
        expiry: Expiry,
        *,
        clock: DbClock,
        retention: float,
        interval: float = 60.0,
        grace: float = TTL_GRACE,
    ) -> None:
        super().__init__(interval=interval, jitter=0.25)
        self.expiry = expiry
        self.clock = clock
        self.retention = retention
        self.grace = grace

    async def ensure(self) -> None:
        """Create, change or drop the TTL index to match the setting (at start-up)."""
        done = await self.expiry.ensure(self.retention)
        if done in ("created", "changed", "dropped"):
            kept = "for ever" if self.retention <= 0 else f"for {self.retention:g}s"
            logger.info("retention index %s: finished tasks are kept %s", done, kept)

    async def run_once(self) -> int:
        """Delete up to SWEEP_LIMIT tasks finished longer ago than retention + grace."""
        if self.retention <= 0:
            return 0
        cutoff = self.clock.surely_now() - timedelta(seconds=self.retention + self.grace)
        deleted = await self.expiry.delete_expired(finished_before=cutoff, limit=SWEEP_LIMIT)
        if deleted:
            logger.info("retention: deleted %d finished task(s) the TTL monitor left", deleted)
        return deleted

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()
