"""The schedule job: each worker turns due occurrences of recurring schedules into tasks.

Every worker runs it; exactly one task per occurrence is made however many do. A round
reads the schedules whose next occurrence is due on the database clock, inserts the task of
the occurrence (the unique (schedule_id, occurrence) index refuses a second one: another
worker made it), then moves the schedule's next occurrence on with an update fenced on the
value it read. A crash between the two writes leaves the occurrence due: the next round's
insert is refused, and its advance completes the step.

Occurrences found on time (within two rounds and a second) are each made. Occurrences
missed while no worker ran never come as a burst: a schedule whose missed policy is
`latest` creates only the latest one; `skip` creates none and waits for the next.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from service import worker_metrics as metrics
from service.models import MissedPolicy, Schedule
from service.periodic import Periodic
from service.store import TaskStore, latest_occurrence, next_occurrence

logger = logging.getLogger(__name__)

BATCH = 100
# At most this many on-time occurrences of one schedule per round (a period shorter than
# the interval); the rest wait for the next round.
CATCH_UP = 20


class Scheduler(Periodic):
    """Creates the task of each due occurrence, once, and advances the schedule."""

    def __init__(self, store: TaskStore, *, interval: float) -> None:
        super().__init__(interval=interval, jitter=0.1)
        self.store = store
        # An occurrence found later than this was missed (the workers were down, or the
        # schedule paused); one found sooner is merely late by a round or two, and is made.
        self.late_after = timedelta(seconds=2 * interval + 1.0)

    async def run_once(self) -> int:
        """One round over the due schedules; returns how many tasks this worker created."""
        now = self.store.clock.surely_now()
        created = 0
        for schedule in await self.store.due_schedules(now=now, limit=BATCH):
            created += await self.materialise(schedule, now)
        return created

    async def materialise(self, schedule: Schedule, now: datetime) -> int:
        """Make the schedule's due occurrences, one by one while they are on time; one found
        later than `late_after` (the workers were down, or it was paused) follows the missed
        policy. Returns how many tasks this call created."""
        created = 0
        for _ in range(CATCH_UP):
            occurrence = schedule.next_at
            if occurrence is None or occurrence > now:
                break
            missed = now - occurrence > self.late_after
            if missed:
                occurrence = latest_occurrence(schedule, now) or occurrence
            if not missed or schedule.missed != MissedPolicy.SKIP:
                created += await self._make(schedule, occurrence, missed=missed)
            else:
                logger.info(
                    "schedule %s: missed occurrences from %s to %s skipped",
                    schedule.id,
                    occurrence_text(schedule.next_at),
                    occurrence_text(occurrence),
                )
            following = next_occurrence(schedule, occurrence, inclusive=False)
            if not await self.store.advance_schedule(schedule, to=following, now=now):
                break  # another worker moved it on (or it was deleted)
            schedule = dataclasses.replace(schedule, next_at=following)
        return created

    async def _make(self, schedule: Schedule, occurrence: datetime, *, missed: bool) -> int:
        task = await self.store.create_occurrence(schedule, occurrence)
        if task is None:
            return 0  # another worker made it
        logger.info(
            "schedule %s: task %s (%s) for %s%s",
            schedule.id,
            task.id,
            task.type,
            occurrence_text(occurrence),
            " (the latest missed occurrence)" if missed else "",
        )
        return 1

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()


def occurrence_text(moment: datetime | None) -> str:
    """An occurrence as the log shows it."""
    return "?" if moment is None else moment.isoformat()
