"""The schedule job: each worker turns coming occurrences of recurring schedules into tasks.

Every worker runs it; exactly one task per occurrence is made however many do. A round
reads the schedules whose next occurrence falls before the next round (now plus
`lookahead`: the interval with its jitter and a margin), inserts the task of the occurrence,
due at it (the unique (schedule_id, occurrence) index refuses a second one: another worker
made it), then moves the schedule's next occurrence on with an update fenced on the value it
read and on the schedule not being paused. A crash between the two writes leaves the
occurrence to the next round: its insert is refused, and its advance completes the step.

Tasks made ahead are ordinary waiting tasks (run_at = occurrence): the workers' wake-ups
start each at its occurrence, as any task created ahead of its run_at, whatever the interval
(a task made only once due would start up to an interval and its jitter late). What is still
made late is what no earlier round could see coming: an occurrence less than about an
interval after the schedule was created or resumed, one while no worker ran, and past
CATCH_UP occurrences of one schedule per round.

Deleting or pausing a schedule withdraws its tasks whose occurrence has not come yet (a pause
also moves next_at back to the first of them). A round that read the schedule just before
may still insert one after that withdrawal; its fenced advance then fails, and the round
withdraws that task itself if the schedule is gone or paused. What remains: that task runs if
it is due by then, and a resume landing between the round's look and its withdrawal can lose
that one occurrence.

Occurrences found on time (within two rounds and a second) are each made. Occurrences
missed while no worker ran never come as a burst: a schedule whose missed policy is
`latest` creates only the latest one; `skip` creates none and waits for the next.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from service.clock import DbClock
from service.models import MissedPolicy, Schedule, Task
from service.periodic import Periodic
from service.store.occurrences import latest_occurrence, next_occurrence
from service.store.schedules import Schedules
from service.worker import metrics

logger = logging.getLogger(__name__)

BATCH = 100
# At most this many occurrences of one schedule per round (a period much shorter than the
# interval); the rest wait for the next round.
CATCH_UP = 20
# How much earlier than the next round's look a task is made: that round's own duration,
# the clock's error and the insert's announcement to the workers fit well within it.
LOOKAHEAD_MARGIN = 1.0


class Scheduler(Periodic):
    """Creates the task of each coming occurrence, once, and advances the schedule."""

    def __init__(self, schedules: Schedules, *, clock: DbClock, interval: float) -> None:
        super().__init__(interval=interval, jitter=0.1)
        self.schedules = schedules
        self.clock = clock
        # An occurrence found later than this was missed (the workers were down, or the
        # schedule paused); one found sooner is merely late by a round or two, and is made.
        self.late_after = timedelta(seconds=2 * interval + 1.0)
        # Occurrences up to this far ahead are made now: the next round may come as late as
        # the interval plus its jitter, and would find them due already.
        self.lookahead = timedelta(seconds=interval * (1 + self.jitter) + LOOKAHEAD_MARGIN)

    async def run_once(self) -> int:
        """One round over the schedules with an occurrence before the next round; returns
        how many tasks this worker created."""
        now = self.clock.surely_now()
        created = 0
        for schedule in await self.schedules.due(now=now + self.lookahead, limit=BATCH):
            created += await self.materialise(schedule, now)
        return created

    async def materialise(self, schedule: Schedule, now: datetime) -> int:
        """Make the schedule's occurrences up to `now` + lookahead, one by one while they
        are on time; one found later than `late_after` (the workers were down, or it was
        paused) follows the missed policy. Returns how many tasks this call created."""
        horizon = now + self.lookahead
        created = 0
        for _ in range(CATCH_UP):
            occurrence = schedule.next_at
            if occurrence is None or occurrence > horizon:
                break
            missed = now - occurrence > self.late_after
            if missed:
                occurrence = latest_occurrence(schedule, now) or occurrence
            task = None
            if not missed or schedule.missed != MissedPolicy.SKIP:
                task = await self._make(schedule, occurrence, missed=missed)
            else:
                logger.info(
                    "schedule %s: missed occurrences from %s to %s skipped",
                    schedule.id,
                    occurrence_text(schedule.next_at),
                    occurrence_text(occurrence),
                )
            following = next_occurrence(schedule, occurrence, inclusive=False)
            if not await self.schedules.advance(schedule, to=following, now=now):
                # Another worker moved it on, or it was paused or deleted meanwhile.
                if task is not None and not await self._withdrawn(schedule, task):
                    created += 1
                break
            created += task is not None
            schedule = dataclasses.replace(schedule, next_at=following)
        return created

    async def _make(self, schedule: Schedule, occurrence: datetime, *, missed: bool) -> Task | None:
        task = await self.schedules.create_occurrence(schedule, occurrence)
        if task is None:
            return None  # another worker made it
        logger.info(
            "schedule %s: task %s (%s) for %s%s",
            schedule.id,
            task.id,
            task.type,
            occurrence_text(occurrence),
            " (the latest missed occurrence)" if missed else "",
        )
        return task

    async def _withdrawn(self, schedule: Schedule, task: Task) -> bool:
        """The task this round just made, after its advance failed: if the schedule was
        paused or deleted since this round read it, the pause's or delete's withdrawal may
        have come before the insert, so withdraw the task here unless it is due already."""
        if await self.schedules.active(schedule):
            return False  # another worker advanced it: the task stands
        if await self.schedules.withdraw_ahead(schedule, task_id=task.id) is None:
            return False
        logger.info(
            "schedule %s: task %s withdrawn (the schedule was paused or deleted meanwhile)",
            schedule.id,
            task.id,
        )
        return True

    def on_unavailable(self) -> None:
        """Periodic's hook: this round found no database."""
        metrics.DATABASE_ERRORS.inc()


def occurrence_text(moment: datetime | None) -> str:
    """An occurrence as the log shows it."""
    return "?" if moment is None else moment.isoformat()
