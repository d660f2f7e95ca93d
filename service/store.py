"""TaskStore: every MongoDB call of the service lives here and nowhere else.

Each state change is one conditional update. Every write a worker makes after claiming a
task is fenced on `{_id, lease}`: if the task was recovered, re-claimed or deleted in the
meantime, the write matches nothing and the caller is told so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import pymongo
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from service.clock import DbClock, to_millis
from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable, TaskNotFound
from service.models import State, Task, TaskType

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

COLLECTION = "tasks"
CLAIM_SORT = [("run_at", ASCENDING), ("_id", ASCENDING)]
# Serves the claim (equality on state, range on run_at, sort run_at then _id: no in-memory
# sort), the earliest-waiting lookup and the list filtered by state.
CLAIM_INDEX = [("state", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
INDEXES: dict[str, list[tuple[str, int]]] = {
    "claim": CLAIM_INDEX,
    "by_type": [("type", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)],
    "by_time": [("run_at", ASCENDING), ("_id", ASCENDING)],
    "stale": [("state", ASCENDING), ("heartbeat_at", ASCENDING)],
}
EMPTY_BATCH_PAUSE = 0.05
# The dates a run_at may hold: a range matches dates only (not strings, numbers or null),
# uses the index, and leaves out dates that Python cannot decode.
EARLIEST_RUN_AT = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
LATEST_RUN_AT = datetime.fromisoformat("9999-12-31T23:59:59.999+00:00")
WAKEUP_FIELDS = (
    "operationType",
    "documentKey",
    "fullDocument.run_at",
    "updateDescription.updatedFields.run_at",
)
WORKER_LOST = "worker lost: no heartbeat within the stale threshold"


def _unavailable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the driver's connection errors into DatabaseUnavailable."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ConnectionFailure as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        except PyMongoError as exc:
            if exc.timeout:
                raise DatabaseUnavailable("database timed out") from exc
            raise

    return wrapper


def new_lease() -> str:
    """A fresh fencing token for one claim."""
    return uuid.uuid4().hex


def object_id(task_id: str) -> ObjectId:
    """Parse a task id; an id that cannot exist is simply not found."""
    try:
        return ObjectId(task_id)
    except (InvalidId, TypeError):
        raise TaskNotFound(task_id) from None


@dataclass(frozen=True)
class Page:
    """One page of a listing; `after` is the sort key of its last task when more follow."""

    tasks: list[Task]
    after: tuple[datetime, str] | None


@dataclass(frozen=True)
class Stats:
    """Counts for the people on call."""

    by_state_and_type: dict[tuple[str, str], int]
    oldest_due: Task | None
    stale: int


def open_client(url: str, *, timeout: float, appname: str) -> AsyncMongoClient[dict[str, Any]]:
    """A client configured the same way by every part of the service."""
    ms = int(timeout * 1000)
    return AsyncMongoClient(
        url,
        tz_aware=True,
        appname=appname,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=ms,
        socketTimeoutMS=max(ms * 3, 30_000),
    )


class TaskStore:
    """All reads and writes of task documents."""

    def __init__(
        self, client: AsyncMongoClient[dict[str, Any]], *, database: str, clock: DbClock
    ) -> None:
        self.client = client
        self.clock = clock
        self.tasks: AsyncCollection[dict[str, Any]] = client[database][COLLECTION]

    # -- set-up and health ------------------------------------------------------------

    @_unavailable
    async def ensure_indexes(self) -> None:
        """Create the indexes; idempotent, safe for every process to run at start-up."""
        for name, keys in INDEXES.items():
            await self.tasks.create_index(keys, name=name)

    @_unavailable
    async def sync_clock(self) -> None:
        """Measure the offset to the database clock."""
        await self.clock.sync(self.client.admin)

    @_unavailable
    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the server answers."""
        await self.client.admin.command("ping")

    # -- the API's operations ---------------------------------------------------------

    @_unavailable
    async def create(
        self, *, task_type: TaskType, run_at: datetime | None, max_attempts: int
    ) -> Task:
        """Insert a NOTSTARTED task due at `run_at`; None or a past time means now."""
        # "Now" is a time the database has surely reached, so the task is due at once.
        # A past time is stored as now, so lag figures and FIFO order among due tasks hold.
        now = self.clock.surely_now()
        run_at = now if run_at is None else max(to_millis(run_at), now)
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "type": task_type.value,
            "state": State.NOTSTARTED.value,
            "run_at": run_at,
            "created_at": now,
            "attempts": 0,
            "max_attempts": max_attempts,
        }
        await self.tasks.insert_one(doc)
        return Task.from_document(doc)

    @_unavailable
    async def get(self, task_id: str) -> Task:
        """The task with this id, or TaskNotFound."""
        doc = await self.tasks.find_one({"_id": object_id(task_id)})
        if doc is None:
            raise TaskNotFound(task_id)
        return Task.from_document(doc)

    @_unavailable
    async def page(
        self,
        *,
        states: Iterable[State] = (),
        task_type: TaskType | None = None,
        limit: int,
        after: tuple[datetime, str] | None = None,
    ) -> Page:
        """Tasks ordered by (run_at, id), optionally filtered, starting after a sort key."""
        query: dict[str, Any] = {}
        states = list(states)
        if states:
            query["state"] = (
                states[0].value if len(states) == 1 else {"$in": [s.value for s in states]}
            )
        if task_type is not None:
            query["type"] = task_type.value
        if after is not None:
            run_at, last_id = after
            oid = object_id(last_id)
            query["$or"] = [
                {"run_at": {"$gt": run_at}},
                {"run_at": run_at, "_id": {"$gt": oid}},
            ]
        cursor = self.tasks.find(query).sort(CLAIM_SORT).limit(limit + 1)
        tasks = [Task.from_document(doc) async for doc in cursor]
        if len(tasks) > limit:
            tasks = tasks[:limit]
            return Page(tasks, (tasks[-1].run_at, tasks[-1].id))
        return Page(tasks, None)

    @_unavailable
    async def delete(self, task_id: str) -> None:
        """Remove a task; a worker running it notices at its next heartbeat."""
        result = await self.tasks.delete_one({"_id": object_id(task_id)})
        if result.deleted_count == 0:
            raise TaskNotFound(task_id)

    @_unavailable
    async def delete_all(self) -> int:
        """Remove every task (testing only; the API guards it behind a setting)."""
        result = await self.tasks.delete_many({})
        return result.deleted_count

    # -- the worker's operations ------------------------------------------------------

    @_unavailable
    async def claim(self, worker_id: str, *, lease: str) -> Task | None:
        """Atomically take the next due task: one find_one_and_update, or None.

        The caller picks the lease, so that if the reply is lost it can ask with
        `claimed(lease)` whether the claim landed.
        """
        doc = await self.tasks.find_one_and_update(
            {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}},
            {
                "$set": {"state": State.STARTED.value, "lease": lease, "worker": worker_id},
                # Stamped by the server's own clock: the times that staleness is judged on.
                "$currentDate": {"started_at": True, "heartbeat_at": True},
                "$inc": {"attempts": 1},
            },
            sort=CLAIM_SORT,
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else Task.from_document(doc)

    @_unavailable
    async def claimed(self, lease: str) -> Task | None:
        """The task a claim with this lease took, if it landed and still holds."""
        doc = await self.tasks.find_one({"lease": lease, "state": State.STARTED.value})
        return None if doc is None else Task.from_document(doc)

    @_unavailable
    async def next_run_at(
        self, *, types: Iterable[str] | None = None, excluding: Iterable[Any] = ()
    ) -> datetime | None:
        """The earliest run_at among waiting tasks (of these types), to sleep until it.

        `excluding` lists `_id`s to pass over (tasks the caller already knows of). A
        document whose run_at is missing or not a date is ignored: the range matches only
        dates (and dates that Python can hold), and it keeps the index.
        """
        query: dict[str, Any] = {
            "state": State.NOTSTARTED.value,
            "run_at": {"$gte": EARLIEST_RUN_AT, "$lte": LATEST_RUN_AT},
        }
        if types is not None:
            query["type"] = {"$in": list(types)}
        excluding = list(excluding)
        if excluding:
            query["_id"] = {"$nin": excluding}
        doc = await self.tasks.find_one(
            query, projection={"run_at": True, "_id": False}, sort=CLAIM_SORT
        )
        run_at = None if doc is None else doc.get("run_at")
        return run_at if isinstance(run_at, datetime) else None

    async def wakeups(
        self,
        *,
        types: Iterable[str] | None = None,
        max_await: float,
        on_open: Callable[[], None],
        ready: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[Any, datetime | None]]:
        """Yield as tasks become claimable: (their `_id`, their run_at or None for "now").

        A change stream over inserts (of these types) and every update that puts a task
        back to NOTSTARTED (retry, release, recovery, requeue; an update event does not
        carry the type, so those come whatever their type), so idle workers learn of new
        work without polling. An event whose run_at is missing or not a date is skipped.
        `on_open` is called once the stream is open. Each read waits for `ready`, at most
        `max_await` seconds so the server keeps the cursor (what happens meanwhile stays in
        the stream). Raises ChangeStreamsUnavailable where the server has none (a
        standalone mongod).
        """
        dated = {"$gte": EARLIEST_RUN_AT, "$lte": LATEST_RUN_AT}
        insert: dict[str, Any] = {"operationType": "insert", "fullDocument.run_at": dated}
        if types is not None:
            insert["fullDocument.type"] = {"$in": list(types)}
        requeued = {
            "operationType": "update",
            "updateDescription.updatedFields.state": State.NOTSTARTED.value,
            "$or": [
                {"updateDescription.updatedFields.run_at": {"$exists": False}},
                {"updateDescription.updatedFields.run_at": dated},
            ],
        }
        pipeline: list[dict[str, Any]] = [
            {"$match": {"$or": [insert, requeued]}},
            # Only what is read: no other field of an odd document can fail to decode.
            {"$project": dict.fromkeys(WAKEUP_FIELDS, 1)},
        ]
        opened = False
        try:
            async with await self.tasks.watch(
                pipeline, max_await_time_ms=int(max_await * 1000)
            ) as stream:
                on_open()
                opened = True
                while True:
                    if ready is not None:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns
                        # normally when cancelled just as the event is set, swallowing
                        # the cancellation, and the watcher would never stop.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max_await):
                                await ready.wait()
                    change = await stream.try_next()
                    if change is None:
                        # MongoDB answers a getMore when a matching event comes or after
                        # max_await; some servers (SecantusDB, DocumentDB) answer at once
                        # on any write. Pace those empty answers so that busy databases
                        # do not cost a getMore per write.
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)
                        continue
                    task_id = change.get("documentKey", {}).get("_id")
                    if change.get("operationType") == "insert":
                        fields = change.get("fullDocument") or {}
                    else:
                        fields = change.get("updateDescription", {}).get("updatedFields", {})
                        if "run_at" not in fields:  # a release or a recovery: due as it was
                            yield task_id, None
                            continue
                    run_at = fields.get("run_at")
                    if isinstance(run_at, datetime):  # else not a date: nobody can claim it
                        yield task_id, run_at
        except ConnectionFailure as exc:
            raise DatabaseUnavailable(f"change stream lost: {exc.__class__.__name__}") from exc
        except OperationFailure as exc:
            if opened:  # e.g. the resume point fell off the oplog: open a new stream
                raise DatabaseUnavailable(f"change stream failed: {exc}") from exc
            raise ChangeStreamsUnavailable(str(exc)) from exc

    @_unavailable
    async def heartbeat(self, leases: Iterable[str]) -> set[str]:
        """Refresh every listed lease in one write; return the leases that are gone."""
        leases = set(leases)
        if not leases:
            return set()
        fence = {"state": State.STARTED.value, "lease": {"$in": list(leases)}}
        result = await self.tasks.update_many(fence, {"$currentDate": {"heartbeat_at": True}})
        if result.matched_count == len(leases):
            return set()
        alive = {doc["lease"] async for doc in self.tasks.find(fence, projection={"lease": True})}
        return leases - alive

    @_unavailable
    async def complete(self, task: Task, output: str) -> bool:
        """Mark COMPLETE; False if the lease was lost (the result is then dropped)."""
        update = {
            "$set": {"state": State.COMPLETE.value, "output": output},
            "$currentDate": {"finished_at": True},
        }
        return await self._fenced(task, update, State.COMPLETE)

    @_unavailable
    async def fail(self, task: Task, error: str, *, retry_at: datetime | None) -> bool:
        """Record a failed attempt: back to NOTSTARTED at `retry_at`, or FAILED if None."""
        now = self.clock.now()
        entry = {"attempt": task.attempts, "error": error, "at": now, "worker": task.worker}
        if retry_at is None:
            state = State.FAILED
            update: dict[str, Any] = {
                "$set": {"state": state.value},
                "$currentDate": {"finished_at": True},
            }
        else:
            state = State.NOTSTARTED
            update = {
                "$set": {"state": state.value, "run_at": retry_at},
                "$unset": {"worker": "", "heartbeat_at": ""},
            }
        update["$set"]["error"] = error
        update["$push"] = {"errors": entry}
        return await self._fenced(task, update, state)

    @_unavailable
    async def release(self, task: Task) -> bool:
        """Give a task back unrun (graceful shutdown); the attempt does not count."""
        update = {
            "$set": {"state": State.NOTSTARTED.value},
            "$inc": {"attempts": -1},
            "$unset": {"worker": "", "heartbeat_at": "", "started_at": ""},
        }
        return await self._fenced(task, update, State.NOTSTARTED)

    async def _fenced(self, task: Task, update: dict[str, Any], state: State) -> bool:
        """Apply `update` only while this claim's lease holds the task STARTED.

        The lease stays on the document, so when a write is retried after its reply was lost
        (a database outage), finding our lease already in the target state shows it landed.
        Nobody else can put our lease there: recovery removes it, a new claim replaces it.
        """
        oid = ObjectId(task.id)
        fence = {"_id": oid, "lease": task.lease, "state": State.STARTED.value}
        result = await self.tasks.update_one(fence, update)
        if result.modified_count == 1:
            return True
        landed = {"_id": oid, "lease": task.lease, "state": state.value}
        return await self.tasks.count_documents(landed, limit=1) == 1

    # -- recovery and operations ------------------------------------------------------

    def _stale_filter(self, stale_after: float) -> dict[str, Any]:
        cutoff = self.clock.surely_now() - timedelta(seconds=stale_after)
        return {"state": State.STARTED.value, "heartbeat_at": {"$lt": cutoff}}

    @_unavailable
    async def find_stale(self, stale_after: float) -> list[Task]:
        """STARTED tasks whose worker has not been heard from within `stale_after` seconds."""
        cursor = self.tasks.find(self._stale_filter(stale_after)).sort(CLAIM_SORT)
        return [Task.from_document(doc) async for doc in cursor]

    @_unavailable
    async def recover_stale(
        self, stale_after: float, *, only: Iterable[str] | None = None, within: float | None = None
    ) -> int:
        """Stale tasks back to NOTSTARTED, or FAILED when their attempts are used up.

        One conditional update: safe to run from every worker and the ops CLI at once.
        Removing the lease fences off the lost worker even before anyone re-claims.
        `within` bounds the call (client-side timeout): a recovery decided just before a
        database outage must not land after it, when every heartbeat looks old.
        """
        query = self._stale_filter(stale_after)
        if only is not None:
            query["_id"] = {"$in": [object_id(i) for i in only]}
        now = self.clock.now()
        exhausted = {"$gte": ["$attempts", "$max_attempts"]}
        lost = {"attempt": "$attempts", "error": WORKER_LOST, "at": now, "worker": "$worker"}
        pipeline: list[dict[str, Any]] = [
            {
                "$set": {
                    "state": {"$cond": [exhausted, State.FAILED.value, State.NOTSTARTED.value]},
                    "finished_at": {"$cond": [exhausted, now, "$$REMOVE"]},
                    "error": WORKER_LOST,
                    "errors": {"$concatArrays": [{"$ifNull": ["$errors", []]}, [lost]]},
                }
            },
            {"$unset": ["lease", "worker", "heartbeat_at"]},
        ]
        with pymongo.timeout(within):
            result = await self.tasks.update_many(query, pipeline)
        return result.modified_count

    @_unavailable
    async def requeue(self, task_id: str) -> Task:
        """A FAILED task back to NOTSTARTED, due now, with a fresh set of attempts.

        Raises InvalidTaskId for an id no task can have, TaskNotFound when no task has it,
        and TaskNotRequeueable when the task is in another state than FAILED.
        """
        from service.errors import InvalidTaskId, TaskNotRequeueable

        try:
            _id = ObjectId(task_id)
        except (InvalidId, TypeError):
            raise InvalidTaskId(task_id) from None
        doc = await self.tasks.find_one_and_update(
            {"_id": _id, "state": State.FAILED.value},
            {
                "$set": {
                    "state": State.NOTSTARTED.value,
                    "run_at": self.clock.surely_now(),
                    "attempts": 0,
                },
                "$unset": {"finished_at": "", "lease": "", "worker": "", "heartbeat_at": ""},
            },
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            current = await self.tasks.find_one({"_id": _id}, {"state": 1})
            if current is None:
                raise TaskNotFound(task_id)
            raise TaskNotRequeueable(task_id, str(current.get("state")))
        return Task.from_document(doc)

    @_unavailable
    async def stats(self, stale_after: float) -> Stats:
        """Counts by state and type, the oldest due task, and how many are stale."""
        counts: dict[tuple[str, str], int] = {}
        pipeline = [{"$group": {"_id": {"state": "$state", "type": "$type"}, "n": {"$sum": 1}}}]
        async for row in await self.tasks.aggregate(pipeline):
            counts[(row["_id"]["state"], row["_id"]["type"])] = row["n"]
        oldest = await self.tasks.find_one(
            {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}},
            sort=CLAIM_SORT,
        )
        stale = await self.tasks.count_documents(self._stale_filter(stale_after))
        return Stats(counts, None if oldest is None else Task.from_document(oldest), stale)
