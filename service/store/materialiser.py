"""Making the tasks of a schedule's coming occurrences: once each, a little ahead of them.

The schedule job of every worker does it each round, and the API does it for a schedule it
has just created or resumed, so that occurrences within the first round are made ahead too.
For each occurrence before now plus `lookahead` (the round's interval with its jitter and a
margin), the task is inserted, due at the occurrence (the unique (schedule_id, occurrence)
index refuses a second one: someone else made it), then the schedule's next occurrence is
moved on with an update fenced on the value read and on the schedule not being paused. A
crash between the two writes leaves the occurrence to the next round: its insert is refused,
and its advance completes the step.

Occurrences found on time (within two rounds and a second) are each made. Occurrences missed
while no worker ran never come as a burst: a schedule whose missed policy is `latest` creates
only the latest one; `skip` creates none and waits for the next.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from service.models import MissedPolicy, Schedule, Task
from service.store.occurrences import latest_occurrence, next_occurrence
from service.store.schedules import Schedules

logger = logging.getLogger(__name__)

# At most this many occurrences of one schedule per round (a period much shorter than the
# interval); the rest wait for the next round.
CATCH_UP = 20
# The rounds' jitter: each waits its interval plus up to this share of it.
JITTER = 0.1
# How much earlier than the next round's look a task is made: that round's own duration,
# the clock's error and the insert's announcement to the workers fit well within it.
LOOKAHEAD_MARGIN = 1.0


class Materialiser:
    """Creates the task of each coming occurrence of a schedule, once, and advances it."""

    def __init__(self, schedules: Schedules, *, interval: float) -> None:
        """`interval`: seconds between the schedule job's rounds (TASK_RUNNER_SCHEDULE_INTERVAL)."""
        self.schedules = schedules
        # An occurrence found later than this was missed (the workers were down, or the
        # schedule paused); one found sooner is merely late by a round or two, and is made.
        self.late_after = timedelta(seconds=2 * interval + 1.0)
        # Occurrences up to this far ahead are made now: the next round may come as late as
        # the interval plus its jitter, and would find them due already.
        self.lookahead = timedelta(seconds=interval * (1 + JITTER) + LOOKAHEAD_MARGIN)

    async def materialise(self, schedule: Schedule, now: datetime) -> int:
        """Make the schedule's occurrences up to `now` + lookahead, one by one while they
        are on time; one found later than `late_after` (the workers were down, or it was
        paused) follows the missed policy. Returns how many tasks this call created."""
        horizon = now + self.lookahead
        created = 0
        for _ in range(CATCH_UP):
            occurrence = schedule.next_at
            if occurrence is None or occurrence > horizon or schedule.problems:
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
        """The task just made, after its advance failed: if the schedule was paused or
        deleted since it was read, the pause's or delete's withdrawal may have come before
        the insert, so withdraw the task here unless it is due already."""
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


def occurrence_text(moment: datetime | None) -> str:
    """An occurrence as the log shows it."""
    return "?" if moment is None else moment.isoformat()
