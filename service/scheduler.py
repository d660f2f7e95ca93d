"""The schedule job: each worker turns due occurrences of recurring schedules into tasks.

Every worker runs it; exactly one task per occurrence is made however many do. A round
reads the schedules whose next occurrence is due on the database clock, inserts the task of
the occurrence (the unique (schedule_id, occurrence) index refuses a second one: another
worker made it), then moves the schedule's next occurrence on with an update fenced on the
value it read. A crash between the two writes leaves the occurrence due: the next round's
insert is refused, and its advance completes the step.

Occurrences missed while no worker ran never come as a burst: a schedule whose missed
policy is `latest` creates only the latest one; `skip` creates none and waits for the next.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from service import worker_metrics as metrics
from service.models import MissedPolicy, Schedule
from service.periodic import Periodic
from service.store import TaskStore, latest_occurrence, next_occurrence

logger = logging.getLogger(__name__)

BATCH = 100


class Scheduler(Periodic):
    """Creates the task of each due occurrence, once, and advances the schedule."""

    def __init__(self, store: TaskStore, *, interval: float) -> None:
        super().__init__(interval=interval, jitter=0.1)
        self.store = store
        # An occurrence picked up later than this is missed (the workers were down), not
        # merely found at the next round.
        self.late_after = timedelta(seconds=2 * interval + 1.0)

    async def run_once(self) -> int:
        """One round over the due schedules; returns how many tasks this worker created."""
        now = self.store.clock.surely_now()
        created = 0
        for schedule in await self.store.due_schedules(now=now, limit=BATCH):
            created += await self.materialise(schedule, now)
        return created

    async def materialise(self, schedule: Schedule, now: datetime) -> int:
        """Create the task of the schedule's due occurrence as its missed policy says, then
        advance it past `now`. Returns 1 if this call created the task, else 0."""
        occurrence = latest_occurrence(schedule, now)
        if occurrence is None:
            return 0
        missed = occurrence != schedule.next_at or now - occurrence > self.late_after
        created = 0
        if schedule.missed != MissedPolicy.SKIP or not missed:
            task = await self.store.create_occurrence(schedule, occurrence)
            if task is not None:
                created = 1
                logger.info(
                    "schedule %s: task %s (%s) for %s%s",
                    schedule.id,
                    task.id,
                    task.type,
                    occurrence.isoformat(),
                    " (the latest missed occurrence)" if missed else "",
                )
        else:
            logger.info(
                "schedule %s: missed occurrences from %s to %s skipped",
                schedule.id,
                schedule.next_at.isoformat() if schedule.next_at else "?",
                occurrence.isoformat(),
            )
        following = next_occurrence(schedule, occurrence, inclusive=False)
        await self.store.advance_schedule(schedule, to=following, now=now)
        return created

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()
