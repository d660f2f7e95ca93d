"""Task documents as the API sees them: create (one, or a batch), get, list by pages, change
a waiting one, delete, requeue."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import DatetimeMS, Decimal128, Int64, ObjectId, Timestamp
from bson.errors import InvalidId
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, ServerSelectionTimeoutError

from service.clock import to_millis
from service.errors import (
    BatchInterrupted,
    DatabaseUnavailable,
    InvalidTaskId,
    TaskNotFound,
    TaskNotRequeueable,
    TaskNotWaiting,
)
from service.models import DEFAULT_QUEUE, State, Task
from service.store.base import (
    CLAIM_INDEX,
    TIME_INDEX,
    TIME_SORT,
    Database,
    NewTask,
    id_filter,
    in_queue,
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
    # GET /tasks?tag=: equality on one tag (a multikey index), then the list's time order.
    "by_tag": [("tags", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)],
    # The claim of a limited queue's tasks (the claim index with the queue first), and the
    # queues' counts by state.
    "claim_by_queue": [("queue", ASCENDING), *CLAIM_INDEX],
}

# What a waiting task may have changed (PATCH /tasks/{id}).
CHANGEABLE = frozenset({"run_at", "priority", "args", "tags"})


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
        tags: Sequence[str] = (),
        queue: str = DEFAULT_QUEUE,
        callback_url: str | None = None,
        traceparent: str | None = None,
    ) -> Task:
        """Insert a NOTSTARTED task due at `run_at`; None or a past time means now.

        `args` are stored as given (the API has checked them against the type's schema);
        `time_limit` is the task's `timeout`, in seconds; `tags` its labels; `queue` the
        queue it belongs to; `callback_url` where to POST it once finished; `traceparent` the
        creating request's trace context.
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
            tags=tags,
            queue=queue,
            callback_url=callback_url,
            traceparent=traceparent,
        )
        await self.tasks.insert_one(doc)
        return Task.from_document(doc)

    async def create_many(self, new: Sequence[NewTask]) -> list[Task]:
        """Insert these NOTSTARTED tasks with one unordered insert_many; the tasks, in the
        order given.

        Raises BatchInterrupted when the database refuses some of the documents (the others
        are stored: BulkWriteError names the refused ones) or goes away during the insert
        (then which landed is unknown); its positions are those in `new`.
        """
        docs = [new_task_document(self.clock, ObjectId(), **task.fields()) for task in new]
        if not docs:
            return []
        try:
            await self._insert_many(docs)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            refused = {error.get("index") for error in errors}
            first = errors[0].get("errmsg", "") if errors else ""
            raise BatchInterrupted(
                stored=[i for i in range(len(docs)) if i not in refused],
                unknown=[],
                reason=f"the database refused {len(refused)} of the tasks: {first}",
            ) from None
        except DatabaseUnavailable as exc:
            # No server to send it to: nothing was sent. Otherwise the reply was lost, and
            # the insert may have landed, in whole or in part.
            sent = not isinstance(exc.__cause__, ServerSelectionTimeoutError)
            unknown = list(range(len(docs))) if sent else []
            raise BatchInterrupted(stored=[], unknown=unknown, reason=str(exc)) from exc
        return [Task.from_document(doc) for doc in docs]

    @unavailable
    async def _insert_many(self, docs: list[dict[str, Any]]) -> None:
        await self.tasks.insert_many(docs, ordered=False)

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
        tag: str | None = None,
        queue: str | None = None,
        limit: int,
        after: tuple[Any, Any] | None = None,
        descending: bool = False,
    ) -> Page:
        """Tasks ordered by (run_at, id), optionally filtered (by state, type, a tag, a queue),
        starting after a sort key; `descending`: the latest run_at first (then `after` is
        the key the page starts before)."""
        query: dict[str, Any] = {}
        states = list(states)
        if states:
            query["state"] = (
                states[0].value if len(states) == 1 else {"$in": [s.value for s in states]}
            )
        if task_type is not None:
            query["type"] = str(task_type).lower()
        if tag is not None:
            query["tags"] = tag
        if queue is not None:
            query.update(in_queue(queue))
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
    async def update_waiting(self, task_id: str, *, changes: Mapping[str, Any]) -> Task:
        """Change a waiting task with one find_one_and_update filtered on its id and on
        NOTSTARTED, so a task a worker has claimed is never changed; the task as changed.

        `changes` holds any of run_at (a past time means now, as on create), priority, args
        and tags, as the API checked them; None args or empty tags remove the field. A new
        run_at is announced to the workers like a new task's (see streams.wakeup_pipeline).
        Raises TaskNotFound, or TaskNotWaiting when the task is in another state.
        """
        unknown = set(changes) - CHANGEABLE
        if unknown or not changes:
            raise ValueError(f"changes must be some of {sorted(CHANGEABLE)}, not {sorted(unknown)}")
        update: dict[str, dict[str, Any]] = {"$set": {}, "$unset": {}}
        for name, value in changes.items():
            if name == "run_at":
                value = max(to_millis(value), self.clock.surely_now())
            elif name == "tags":
                value = list(value) or None
            if value is None:
                update["$unset"][name] = ""
            else:
                update["$set"][name] = value
        doc = await self.tasks.find_one_and_update(
            {**id_filter(task_id), "state": State.NOTSTARTED.value},
            {op: fields for op, fields in update.items() if fields},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            current = await self.tasks.find_one(id_filter(task_id), {"state": 1})
            if current is None:
                raise TaskNotFound(task_id)
            raise TaskNotWaiting(task_id, str(current.get("state")))
        return Task.from_document(doc)

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
