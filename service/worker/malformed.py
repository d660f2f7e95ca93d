"""Documents no worker can take: found now and then, each logged once.

A document whose shape stops every worker from claiming or recovering it (no date to wait
for, attempts no claim can count, an unknown state, ...) stays where it is: a person fixes
or deletes it. Workers never fail on it; this job makes sure someone hears of it, once per
document and process rather than once per poll. `task-runner stats` counts them.
"""

from __future__ import annotations

import logging

from service.periodic import Periodic
from service.store.figures import Figures
from service.worker import metrics

logger = logging.getLogger(__name__)

# The first look comes this long after start (not at once: a worker's first seconds are
# for claiming, and its idle cost stays under a command a second).
FIRST_SCAN_AFTER = 20.0
# Looked at per round; beyond it the log says there are more and points at `stats`.
SCAN_LIMIT = 100
REMEMBERED = 10_000


class MalformedScan(Periodic):
    """Logs each document the workers cannot read, once."""

    def __init__(self, figures: Figures, *, interval: float) -> None:
        # The first look comes FIRST_SCAN_AFTER seconds after start; then every `interval`
        # seconds (it scans the collection, so not often).
        super().__init__(interval=FIRST_SCAN_AFTER, jitter=0.25)
        self.every = interval
        self.figures = figures
        self._logged: set[str] = set()

    async def run_once(self) -> int:
        """Look for unreadable documents; log the ones not logged yet. Returns how many."""
        self.interval = self.every
        found = await self.figures.unreadable(limit=SCAN_LIMIT)
        for task in found:
            if task.id in self._logged:
                continue
            if len(self._logged) < REMEMBERED:
                self._logged.add(task.id)
            logger.warning(
                "task %s cannot be run or recovered as stored, left as it is: %s",
                task.id,
                "; ".join(task.problems) or "state or shape unknown",
            )
        if len(found) == SCAN_LIMIT:
            logger.warning(
                "at least %d stored tasks cannot be read; `task-runner stats` counts them",
                SCAN_LIMIT,
            )
        return len(found)

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()
