"""Watching the tasks: change streams (wake-ups, the dashboard's events) and the cheap
reads that stand in for them where the server has none."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pymongo.errors import ConnectionFailure, OperationFailure

from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable
from service.models import State
from service.store.base import (
    EARLIEST_RUN_AT,
    LATEST_RUN_AT,
    QUEUES,
    TASKS,
    TIME_SORT,
    Database,
    type_names,
    unavailable,
)
from service.store.queues import SETTINGS

logger = logging.getLogger(__name__)

EMPTY_BATCH_PAUSE = 0.05


WAKEUP_FIELDS = (
    "operationType",
    "ns.coll",
    "documentKey",
    "fullDocument.run_at",
    "fullDocument.type",
    "updateDescription.updatedFields.run_at",
    "updateDescription.updatedFields.state",
)


class Announcement(NamedTuple):
    """What the wake-up stream says of one task: claimable from `run_at` (None: now), of
    `type` (None: not said, as in an update's event), or `taken`: just claimed; or, with
    `settings` true, that a queue's settings changed (no task: `id` is the queue's name)."""

    id: Any
    run_at: datetime | None
    type: str | None = None
    taken: bool = False
    settings: bool = False


class StreamProgress:
    """How far the wake-up stream has told its reader. A server answers a waiting read as
    soon as a change comes, with what has come (in order), and the reader handles each
    change as it reads it: so every change committed before the last answer came has been
    told, and while a read waits at the server, every change so far."""

    def __init__(self) -> None:
        self.open = False
        self.waiting = False
        self.answered_at: float | None = None  # time.monotonic()

    def fetching(self) -> None:
        self.waiting = True

    def answered(self) -> None:
        self.waiting = False
        self.answered_at = time.monotonic()

    def closed(self) -> None:
        self.open = self.waiting = False

    def told_until(self) -> float | None:
        """The time (time.monotonic()) up to which every change has been told: now while a
        read waits; None: no stream."""
        if not self.open:
            return None
        return time.monotonic() if self.waiting else self.answered_at


def _buffered(stream: Any) -> int:
    """Changes a change stream holds already, read by its last getMore: reading them sends
    no command. PyMongo keeps them in its cursor's batch (`_data`, checked by
    tests/test_wakeups.py); unknown, the answer is 1, so that the stream is never paused."""
    return len(getattr(getattr(stream, "_cursor", None), "_data", (None,)))


def wakeup_pipeline(
    types: Iterable[str] | None, *, claims_not_by: str | None = None
) -> list[dict[str, Any]]:
    """The change stream's pipeline for wake-ups, over the database: changes to queues'
    settings, and among the tasks inserts (of these types) due at a date,
    updates that put a task back to NOTSTARTED, and updates that move a run_at to a date
    (a waiting task changed by PATCH /tasks/{id}); with `claims_not_by` (a worker's id),
    also the claims of other workers (updates to STARTED), so that a worker waiting to try a
    task another was to try first learns that it was taken; only the fields that are read.

    A run_at moved on a task that is already NOTSTARTED carries no `state` in the event:
    MongoDB and SecantusDB leave a field set to the value it had out of `updatedFields`. The
    only writes that set run_at are those that make a task wait (retries, requeues) and
    those changing a task that waits, so the clause wakes nobody for a claimed task."""
    dated = {"$gte": EARLIEST_RUN_AT, "$lte": LATEST_RUN_AT}
    insert: dict[str, Any] = {"operationType": "insert", "fullDocument.run_at": dated}
    if types is not None:
        insert["fullDocument.type"] = {"$in": type_names(types)}
    requeued = {
        "operationType": "update",
        "updateDescription.updatedFields.state": State.NOTSTARTED.value,
        "$or": [
            {"updateDescription.updatedFields.run_at": {"$exists": False}},
            {"updateDescription.updatedFields.run_at": dated},
        ],
    }
    moved = {"operationType": "update", "updateDescription.updatedFields.run_at": dated}
    clauses = [insert, requeued, moved]
    if claims_not_by is not None:
        claimed = {
            "operationType": "update",
            "updateDescription.updatedFields.state": State.STARTED.value,
            "updateDescription.updatedFields.worker": {"$ne": claims_not_by},
        }
        clauses.append(claimed)
    # A queue's settings written (PUT, pause, resume, DELETE, or by hand): not a token
    # taken or given back, which writes only the bucket's fields.
    settings = [
        {"operationType": {"$in": ["insert", "replace", "delete"]}},
        *({f"updateDescription.updatedFields.{name}": {"$exists": True}} for name in SETTINGS),
        {"updateDescription.removedFields": {"$in": list(SETTINGS)}},
    ]
    return [
        {
            "$match": {
                "$or": [
                    {"ns.coll": TASKS, "$or": clauses},
                    {"ns.coll": QUEUES, "$or": settings},
                ]
            }
        },
        # Only what is read: no other field of an odd document can fail to decode.
        {"$project": dict.fromkeys(WAKEUP_FIELDS, 1)},
    ]


async def _until_set(event: asyncio.Event, *, within: float) -> None:
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when
    # cancelled just as the event is set, swallowing the cancellation, and the watcher
    # would never stop.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await event.wait()


class TaskWatch:
    """What changes among the tasks: wake-ups for workers, events for the dashboard."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.clock = db.clock

    @unavailable
    async def earliest_waiting(
        self, *, after: datetime | None, types: Iterable[str] | None = None, limit: int = 1
    ) -> list[tuple[Any, datetime]]:
        """The `limit` earliest waiting tasks (of these types) due at or after `after` (None:
        whenever): their `_id` and run_at, earliest first, for a worker to sleep until the
        first it does not know of yet.

        Equalities and one range (no type: see Claimer.claims_any_type), so SecantusDB
        reads them off the `{state, run_at, _id}` index rather than scanning. A document
        whose run_at is missing or not a date is never among them: the range matches
        only dates (and dates that Python can hold).
        """
        query: dict[str, Any] = {
            "state": State.NOTSTARTED.value,
            "run_at": {"$lte": LATEST_RUN_AT}
            if after is None
            else {"$gte": after, "$lte": LATEST_RUN_AT},
        }
        if types is not None:
            query["type"] = {"$in": type_names(types)}
        cursor = self.tasks.find(
            query, projection={"run_at": True}, sort=TIME_SORT, limit=limit, batch_size=limit
        )
        return [
            (doc["_id"], doc["run_at"])
            async for doc in cursor
            if isinstance(doc.get("run_at"), datetime)
        ]

    async def announcements(
        self,
        *,
        types: Iterable[str] | None = None,
        max_await: float,
        on_open: Callable[[], None],
        ready: asyncio.Event | None = None,
        gather: float = 0.0,
        claims_not_by: str | None = None,
        progress: StreamProgress | None = None,
    ) -> AsyncIterator[Announcement]:
        """Yield as tasks become claimable: an Announcement of their `_id`, their run_at or
        None for "now", and the type an insert carries; with `claims_not_by` (a worker's
        id), also each claim by another worker (an Announcement with `taken` true).

        A change stream over inserts (of these types), every update that puts a task
        back to NOTSTARTED (retry, release, recovery, requeue) and every update that moves a
        run_at (a waiting task changed); an update event does not carry the type, so those
        come whatever their type. Idle workers thus learn of new work without polling. An
        event whose run_at is missing or not a date is skipped. `on_open` is called once
        the stream is open. Each read waits for `ready`, at most `max_await` seconds so the
        server keeps the cursor (what happens meanwhile stays in the stream). After a batch
        of only tasks due more than 2 x `gather` seconds on, the next getMore waits
        `gather` seconds: tasks created ahead of time in bulk are then read a batch at a
        time, at the cost of a task due at once created within that pause being announced
        up to `gather` late. A change to a queue's settings is an Announcement with
        `settings` true. `progress`, if given, is kept told how far the stream has been
        read. Raises ChangeStreamsUnavailable where the server has none (a standalone
        mongod).
        """
        opened = False
        progress = progress or StreamProgress()
        try:
            # Over the database, for the queues' settings: one stream, not two.
            async with await self.tasks.database.watch(
                wakeup_pipeline(types, claims_not_by=claims_not_by),
                max_await_time_ms=int(max_await * 1000),
            ) as stream:
                progress.open = True
                on_open()
                opened = True
                gather_next = False  # the last batch held only tasks due later on
                claim_last = False  # the last change read was a claim
                while True:
                    if ready is not None:
                        await _until_set(ready, within=max_await)
                    fetching = _buffered(stream) == 0  # this read sends a getMore
                    if fetching and gather_next:
                        await asyncio.sleep(gather)
                    elif fetching and claim_last:
                        # A claim is followed by its result write, which SecantusDB answers
                        # every waiting getMore for: let it pass, as an empty answer.
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)
                    claim_last = False
                    if fetching:
                        progress.fetching()
                    change = await stream.try_next()
                    if fetching:
                        progress.answered()
                    if change is None:
                        # SecantusDB and DocumentDB answer at once on any write (MongoDB: on
                        # a matching event): paced, a busy database costs no getMore a write.
                        gather_next = False
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)
                        continue
                    if change.get("ns", {}).get("coll") == QUEUES:
                        queue = change.get("documentKey", {}).get("_id")
                        yield Announcement(queue, None, settings=True)
                        continue
                    task_id, fields, task_type = _read_change(change)
                    if task_type is None and fields.get("state") == State.STARTED.value:
                        claim_last = True  # a claim
                        if claims_not_by is not None:
                            yield Announcement(task_id, None, taken=True)
                        continue
                    if task_type is None and "run_at" not in fields:
                        gather_next = False  # a release or a recovery: due as it was
                        yield Announcement(task_id, None)
                        continue
                    run_at = fields.get("run_at")
                    # A batch of tasks all due later (scheduled ahead, perhaps in bulk): the
                    # next getMore waits `gather`, one answer for what comes meanwhile.
                    later = isinstance(run_at, datetime) and (
                        run_at > self.clock.surely_now() + timedelta(seconds=2 * gather)
                    )
                    gather_next = bool(gather) and later and (fetching or gather_next)
                    if isinstance(run_at, datetime):  # else not a date: nobody can claim it
                        yield Announcement(task_id, run_at, task_type or None)
        except ConnectionFailure as exc:
            raise DatabaseUnavailable(f"change stream lost: {exc.__class__.__name__}") from exc
        except OperationFailure as exc:
            if opened:  # e.g. the resume point fell off the oplog: open a new stream
                raise DatabaseUnavailable(f"change stream failed: {exc}") from exc
            raise ChangeStreamsUnavailable(str(exc)) from exc
        finally:
            progress.closed()

    async def task_events(self, *, max_await: float) -> AsyncGenerator[dict[str, Any] | None]:
        """Yield each task insert, delete, replace and change of state as
        {"op", "id", "state", "type"} (state and type when the event carries them); None once
        the stream is open, then after each empty read (at least every `max_await` seconds)
        so that the caller can stop. Heartbeats are left out. Returns when the stream ends
        (an invalidate). Raises ChangeStreamsUnavailable where the server has none,
        DatabaseUnavailable when the stream is lost.
        """
        pipeline: list[dict[str, Any]] = [
            {
                "$match": {
                    "$or": [
                        {"operationType": {"$in": ["insert", "delete", "replace"]}},
                        {
                            "operationType": "update",
                            "updateDescription.updatedFields.state": {"$exists": True},
                        },
                    ]
                }
            },
            {
                "$project": {
                    "operationType": 1,
                    "documentKey": 1,
                    "fullDocument.state": 1,
                    "fullDocument.type": 1,
                    "updateDescription.updatedFields.state": 1,
                }
            },
        ]
        opened = False
        try:
            async with await self.tasks.watch(
                pipeline, max_await_time_ms=int(max_await * 1000)
            ) as stream:
                opened = True
                yield None
                while stream.alive:
                    change = await stream.try_next()
                    if change is None:
                        yield None
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)  # see announcements()
                        continue
                    op = change.get("operationType")
                    if op not in ("insert", "delete", "replace", "update"):
                        continue  # drop, invalidate: the stream ends with them
                    fields = change.get("fullDocument") or {}
                    if op == "update":
                        fields = change.get("updateDescription", {}).get("updatedFields", {})
                    state, task_type = fields.get("state"), fields.get("type")
                    yield {
                        "op": op,
                        "id": str(change.get("documentKey", {}).get("_id")),
                        "state": state if isinstance(state, str) else None,
                        "type": task_type.lower() if isinstance(task_type, str) else None,
                    }
        except ConnectionFailure as exc:
            raise DatabaseUnavailable(f"change stream lost: {exc.__class__.__name__}") from exc
        except OperationFailure as exc:
            if opened:
                raise DatabaseUnavailable(f"change stream failed: {exc}") from exc
            raise ChangeStreamsUnavailable(str(exc)) from exc

    @unavailable
    async def fingerprint(self) -> tuple[Any, ...]:
        """Something that changes when tasks are added, removed or change state, from cheap
        commands (counts on the time index, the newest _id): the feed's polling fallback."""
        counts = [await self.tasks.count_documents({"state": s.value}) for s in State]
        newest = await self.tasks.find_one({}, projection={"_id": True}, sort=[("_id", -1)])
        total = await self.tasks.estimated_document_count()
        return (*counts, total, None if newest is None else newest["_id"])


def _read_change(change: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any], str | None]:
    """A wake-up stream's change as (task id, the fields it sets, the task's type): an
    insert gives the whole document and its type ("" when it names none), an update the
    fields it changed and no type."""
    task_id = change.get("documentKey", {}).get("_id")
    if change.get("operationType") == "insert":
        fields = change.get("fullDocument") or {}
        named = fields.get("type")
        return task_id, fields, named.lower() if isinstance(named, str) else ""
    return task_id, change.get("updateDescription", {}).get("updatedFields", {}), None
