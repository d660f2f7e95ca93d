"""Figures about the tasks: stats, unreadable documents, the dashboard's summary and
the queue figures of /metrics (each read served by an index)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo
from pymongo import ASCENDING

from service.models import State, Task
from service.store.base import (
    EARLIEST_RUN_AT,
    TIME_SORT,
    Database,
    label,
    stale_filter,
    unavailable,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """Counts for the people on call."""

    by_state_and_type: dict[tuple[str, str], int]
    oldest_due: Task | None
    stale: int
    unreadable: int = 0


@dataclass(frozen=True)
class QueueFigures:
    """The queue as the database saw it at `now` (its clock): counts keyed by the stored
    (state, type) values, whatever they are; tasks due but not started; the run_at of the
    oldest of them; STARTED tasks whose heartbeat is older than the stale threshold."""

    by_state_and_type: dict[tuple[Any, Any], int]
    due: int
    oldest_due: datetime | None
    stale: int
    now: datetime


# Documents stuck because of their shape: in no known state, typeless, waiting without a
# date to wait for or with attempts no claim can count, or started without a heartbeat
# that recovery could judge (an earlier version's STARTED task may still be running).
UNREADABLE: dict[str, Any] = {
    "$or": [
        {"state": {"$nin": [s.value for s in State]}},
        {"type": {"$not": {"$type": "string"}}},
        {"state": State.NOTSTARTED.value, "run_at": {"$not": {"$type": "date"}}},
        {"state": State.STARTED.value, "heartbeat_at": {"$not": {"$type": "date"}}},
    ]
}


class Figures:
    """Counts and samples of the tasks for operators, the dashboard and /metrics."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.clock = db.clock

    @unavailable
    async def stats(self, stale_after: float) -> Stats:
        """Counts by state and type, the oldest due task, and how many are stale."""
        counts: dict[tuple[str, str], int] = {}
        pipeline = [{"$group": {"_id": {"state": "$state", "type": "$type"}, "n": {"$sum": 1}}}]
        async for row in await self.tasks.aggregate(pipeline):
            # $group leaves a missing field out of its key: such documents count as "(none)".
            key = row["_id"]
            counts[(label(key.get("state")), label(key.get("type")))] = row["n"]
        oldest = await self.tasks.find_one(
            {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}},
            sort=TIME_SORT,
        )
        stale = await self.tasks.count_documents(stale_filter(self.clock, stale_after))
        unreadable = await self.tasks.count_documents(UNREADABLE)
        oldest_task = None if oldest is None else Task.from_document(oldest)
        return Stats(counts, oldest_task, stale, unreadable)

    @unavailable
    async def unreadable(self, *, limit: int) -> list[Task]:
        """Documents no worker will claim or recover because of what they hold (see
        UNREADABLE); they stay as they are until a person fixes or deletes them."""
        cursor = self.tasks.find(UNREADABLE).sort("_id", ASCENDING).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    @unavailable
    async def count_due(self) -> int:
        """NOTSTARTED tasks already due: the backlog (the time index answers it)."""
        due = {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}}
        return await self.tasks.count_documents(due)

    @unavailable
    async def latest(self, state: State, *, limit: int) -> list[Task]:
        """The last `limit` tasks in `state` by run_at (the time index read backwards)."""
        order = [("run_at", pymongo.DESCENDING), ("_id", pymongo.DESCENDING)]
        cursor = self.tasks.find({"state": state.value}).sort(order).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    @unavailable
    async def stale_sample(self, stale_after: float, *, limit: int) -> list[Task]:
        """At most `limit` of the tasks find_stale returns, oldest heartbeat first."""
        query = stale_filter(self.clock, stale_after)
        cursor = self.tasks.find(query).sort("heartbeat_at", ASCENDING).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    @unavailable
    async def queue_figures(self, *, stale_after: float) -> QueueFigures:
        """Tasks by state and type, due, the oldest due run_at and the stale count."""
        now = self.clock.now()
        by_type = await self._count_by_type()
        unfinished = await self._count_unfinished()
        due = {"state": State.NOTSTARTED.value, "run_at": {"$gte": EARLIEST_RUN_AT, "$lte": now}}
        due_count = await self.tasks.count_documents(due)
        oldest = await self.tasks.find_one(
            due, projection={"run_at": True, "_id": False}, sort=TIME_SORT
        )
        stale = await self.tasks.count_documents(stale_filter(self.clock, stale_after))
        counts = dict(unfinished)
        # COMPLETE by type: every task of the type less those in another state.
        for task_type, total in by_type.items():
            complete = total - sum(n for (_, t), n in unfinished.items() if t == task_type)
            if complete > 0:  # less is a task that changed state between the two reads
                counts[(State.COMPLETE.value, task_type)] = complete
        oldest_run_at = None if oldest is None else oldest.get("run_at")
        return QueueFigures(
            by_state_and_type=counts,
            due=due_count,
            oldest_due=oldest_run_at if isinstance(oldest_run_at, datetime) else None,
            stale=stale,
            now=now,
        )

    async def _count_by_type(self) -> dict[Any, int]:
        # Sorted on the by_type index and needing no other field: a covered index scan.
        pipeline: list[dict[str, Any]] = [
            {"$sort": {"type": ASCENDING}},
            {"$group": {"_id": "$type", "n": {"$sum": 1}}},
        ]
        return {row["_id"]: row["n"] async for row in await self.tasks.aggregate(pipeline)}

    async def _count_unfinished(self) -> dict[tuple[Any, Any], int]:
        # The time index's bounds on either side of COMPLETE; odd states included.
        pipeline: list[dict[str, Any]] = [
            {"$match": {"state": {"$ne": State.COMPLETE.value}}},
            {"$group": {"_id": {"state": "$state", "type": "$type"}, "n": {"$sum": 1}}},
        ]
        return {
            (row["_id"].get("state"), row["_id"].get("type")): row["n"]
            async for row in await self.tasks.aggregate(pipeline)
        }
