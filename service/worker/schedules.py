"""The schedule job: each worker turns coming occurrences of recurring schedules into tasks.

Every worker runs it; exactly one task per occurrence is made however many do. A round
reads the schedules whose next occurrence falls before the next round (now plus the
lookahead: the interval with its jitter and a margin) and makes their tasks
(service.store.materialiser: insert under a unique (schedule_id, occurrence) index, then a
fenced advance). The API makes those of the first lookahead itself when it creates or resumes
a schedule.

Tasks made ahead are ordinary waiting tasks (run_at = occurrence): the workers' wake-ups
start each at its occurrence, as any task created ahead of its run_at, whatever the interval.
What is still made late is what no earlier round could see coming: occurrences while no
worker ran, and past CATCH_UP occurrences of one schedule per round.

Deleting or pausing a schedule withdraws its tasks whose occurrence has not come yet (a pause
also moves next_at back to the first of them). A round that read the schedule just before
may still insert one after that withdrawal; its fenced advance then fails, and the round
withdraws that task itself if the schedule is gone or paused. What remains: that task runs if
it is due by then, and a resume landing between the round's look and its withdrawal can lose
that one occurrence.
"""

from __future__ import annotations

import logging

from service.clock import DbClock
from service.periodic import Periodic
from service.store.materialiser import JITTER, Materialiser
from service.store.schedules import Schedules
from service.worker import metrics

logger = logging.getLogger(__name__)

BATCH = 100


class Scheduler(Periodic):
    """Each round, creates the task of each coming occurrence, once, and advances the
    schedule."""

    def __init__(self, schedules: Schedules, *, clock: DbClock, interval: float) -> None:
        super().__init__(interval=interval, jitter=JITTER)
        self.schedules = schedules
        self.clock = clock
        self.maker = Materialiser(schedules, interval=interval)

    async def run_once(self) -> int:
        """One round over the schedules with an occurrence before the next round; returns
        how many tasks this worker created."""
        now = self.clock.surely_now()
        created = 0
        due = await self.schedules.due(now=now + self.maker.lookahead, limit=BATCH)
        for schedule in due:
            created += await self.maker.materialise(schedule, now)
        return created

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()
