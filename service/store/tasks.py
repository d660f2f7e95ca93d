"""Task documents as the API sees them: create, get, list by pages, delete, requeue."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import DatetimeMS, Decimal128, Int64, ObjectId, Timestamp
from bson.errors import InvalidId
from pymongo import ASCENDING, ReturnDocument

from service.errors import InvalidTaskId, TaskNotFound, TaskNotRequeueable
from service.models import State, Task
from service.store.base import (
    CLAIM_INDEX,
    TIME_INDEX,
    TIME_SORT,
    Database,
    id_filter,
    new_task_document,
    requeue_update,
    unavailable,
)

logger = logging.getLogger(__name__)


def after_value(field: str, value: Any, *, descending: bool = False) -> list[dict[str, Any]]:
    """Clauses matching the values of `field` that sort after `value` in MongoDB's order
    (before it, with `descending`: what comes next in a listing newest first).

    `$gt` and `$lt` compare within one BSON type only, so values of the types that sort
    later (earlier) are matched by `$type`: a page cursor then moves on past documents of
    odd shapes too. Null and a missing field sort first of all.
    """
    bracket = _bracket(value)
    if not descending:
        later = [alias for brackets in SORT_BRACKETS[bracket + 1 :] for alias in brackets]
        clauses: list[dict[str, Any]] = [{field: {"$gt": value}}]
        if later:
            clauses.append({field: {"$type": later}})
        return clauses
    earlier = [alias for brackets in SORT_BRACKETS[1:bracket] for alias in brackets]
    clauses = [] if bracket == 0 else [{field: {"$lt": value}}, {field: None}]
    if earlier:
        clauses.append({field: {"$type": earlier}})
    return clauses


# BSON types in the order MongoDB sorts them (null and missing first).
SORT_BRACKETS: list[tuple[str, ...]] = [
    ("null",),
    ("number",),
    ("string",),
    ("object",),
    ("array",),
    ("binData",),
    ("objectId",),
    ("bool",),
    ("date",),
    ("timestamp",),
    ("regex",),
]


def _bracket(value: Any) -> int:
    checks: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "bool"),
        ((int, float, Decimal128, Int64), "number"),
        (str, "string"),
        (ObjectId, "objectId"),
        ((datetime, DatetimeMS), "date"),
        (Timestamp, "timestamp"),
        (bytes, "binData"),
    ]
    for kind, alias in checks:
        if isinstance(value, kind):
            return SORT_BRACKETS.index((alias,))
    return 0


@dataclass(frozen=True)
class Page:
    """One page of a listing; `after` is the sort key of its last task when more follow:
    its stored run_at and _id, whatever their BSON types."""

    tasks: list[Task]
    after: tuple[Any, Any] | None


INDEXES: dict[str, list[tuple[str, int]]] = {
    # "claim" is the name earlier versions gave TIME_INDEX, when they claimed in time order.
    # It keeps it: creating the same keys under another name fails, and would stop an
    # earlier version's process from starting during a rolling upgrade.
    "claim": TIME_INDEX,
    "claim_by_priority": CLAIM_INDEX,
    "by_type": [("type", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)],
    "by_time": [("run_at", ASCENDING), ("_id", ASCENDING)],
    "stale": [("state", ASCENDING), ("heartbeat_at", ASCENDING)],
}


class Tasks:
    """Creating, reading, listing and deleting task documents (the API's operations)."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.clock = db.clock

    @unavailable
    async def ensure_indexes(self) -> None:
        """Create the tasks' indexes, and give tasks written before priorities existed the
        default priority."""
        for name, keys in INDEXES.items():
            await self.tasks.create_index(keys, name=name)
        # The claim index sorts a missing priority after -10: an earlier version's waiting
        # (or running, later retried) tasks would wait behind every new one. Read through
        # the claim index (state, then priority null), so it costs little once done.
        await self.tasks.update_many(
            {"state": {"$in": [State.NOTSTARTED.value, State.STARTED.value]}, "priority": None},
            {"$set": {"priority": 0}},
        )

    @unavailable
    async def create(
        self,
        *,
        task_type: str,
        run_at: datetime | None,
        max_attempts: int,
        args: Mapping[str, Any] | None = None,
        priority: int = 0,
        time_limit: float | None = None,
    ) -> Task:
        """Insert a NOTSTARTED task due at `run_at`; None or a past time means now.

        `args` are stored as given (the API has checked them against the type's schema);
        `time_limit` is the task's `timeout`, in seconds.
        """
        doc = new_task_document(
            self.clock,
            ObjectId(),
            task_type=task_type,
            run_at=run_at,
            max_attempts=max_attempts,
            args=args,
            priority=priority,
            time_limit=time_limit,
        )
        await self.tasks.insert_one(doc)
        return Task.from_document(doc)

    @unavailable
    async def get(self, task_id: str) -> Task:
        """The task with this id, or TaskNotFound."""
        doc = await self.tasks.find_one(id_filter(task_id))
        if doc is None:
            raise TaskNotFound(task_id)
        return Task.from_document(doc)

    @unavailable
    async def page(
        self,
        *,
        states: Iterable[State] = (),
        task_type: str | None = None,
        limit: int,
        after: tuple[Any, Any] | None = None,
        descending: bool = False,
    ) -> Page:
        """Tasks ordered by (run_at, id), optionally filtered, starting after a sort key;
        `descending`: the latest run_at first (then `after` is the key the page starts
        before)."""
        query: dict[str, Any] = {}
        states = list(states)
        if states:
            query["state"] = (
                states[0].value if len(states) == 1 else {"$in": [s.value for s in states]}
            )
        if task_type is not None:
            query["type"] = str(task_type).lower()
        if after is not None:
            run_at, key = after
            way = {"descending": descending}
            query["$or"] = [
                *after_value("run_at", run_at, **way),
                *({"run_at": run_at, **clause} for clause in after_value("_id", key, **way)),
            ]
        order = [(name, -1) for name, _ in TIME_SORT] if descending else TIME_SORT
        cursor = self.tasks.find(query).sort(order).limit(limit + 1)
        docs = [doc async for doc in cursor]
        tasks = [Task.from_document(doc) for doc in docs[:limit]]
        if len(docs) > limit:
            last = docs[limit - 1]
            return Page(tasks, (last.get("run_at"), last["_id"]))
        return Page(tasks, None)

    @unavailable
    async def delete(self, task_id: str) -> None:
        """Remove a task; a worker running it notices at its next heartbeat."""
        result = await self.tasks.delete_one(id_filter(task_id))
        if result.deleted_count == 0:
            raise TaskNotFound(task_id)

    @unavailable
    async def delete_all(self) -> int:
        """Remove every task (testing only; the API guards it behind a setting)."""
        result = await self.tasks.delete_many({})
        return result.deleted_count

    @unavailable
    async def get_many(self, task_ids: Iterable[str]) -> dict[str, Task]:
        """The tasks among these ids that exist, by id, in one query."""
        keys = [key for i in task_ids for key in id_filter(i)["_id"]["$in"]]
        if not keys:
            return {}
        found = [Task.from_document(doc) async for doc in self.tasks.find({"_id": {"$in": keys}})]
        return {task.id: task for task in found}

    @unavailable
    async def requeue(self, task_id: str) -> Task:
        """A FAILED task back to NOTSTARTED, due now, with a fresh set of attempts.

        Raises InvalidTaskId for an id no task can have, TaskNotFound when no task has it,
        and TaskNotRequeueable when the task is in another state than FAILED.
        """
        try:
            _id = ObjectId(task_id)
        except (InvalidId, TypeError):
            raise InvalidTaskId(task_id) from None
        doc = await self.tasks.find_one_and_update(
            {"_id": _id, "state": State.FAILED.value},
            requeue_update(self.clock),
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            current = await self.tasks.find_one({"_id": _id}, {"state": 1})
            if current is None:
                raise TaskNotFound(task_id)
            raise TaskNotRequeueable(task_id, str(current.get("state")))
        return Task.from_document(doc)
