"""Recurring schedules.

One document per schedule in its own collection, holding its next occurrence
(`next_at`). Workers turn a due occurrence into an ordinary task carrying
`schedule_id` and `occurrence`; the unique index OCCURRENCE_INDEX on those two makes
that insert idempotent, and advancing `next_at` is fenced on its old value."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from service.clock import to_millis
from service.models import MissedPolicy, Schedule, State, Task
from service.store.base import Database, id_filter, new_task_document, object_id, unavailable
from service.store.occurrences import (
    Timing,
    latest_occurrence,
    next_occurrence,
    timing_problems,
)

logger = logging.getLogger(__name__)

# How long a schedule found unusable is kept out of the due reads before it is read again.
UNUSABLE_KEPT_OUT = 300.0
OCCURRENCE_INDEX = "schedule_occurrence"


class Schedules:
    """The schedules collection, and the tasks its occurrences become."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.schedules = db.schedules
        self.clock = db.clock
        # Schedules found unusable, kept out of `due` until UNUSABLE_KEPT_OUT has passed,
        # and what was last logged of each (a schedule is logged once per set of problems).
        self._unusable: dict[Any, tuple[str, ...]] = {}
        self._unusable_until = 0.0
        self._logged: dict[Any, tuple[str, ...]] = {}

    @unavailable
    async def ensure_indexes(self) -> None:
        """The due-schedule index, and the unique (schedule_id, occurrence) index on tasks:
        partial, so tasks no schedule created (without schedule_id) are not in it."""
        await self.schedules.create_index(
            [("paused", ASCENDING), ("next_at", ASCENDING)], name="due"
        )
        await self.tasks.create_index(
            [("schedule_id", ASCENDING), ("occurrence", ASCENDING)],
            name=OCCURRENCE_INDEX,
            unique=True,
            partialFilterExpression={"schedule_id": {"$exists": True}},
        )

    @unavailable
    async def create(self, *, template: Mapping[str, Any], timing: Timing) -> Schedule:
        """Insert a schedule: `template` holds the task's type, args, priority, max_attempts,
        timeout, tags, queue and callback_url (as the API checked them); its first occurrence
        is computed now."""
        now = self.clock.surely_now()
        anchor = None
        if timing.every is not None:
            anchor = to_millis(timing.start_at or now + timedelta(seconds=timing.every))
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            **{k: v for k, v in template.items() if v is not None},
            "cron": timing.cron,
            "timezone": timing.timezone,
            "every": timing.every,
            "anchor": anchor,
            "start_at": timing.start_at,
            "end_at": timing.end_at,
            "missed": timing.missed,
            "paused": False,
            "created_at": now,
        }
        doc = {k: v for k, v in doc.items() if v is not None}
        doc["next_at"] = next_occurrence(Schedule.from_document(doc), now, inclusive=True)
        await self.schedules.insert_one(doc)
        return Schedule.from_document(doc)

    @unavailable
    async def get(self, schedule_id: str) -> Schedule | None:
        """The schedule with this id, or None."""
        doc = await self.schedules.find_one(id_filter(schedule_id))
        return None if doc is None else read_schedule(doc)

    @unavailable
    async def page(self, *, limit: int) -> list[Schedule]:
        """Up to `limit` schedules, oldest first."""
        cursor = self.schedules.find({}).sort("_id", ASCENDING).limit(limit)
        return [read_schedule(doc) async for doc in cursor]

    @unavailable
    async def unusable(self, *, limit: int = 10_000) -> int:
        """How many schedules, of the first `limit`, cannot be used as stored (`problems`)."""
        cursor = self.schedules.find({}).limit(limit)
        return len([doc async for doc in cursor if read_schedule(doc).problems])

    @unavailable
    async def delete(self, schedule_id: str) -> bool:
        """Delete a schedule and the tasks it made ahead whose occurrence has not come yet
        (those already due or running stay); False if there was none."""
        doc = await self.schedules.find_one_and_delete(id_filter(schedule_id))
        if doc is None:
            return False
        await self.tasks.delete_many(self._ahead(doc["_id"]))
        return True

    @unavailable
    async def pause(self, schedule_id: str, *, paused: bool) -> Schedule | None:
        """Pause or resume a schedule; None if there is none. Pausing withdraws the tasks
        made ahead for occurrences not come yet (withdraw_ahead). Resuming leaves `next_at`
        as it is, so the occurrences missed meanwhile follow the schedule's missed policy."""
        doc = await self.schedules.find_one_and_update(
            id_filter(schedule_id),
            {"$set": {"paused": paused}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        schedule = read_schedule(doc)
        if not paused:
            return await self._resumed(schedule)
        earliest = await self.withdraw_ahead(schedule)
        if earliest is not None and (schedule.next_at is None or earliest < schedule.next_at):
            doc["next_at"] = earliest
        return read_schedule(doc)

    async def _resumed(self, schedule: Schedule) -> Schedule:
        """A resumed schedule whose next occurrence came during the pause: the occurrences
        of the pause follow its missed policy (`latest`: the latest of them, once; `skip`:
        none), fenced on `next_at` as a round's advance is."""
        now = self.clock.surely_now()
        if schedule.next_at is None or schedule.next_at > now or schedule.problems:
            return schedule
        if schedule.missed == MissedPolicy.SKIP:
            to = next_occurrence(schedule, now, inclusive=False)
        else:
            to = latest_occurrence(schedule, now)
        if to == schedule.next_at:
            return schedule
        result = await self.schedules.update_one(
            {"_id": schedule.key, "next_at": schedule.next_at, "paused": False},
            {"$set": {"next_at": to}},
        )
        return dataclasses.replace(schedule, next_at=to) if result.modified_count else schedule

    def _ahead(self, schedule_key: Any) -> dict[str, Any]:
        # A schedule's tasks whose occurrence has not come yet on the database clock. A task
        # a worker claimed is STARTED and never matches; one falling due within the clock's
        # error (milliseconds) may go either way. "$exists" repeats OCCURRENCE_INDEX's
        # partial filter, so MongoDB plans it on that index (SecantusDB scans: 4 ms at 20k).
        now = self.clock.now()
        return {
            "schedule_id": {"$eq": str(schedule_key), "$exists": True},
            "occurrence": {"$gt": now},
            "state": State.NOTSTARTED.value,
            "run_at": {"$gt": now},
        }

    @unavailable
    async def withdraw_ahead(
        self, schedule: Schedule, *, task_id: str | None = None
    ) -> datetime | None:
        """Delete the schedule's tasks made ahead whose occurrence has not come yet (with
        `task_id`, only that one) and move its `next_at` back to the earliest of them, so
        they are made again if it runs again. Returns that occurrence, None if none was."""
        ahead = self._ahead(schedule.key)
        if task_id is not None:
            ahead["_id"] = object_id(task_id)
        first = await self.tasks.find_one(
            ahead, {"occurrence": 1}, sort=[("occurrence", ASCENDING)]
        )
        if first is None:
            return None
        await self.tasks.delete_many(ahead)
        earliest: datetime = first["occurrence"]
        await self.schedules.update_one(
            {"_id": schedule.key, "$or": [{"next_at": None}, {"next_at": {"$gt": earliest}}]},
            {"$set": {"next_at": earliest}},
        )
        return earliest

    @unavailable
    async def active(self, schedule: Schedule) -> bool:
        """True while the schedule exists and is not paused."""
        doc = await self.schedules.find_one({"_id": schedule.key}, {"paused": 1})
        return doc is not None and doc.get("paused") is not True

    @unavailable
    async def due(self, *, now: datetime, limit: int) -> list[Schedule]:
        """Schedules not paused whose next occurrence is at or before `now` (the due index;
        the schedule job passes a moment ahead of the clock). A schedule that cannot be
        used as stored (`problems`) is left alone, logged once, and kept out of the next
        reads for a while, so that it does not take the place of good ones."""
        if time.monotonic() > self._unusable_until:
            self._unusable_until = time.monotonic() + UNUSABLE_KEPT_OUT
            self._unusable.clear()  # mended documents come back
        due: dict[str, Any] = {"paused": False, "next_at": {"$lte": now}}
        if self._unusable:
            due["_id"] = {"$nin": list(self._unusable)}
        cursor = self.schedules.find(due).sort("next_at", ASCENDING).limit(limit)
        usable = []
        async for doc in cursor:
            schedule = read_schedule(doc)
            if not schedule.problems:
                usable.append(schedule)
                continue
            self._unusable[schedule.key] = schedule.problems
            if self._logged.get(schedule.key) != schedule.problems:
                self._logged[schedule.key] = schedule.problems
                logger.warning(
                    "schedule %s is left alone: %s", schedule.id, "; ".join(schedule.problems)
                )
        return usable

    @unavailable
    async def create_occurrence(self, schedule: Schedule, occurrence: datetime) -> Task | None:
        """Insert the task of one occurrence, due at it; None if a task for it exists
        already (another worker made it: the unique index refused this one)."""
        doc = new_task_document(
            self.clock,
            ObjectId(),
            task_type=schedule.type,
            run_at=None,
            max_attempts=schedule.max_attempts or 1,
            args=schedule.args,
            priority=schedule.priority,
            time_limit=schedule.timeout,
            tags=schedule.tags,
            queue=schedule.queue,
            callback_url=schedule.callback_url,
        )
        doc.update(run_at=occurrence, schedule_id=schedule.id, occurrence=occurrence)
        try:
            await self.tasks.insert_one(doc)
        except DuplicateKeyError:
            return None
        return Task.from_document(doc)

    @unavailable
    async def advance(self, schedule: Schedule, *, to: datetime | None, now: datetime) -> bool:
        """Move the schedule's next occurrence on to `to` (None: it has no more), fenced on
        the value it was read with: of workers racing, one advances it; False for the rest,
        and if the schedule was deleted or paused meanwhile."""
        result = await self.schedules.update_one(
            {"_id": schedule.key, "next_at": schedule.next_at, "paused": False},
            {"$set": {"next_at": to, "advanced_at": now}},
        )
        return result.modified_count == 1


def read_schedule(doc: Mapping[str, Any]) -> Schedule:
    """A stored schedule, with what stops its cron expression or time zone from giving
    occurrences among its `problems`; never raises."""
    schedule = Schedule.from_document(doc)
    timing = timing_problems(schedule)
    return (
        dataclasses.replace(schedule, problems=schedule.problems + timing) if timing else schedule
    )
