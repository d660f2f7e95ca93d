"""Recovery: STARTED tasks whose worker went silent go back to the queue (or FAILED)."""

from __future__ import annotations

import logging

from service.periodic import Periodic
from service.store import TaskStore

logger = logging.getLogger(__name__)


class Recoverer(Periodic):
    """Runs the store's single conditional recovery update every `interval` seconds."""

    def __init__(self, store: TaskStore, *, stale_after: float, interval: float) -> None:
        super().__init__(interval=interval, jitter=0.25)
        self.store = store
        self.stale_after = stale_after

    async def run_once(self) -> int:
        """Recover what is stale now; returns how many tasks were moved."""
        moved = await self.store.recover_stale(self.stale_after)
        if moved:
            logger.warning(
                "recovered %d stale task(s) (no heartbeat for %.1fs)", moved, self.stale_after
            )
        return moved
