"""Actions on every task a filter matches (requeue, delete), one bounded batch at a time.

A batch reads at most `limit` ids of matching tasks through an index (led by `state`, or by
`type` when a delete names a type but no state; no sort), then sends one `bulk_write` of a
conditional write per id, each checking the whole filter again: a task that changed
meanwhile (claimed, requeued, deleted by another client) is left as it now is. The caller
repeats batches while it has time (service.ops), so a million matches neither hold the
database in one long write nor keep a request past its timeout.

Why one write per id rather than one `update_many({_id: {$in: ids}, ...filter})`: SecantusDB
serves that filter with a collection scan (20 s for 1,000 ids among 20,000 tasks), while a
write by `_id` is a point look-up on both servers (about 1 ms a task there), provided `_id`
comes first in the filter: after the other fields, SecantusDB scans again (190 ms a task).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import DeleteOne, UpdateOne
from pymongo.errors import OperationFailure

from service.models import State, TaskFilter
from service.store.base import TIME_INDEX, Database, requeue_update, type_names, unavailable
from service.store.tasks import INDEXES

logger = logging.getLogger(__name__)

# The server's answer to a hint naming no index (BadValue): the indexes are made by every API
# and worker at start-up, but an ops command may meet a database none of them has opened.
NO_SUCH_INDEX = 2

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
        """At most `limit` ids of tasks matching `query`, read through the index that
        narrows it most. The index is named: SecantusDB scans the collection for a filter of
        more fields than an index leads with."""
        by_type = "type" in query and not isinstance(query["state"], str)
        index = INDEXES["by_type"] if by_type else TIME_INDEX
        cursor = self.tasks.find(query, projection={"_id": True}, hint=index).limit(limit)
        try:
            return [doc["_id"] async for doc in cursor]
        except OperationFailure as exc:
            if exc.code != NO_SUCH_INDEX:
                raise
            logger.warning("bulk: no index %s on the tasks; reading without it", index)
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
        update = requeue_update(self.clock)
        writes = [UpdateOne({"_id": key, **query}, update) for key in ids]
        result = await self.tasks.bulk_write(writes, ordered=False)
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
        writes = [DeleteOne({"_id": key, **query}) for key in ids]
        result = await self.tasks.bulk_write(writes, ordered=False)
        return Batch(len(ids), result.deleted_count)
