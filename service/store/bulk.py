"""Actions on every task a filter matches (requeue, delete), one bounded batch at a time.

A batch reads at most `limit` ids of matching tasks (the filter always names the states, so
an index led by `state` serves it, with no sort), then makes one write to those ids that
checks the whole filter again: a task that changed meanwhile (claimed, requeued, deleted by
another client) is left as it now is. The caller repeats batches while it has time
(service.ops), so a million matches neither hold the database in one long write nor keep a
request past its timeout.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.models import State, TaskFilter
from service.store.base import Database, requeue_update, type_names, unavailable

# What a bulk requeue may take: finished tasks (a running or waiting one is never touched).
REQUEUEABLE = frozenset({State.FAILED, State.COMPLETE})


def filter_query(task_filter: TaskFilter, states: Collection[State]) -> dict[str, Any]:
    """The MongoDB filter of the tasks in `states` that match `task_filter` (its own `state`
    is for the caller to turn into `states`)."""
    values = sorted(state.value for state in states)
    query: dict[str, Any] = {"state": values[0] if len(values) == 1 else {"$in": values}}
    if task_filter.type is not None:
        query["type"] = {"$in": type_names([task_filter.type.lower()])}
    if task_filter.tag is not None:
        query["tags"] = task_filter.tag
    finished: dict[str, datetime] = {}
    if task_filter.finished_after is not None:
        finished["$gte"] = task_filter.finished_after
    if task_filter.finished_before is not None:
        finished["$lt"] = task_filter.finished_before
    if finished:
        query["finished_at"] = finished
    return query


@dataclass(frozen=True)
class Batch:
    """What one batch did: `found` ids read (the batch was full when it equals the limit),
    `done` tasks changed by the write."""

    found: int
    done: int


class BulkTasks:
    """Requeue or delete the tasks a filter matches, a bounded batch per call."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.clock = db.clock

    async def _ids(self, query: dict[str, Any], limit: int) -> list[Any]:
        cursor = self.tasks.find(query, projection={"_id": True}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    @unavailable
    async def requeue_batch(
        self, task_filter: TaskFilter, *, states: Collection[State], limit: int
    ) -> Batch:
        """Up to `limit` matching tasks in `states` (finished ones: FAILED, COMPLETE) back to
        NOTSTARTED, due now, attempts reset, as the one-task requeue does."""
        if not set(states) <= REQUEUEABLE:
            raise ValueError(f"only finished tasks can be requeued, not {sorted(states)}")
        query = filter_query(task_filter, states)
        ids = await self._ids(query, limit)
        if not ids:
            return Batch(0, 0)
        result = await self.tasks.update_many(
            {**query, "_id": {"$in": ids}}, requeue_update(self.clock)
        )
        return Batch(len(ids), result.modified_count)

    @unavailable
    async def delete_batch(
        self, task_filter: TaskFilter, *, states: Collection[State], limit: int
    ) -> Batch:
        """Delete up to `limit` matching tasks in `states` (never STARTED: the caller leaves
        it out, and the write checks the state again)."""
        if State.STARTED in states:
            raise ValueError("a bulk delete never takes a STARTED task")
        query = filter_query(task_filter, states)
        ids = await self._ids(query, limit)
        if not ids:
            return Batch(0, 0)
        result = await self.tasks.delete_many({**query, "_id": {"$in": ids}})
        return Batch(len(ids), result.deleted_count)
