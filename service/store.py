"""TaskStore: every MongoDB call of the service lives here and nowhere else.

Each state change is one conditional update. Every write a worker makes after claiming a
task is fenced on `{_id, lease}`: if the task was recovered, re-claimed or deleted in the
meantime, the write matches nothing and the caller is told so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import uuid
import zoneinfo
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import pymongo
from bson import DatetimeMS, Decimal128, Int64, ObjectId, Timestamp
from bson.errors import InvalidId
from croniter import CroniterError, croniter
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    ReturnDocument,
    WriteConcern,
    monitoring,
)
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from service.clock import DbClock, to_millis
from service.errors import (
    ChangeStreamsUnavailable,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    IdempotentTaskGone,
    TaskNotFound,
)
from service.models import MissedPolicy, Schedule, State, Task, TaskType

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

COLLECTION = "tasks"
SCHEDULES_COLLECTION = "schedules"
LIMITS_COLLECTION = "limits"
WORKERS_COLLECTION = "workers"
# Among due tasks the higher priority first, then the earlier run_at, then _id.
CLAIM_SORT = [("priority", DESCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
# Serves the claim: equality on state, then the sort's fields in its order and directions,
# so walking the index is the sort (no in-memory sort); run_at's range is applied within
# each priority, so a due task is found whatever waits at a higher priority in the future.
CLAIM_INDEX = [
    ("state", ASCENDING),
    ("priority", DESCENDING),
    ("run_at", ASCENDING),
    ("_id", ASCENDING),
]
# Time order: the lists, the earliest waiting run_at, the oldest due task.
TIME_SORT = [("run_at", ASCENDING), ("_id", ASCENDING)]
TIME_INDEX = [("state", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)]
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
DURABLE = WriteConcern(w="majority", j=True)
KNOWN_TYPES: tuple[str, ...] = tuple(t.value for t in TaskType)
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


def id_filter(task_id: str) -> dict[str, Any]:
    """Match the task an API id names: its ObjectId, or an _id stored as a string or an
    integer by hand or by another version (ids are shown as str(_id))."""
    candidates: list[Any] = [task_id]
    if ObjectId.is_valid(task_id):
        candidates.append(ObjectId(task_id))
    if task_id.isascii() and task_id.lstrip("-").isdigit() and len(task_id) < 20:
        candidates.append(int(task_id))
    return {"_id": {"$in": candidates}}


def after_value(field: str, value: Any) -> list[dict[str, Any]]:
    """Clauses matching the values of `field` that sort after `value` in MongoDB's order.

    `$gt` compares within one BSON type only, so values of the types that sort later are
    matched by `$type`: a page cursor then moves on past documents of odd shapes too.
    """
    bracket = _bracket(value)
    clauses: list[dict[str, Any]] = [{field: {"$gt": value}}]
    later = [alias for brackets in SORT_BRACKETS[bracket + 1 :] for alias in brackets]
    if later:
        clauses.append({field: {"$type": later}})
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


@dataclass(frozen=True)
class Stats:
    """Counts for the people on call."""

    by_state_and_type: dict[tuple[str, str], int]
    oldest_due: Task | None
    stale: int
    unreadable: int = 0


def _buffered(stream: Any) -> int:
    """Changes a change stream holds already, read by its last getMore: reading them sends
    no command. PyMongo keeps them in its cursor's batch (`_data`, checked by
    tests/test_wakeups.py); unknown, the answer is 1, so that the stream is never paused."""
    return len(getattr(getattr(stream, "_cursor", None), "_data", (None,)))


def open_client(
    url: str,
    *,
    timeout: float,
    appname: str,
    event_listeners: Sequence[monitoring._EventListener] = (),
) -> AsyncMongoClient[dict[str, Any]]:
    """A client configured the same way by every part of the service.

    Every document decodes, whatever it holds: a date outside Python's range comes back as
    a DatetimeMS, invalid UTF-8 with replacement characters (both then read as malformed).
    """
    ms = int(timeout * 1000)
    return AsyncMongoClient(
        url,
        tz_aware=True,
        datetime_conversion="DATETIME_AUTO",
        unicode_decode_error_handler="replace",
        appname=appname,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=ms,
        socketTimeoutMS=max(ms * 3, 30_000),
        event_listeners=event_listeners,
    )


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


def type_names(types: Iterable[str]) -> list[str]:
    """How the given types may be stored: lowercase as the API writes them, or as a person or
    an earlier version wrote them ("FOO", "Foo")."""
    return sorted({variant for t in types for variant in (t, t.upper(), t.capitalize())})


def _label(value: Any) -> str:
    """A stored state or type as a count's label, whatever the document held."""
    if value is None:
        return "(none)"
    return value if isinstance(value, str) else repr(value)


# The most of a task's output or error that is stored: a document must stay far below
# MongoDB's 16 MB, and one task's text must not crowd out the others on a page.
MAX_STORED_TEXT = 64 * 1024


def storable(text: str) -> str:
    """Text as it can be stored: at most MAX_STORED_TEXT characters (the cut said), and
    valid UTF-8 (a lone surrogate, which BSON cannot encode, becomes "?")."""
    if len(text) > MAX_STORED_TEXT:
        cut = len(text) - MAX_STORED_TEXT
        text = f"{text[:MAX_STORED_TEXT]}... [{cut} more characters not stored]"
    return text.encode("utf-8", "replace").decode("utf-8")


def claimable(types: Collection[str] | None, *, due_by: datetime) -> dict[str, Any]:
    """The claim's filter: due, and of a type the worker runs (None: any type)."""
    query: dict[str, Any] = {"state": State.NOTSTARTED.value, "run_at": {"$lte": due_by}}
    if types is not None:
        query["type"] = {"$in": type_names(types)}
    return query


def claim_update(worker_id: str, lease: str) -> list[dict[str, Any]]:
    """The claim's update, a pipeline: STARTED under a new lease, times stamped by the
    server's own clock (what staleness is judged on), one more attempt. An `attempts` of
    another type (written by hand) counts as 0 rather than failing the claim, as `$inc`
    would: the filter need not rule such documents out, which would cost it the index."""
    counted = {"$cond": [{"$isNumber": "$attempts"}, "$attempts", 0]}
    return [
        {
            "$set": {
                "state": State.STARTED.value,
                "lease": lease,
                "worker": worker_id,
                "started_at": "$$NOW",
                "heartbeat_at": "$$NOW",
                "attempts": {"$add": [counted, 1]},
            }
        }
    ]


IDEMPOTENCY_COLLECTION = "idempotency_keys"
IDEMPOTENCY_TURNS = 5


@dataclass(frozen=True, kw_only=True)
class IdempotentCreate:
    """A create under an Idempotency-Key: the key; the route it came by (the same key and
    body on another route is another request); how many seconds the key is remembered; and
    the id the task gets if this request is the first, chosen before anything is written."""

    key: str
    route: str
    ttl: float
    task_id: ObjectId = field(default_factory=ObjectId)

    def replayed(self, task: Task) -> bool:
        """Whether `task` is an earlier request's: this one created nothing."""
        return task.id != str(self.task_id)


def request_hash(route: str, fields: Mapping[str, Any]) -> str:
    """What identifies a create request: its route and what it asked for, `run_at` as given
    (None for "now"), normalised (sorted keys, the type in lower case, milliseconds)."""
    run_at = fields.get("run_at")
    described = {
        **fields,
        "route": route,
        "task_type": str(fields.get("task_type")).lower(),
        "run_at": None if run_at is None else to_millis(run_at).isoformat(),
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _live_record(record: Mapping[str, Any], now: datetime) -> bool:
    """An unexpired key record whose task can be read back; any other is replaced."""
    expires_at, task = record.get("expires_at"), record.get("task")
    fresh = isinstance(expires_at, datetime) and expires_at > now
    return fresh and isinstance(task, Mapping) and "_id" in task


DocCollection = AsyncCollection[dict[str, Any]]


class TaskStore:
    """All reads and writes of task documents."""

    def __init__(
        self, client: AsyncMongoClient[dict[str, Any]], *, database: str, clock: DbClock
    ) -> None:
        self.client = client
        self.clock = clock
        db = client[database]
        # Durable acknowledgement asked for explicitly, whatever the server's or the URL's
        # default: a write the guarantees rest on must survive a crash of the server.
        self.tasks: DocCollection = db.get_collection(COLLECTION, write_concern=DURABLE)
        # One record per Idempotency-Key, until it expires.
        self.idempotency_keys: DocCollection = db.get_collection(
            IDEMPOTENCY_COLLECTION, write_concern=DURABLE
        )
        # One document per worker process, refreshed by its heartbeat. Acknowledged by the
        # primary only: no guarantee rests on this advisory record, it is rewritten within a
        # stale threshold, and a replicated, journaled write would make every heartbeat wait.
        self.workers: DocCollection = db.get_collection(
            WORKERS_COLLECTION, write_concern=WriteConcern(w=1)
        )
        # The schedules, written as durably as the tasks they create.
        self.schedules: DocCollection = db.get_collection(
            SCHEDULES_COLLECTION, write_concern=DURABLE
        )
        # One document per limited type: the leases that hold its slots.
        self.limits: DocCollection = db.get_collection(LIMITS_COLLECTION, write_concern=DURABLE)

    # -- set-up and health ------------------------------------------------------------

    @_unavailable
    async def ensure_indexes(self) -> None:
        """Create the indexes, and give tasks written before priorities existed the default
        priority; idempotent, safe for every process to run at start-up."""
        for name, keys in INDEXES.items():
            await self.tasks.create_index(keys, name=name)
        # The claim index sorts a missing priority after -10: an earlier version's waiting
        # (or running, later retried) tasks would wait behind every new one. Read through
        # the claim index (state, then priority null), so it costs little once done.
        await self.tasks.update_many(
            {"state": {"$in": [State.NOTSTARTED.value, State.STARTED.value]}, "priority": None},
            {"$set": {"priority": 0}},
        )
        # Idempotency-Key records: the server deletes each once past its own expiry (about
        # once a minute; create_once checks the time itself), so a changed
        # TASK_RUNNER_IDEMPOTENCY_TTL needs no change of the index.
        await self.idempotency_keys.create_index(
            [("expires_at", ASCENDING)], name="expired", expireAfterSeconds=0
        )
        await self.ensure_schedule_indexes()

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
        doc = self._new_task(
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

    def _new_task(
        self,
        task_id: ObjectId,
        *,
        task_type: str,
        run_at: datetime | None,
        max_attempts: int,
        args: Mapping[str, Any] | None,
        priority: int,
        time_limit: float | None,
    ) -> dict[str, Any]:
        # "Now" is a time the database has surely reached, so the task is due at once.
        # A past time is stored as now, so lag figures and FIFO order among due tasks hold.
        now = self.clock.surely_now()
        run_at = now if run_at is None else max(to_millis(run_at), now)
        doc: dict[str, Any] = {
            "_id": task_id,
            "type": str(task_type).lower(),
            "state": State.NOTSTARTED.value,
            "run_at": run_at,
            "created_at": now,
            "attempts": 0,
            "max_attempts": max_attempts,
            "priority": priority,
        }
        if args is not None:
            doc["args"] = dict(args)
        if time_limit is not None:
            doc["timeout"] = time_limit
        return doc

    @_unavailable
    async def get(self, task_id: str) -> Task:
        """The task with this id, or TaskNotFound."""
        doc = await self.tasks.find_one(id_filter(task_id))
        if doc is None:
            raise TaskNotFound(task_id)
        return Task.from_document(doc)

    @_unavailable
    async def page(
        self,
        *,
        states: Iterable[State] = (),
        task_type: str | None = None,
        limit: int,
        after: tuple[Any, Any] | None = None,
    ) -> Page:
        """Tasks ordered by (run_at, id), optionally filtered, starting after a sort key."""
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
            query["$or"] = [
                *after_value("run_at", run_at),
                *({"run_at": run_at, **clause} for clause in after_value("_id", key)),
            ]
        cursor = self.tasks.find(query).sort(TIME_SORT).limit(limit + 1)
        docs = [doc async for doc in cursor]
        tasks = [Task.from_document(doc) for doc in docs[:limit]]
        if len(docs) > limit:
            last = docs[limit - 1]
            return Page(tasks, (last.get("run_at"), last["_id"]))
        return Page(tasks, None)

    @_unavailable
    async def delete(self, task_id: str) -> None:
        """Remove a task; a worker running it notices at its next heartbeat."""
        result = await self.tasks.delete_one(id_filter(task_id))
        if result.deleted_count == 0:
            raise TaskNotFound(task_id)

    @_unavailable
    async def delete_all(self) -> int:
        """Remove every task (testing only; the API guards it behind a setting)."""
        result = await self.tasks.delete_many({})
        return result.deleted_count

    # -- idempotent creation: the Idempotency-Key header -------------------------------
    #
    # A unique index decides, never a read before the write: the key's record (its _id is
    # the key) is inserted first, holding the whole task document to insert, and only the
    # request whose record landed inserts that task. A request that finds the record with
    # the same request hash answers with the record's task; if the task is not there yet
    # (the first request is between its two writes, or stopped between them), it inserts
    # the very same document itself, and the tasks' unique _id lets one of the two land.

    @_unavailable
    async def create_once(
        self,
        once: IdempotentCreate,
        *,
        task_type: str,
        run_at: datetime | None,
        max_attempts: int,
        args: Mapping[str, Any] | None = None,
        priority: int = 0,
        time_limit: float | None = None,
    ) -> Task:
        """`create`, once per Idempotency-Key: the same key with the same request gives the
        task the first request created (`once.replayed(task)` tells); after `once.ttl`
        seconds the key is forgotten. Raises IdempotencyKeyReused when the key came with
        another request, IdempotentTaskGone when the key's task has been deleted since.
        """
        fields: dict[str, Any] = {
            "task_type": task_type,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "args": args,
            "priority": priority,
            "time_limit": time_limit,
        }
        fingerprint = request_hash(once.route, fields)
        doc = self._new_task(once.task_id, **fields)
        # A turn is lost only to another request's write on this key meanwhile (an expired
        # record replaced or swept): the next turn reads what that write left.
        for _ in range(IDEMPOTENCY_TURNS):
            now = self.clock.now()
            record = {
                "_id": once.key,
                "request": fingerprint,
                "task": doc,
                "created_at": now,
                "expires_at": now + timedelta(seconds=once.ttl),
            }
            try:
                await self.idempotency_keys.insert_one(record)
                return await self._insert_keyed(once.key, doc)
            except DuplicateKeyError:
                held = await self.idempotency_keys.find_one({"_id": once.key})
            if held is None:
                continue  # expired and deleted since
            if _live_record(held, now):
                if held.get("request") != fingerprint:
                    raise IdempotencyKeyReused(once.key)
                return await self._replay(once.key, held)
            # Expired: take the key over, unless another request did first.
            mine = await self.idempotency_keys.replace_one(
                {"_id": once.key, "expires_at": held.get("expires_at")}, record
            )
            if mine.matched_count == 1:
                return await self._insert_keyed(once.key, doc)
        raise DatabaseUnavailable(f"Idempotency-Key {once.key!r} is contended; retry")

    async def _insert_keyed(self, key: str, doc: dict[str, Any]) -> Task:
        """Insert the task of a key's record, then mark the record: its task was inserted."""
        with contextlib.suppress(DuplicateKeyError):
            # Else a retry of this request, finding the record unmarked, inserted it first.
            await self.tasks.insert_one(doc)
        # Tells a later replay that a missing task was deleted, not still to be inserted.
        await self.idempotency_keys.update_one(
            {"_id": key, "task._id": doc["_id"]}, {"$set": {"inserted": True}}
        )
        return Task.from_document(doc)

    async def _replay(self, key: str, record: dict[str, Any]) -> Task:
        """The task of a live record that has this request's hash, as it is now."""
        task = record["task"]
        if record.get("inserted") is not True:
            await self._insert_keyed(key, task)
        doc = await self.tasks.find_one({"_id": task["_id"]})
        if doc is None:
            raise IdempotentTaskGone(key, str(task["_id"]))
        return Task.from_document(doc)

    # -- the worker's operations ------------------------------------------------------

    @_unavailable
    async def claim(
        self,
        worker_id: str,
        *,
        lease: str,
        types: Collection[str] | None = KNOWN_TYPES,
        within: float | None = None,
    ) -> Task | None:
        """Atomically take the next due task of one of `types`: one find_one_and_update.

        The caller picks the lease, so that if the reply is lost it can ask with
        `claimed(lease)` whether the claim landed. Only the types the caller can run are
        taken: in a rolling upgrade, an older worker leaves a newer type to newer workers.
        `types=None` leaves the type out of the filter, for a caller that knows every
        waiting task is of a type it runs (see Worker._claim: SecantusDB uses the claim
        index only for a filter of equalities and one range). `within` bounds the call (a
        claim under a slot must land while the slot is young).
        """
        with pymongo.timeout(within):
            doc = await self.tasks.find_one_and_update(
                claimable(types, due_by=self.clock.surely_now()),
                claim_update(worker_id, lease),
                sort=CLAIM_SORT,
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else Task.from_document(doc)

    @_unavailable
    async def give_back(self, task: Task) -> bool:
        """Undo a claim of a task this worker cannot run (a type it does not have): back to
        NOTSTARTED as it was, the attempt not counted, no lease or worker left on it."""
        fence = {"_id": task.key, "lease": task.lease, "state": State.STARTED.value}
        update = {
            "$set": {"state": State.NOTSTARTED.value},
            "$inc": {"attempts": -1},
            "$unset": {"lease": "", "worker": "", "heartbeat_at": "", "started_at": ""},
        }
        result = await self.tasks.update_one(fence, update)
        return result.modified_count == 1

    @_unavailable
    async def claimed(self, lease: str) -> Task | None:
        """The task a claim with this lease took, if it landed and still holds."""
        doc = await self.tasks.find_one({"lease": lease, "state": State.STARTED.value})
        return None if doc is None else Task.from_document(doc)

    @_unavailable
    async def earliest_waiting(
        self, *, after: datetime, types: Iterable[str] | None = None, limit: int = 1
    ) -> list[tuple[Any, datetime]]:
        """The `limit` earliest waiting tasks (of these types) due at or after `after`:
        their `_id` and run_at, earliest first, for a worker to sleep until the first it
        does not know of yet.

        Equalities and one range (no type: see Worker._claims_any_type), so SecantusDB
        reads them off the `{state, run_at, _id}` index rather than scanning. A document
        whose run_at is missing or not a date is never among them: the range matches
        only dates (and dates that Python can hold).
        """
        query: dict[str, Any] = {
            "state": State.NOTSTARTED.value,
            "run_at": {"$gte": after, "$lte": LATEST_RUN_AT},
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

    async def wakeups(
        self,
        *,
        types: Iterable[str] | None = None,
        max_await: float,
        on_open: Callable[[], None],
        ready: asyncio.Event | None = None,
        gather: float = 0.0,
    ) -> AsyncIterator[tuple[Any, datetime | None]]:
        """Yield as tasks become claimable: (their `_id`, their run_at or None for "now").

        A change stream over inserts (of these types) and every update that puts a task
        back to NOTSTARTED (retry, release, recovery, requeue; an update event does not
        carry the type, so those come whatever their type), so idle workers learn of new
        work without polling. An event whose run_at is missing or not a date is skipped.
        `on_open` is called once the stream is open. Each read waits for `ready`, at most
        `max_await` seconds so the server keeps the cursor (what happens meanwhile stays in
        the stream). After a batch of only tasks due more than 2 x `gather` seconds on, the
        next getMore waits `gather` seconds: tasks created ahead of time in bulk are then
        read a batch at a time, at the cost of a task due at once created within that
        pause being announced up to `gather` late. Raises ChangeStreamsUnavailable where the
        server has none (a standalone mongod).
        """
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
                gather_next = False  # the last batch held only tasks due later on
                while True:
                    if ready is not None:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns
                        # normally when cancelled just as the event is set, swallowing
                        # the cancellation, and the watcher would never stop.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max_await):
                                await ready.wait()
                    fetching = _buffered(stream) == 0  # this read sends a getMore
                    if fetching and gather_next:
                        await asyncio.sleep(gather)
                    change = await stream.try_next()
                    if change is None:
                        # MongoDB answers a getMore when a matching event comes or after
                        # max_await; some servers (SecantusDB, DocumentDB) answer at once
                        # on any write. Pace those empty answers so that busy databases
                        # do not cost a getMore per write.
                        gather_next = False
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)
                        continue
                    task_id = change.get("documentKey", {}).get("_id")
                    if change.get("operationType") == "insert":
                        fields = change.get("fullDocument") or {}
                    else:
                        fields = change.get("updateDescription", {}).get("updatedFields", {})
                        if "run_at" not in fields:  # a release or a recovery: due as it was
                            gather_next = False
                            yield task_id, None
                            continue
                    run_at = fields.get("run_at")
                    # A batch of tasks all due later (work scheduled ahead, perhaps in
                    # bulk): the next getMore waits `gather` so that what comes meanwhile
                    # arrives in one answer, not one getMore per task per worker.
                    later = isinstance(run_at, datetime) and (
                        run_at > self.clock.surely_now() + timedelta(seconds=2 * gather)
                    )
                    gather_next = bool(gather) and later and (fetching or gather_next)
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
            "$set": {"state": State.COMPLETE.value, "output": storable(output)},
            "$currentDate": {"finished_at": True},
        }
        return await self._fenced(task, update, State.COMPLETE)

    @_unavailable
    async def fail(self, task: Task, error: str, *, retry_at: datetime | None) -> bool:
        """Record a failed attempt: back to NOTSTARTED at `retry_at`, or FAILED if None."""
        now = self.clock.now()
        error = storable(error)
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
        if "errors" in task.malformed:
            update["$set"]["errors"] = [entry]  # what was there is not a list to push onto
        else:
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
        fence = {"_id": task.key, "lease": task.lease, "state": State.STARTED.value}
        result = await self.tasks.update_one(fence, update)
        if result.modified_count == 1:
            return True
        landed = {"_id": task.key, "lease": task.lease, "state": state.value}
        return await self.tasks.count_documents(landed, limit=1) == 1

    # -- recovery and operations ------------------------------------------------------

    def _stale_filter(self, stale_after: float) -> dict[str, Any]:
        cutoff = self.clock.surely_now() - timedelta(seconds=stale_after)
        return {"state": State.STARTED.value, "heartbeat_at": {"$lt": cutoff}}

    @_unavailable
    async def find_stale(self, stale_after: float) -> list[Task]:
        """STARTED tasks whose worker has not been heard from within `stale_after` seconds."""
        cursor = self.tasks.find(self._stale_filter(stale_after)).sort(TIME_SORT)
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
            query["_id"] = {"$in": [key for i in only for key in id_filter(i)["_id"]["$in"]]}
        # The server's own time of the recovery (what the stale cutoff was judged against),
        # not this process's estimate of it.
        now = "$$NOW"
        exhausted = {"$gte": ["$attempts", "$max_attempts"]}
        is_list = {"$isArray": "$errors"}  # a document of another shape must not fail this
        lost = {"attempt": "$attempts", "error": WORKER_LOST, "at": now, "worker": "$worker"}
        pipeline: list[dict[str, Any]] = [
            {
                "$set": {
                    "state": {"$cond": [exhausted, State.FAILED.value, State.NOTSTARTED.value]},
                    "finished_at": {"$cond": [exhausted, now, "$$REMOVE"]},
                    "error": WORKER_LOST,
                    "errors": {"$concatArrays": [{"$cond": [is_list, "$errors", []]}, [lost]]},
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
            # $group leaves a missing field out of its key: such documents count as "(none)".
            key = row["_id"]
            counts[(_label(key.get("state")), _label(key.get("type")))] = row["n"]
        oldest = await self.tasks.find_one(
            {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}},
            sort=TIME_SORT,
        )
        stale = await self.tasks.count_documents(self._stale_filter(stale_after))
        unreadable = await self.tasks.count_documents(UNREADABLE)
        oldest_task = None if oldest is None else Task.from_document(oldest)
        return Stats(counts, oldest_task, stale, unreadable)

    @_unavailable
    async def unreadable(self, *, limit: int) -> list[Task]:
        """Documents no worker will claim or recover because of what they hold (see
        UNREADABLE); they stay as they are until a person fixes or deletes them."""
        cursor = self.tasks.find(UNREADABLE).sort("_id", ASCENDING).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    # -- the dashboard: its summary and its live feed (service/feed.py) -------------------

    @_unavailable
    async def count_due(self) -> int:
        """NOTSTARTED tasks already due: the backlog (the time index answers it)."""
        due = {"state": State.NOTSTARTED.value, "run_at": {"$lte": self.clock.surely_now()}}
        return await self.tasks.count_documents(due)

    @_unavailable
    async def latest(self, state: State, *, limit: int) -> list[Task]:
        """The last `limit` tasks in `state` by run_at (the time index read backwards)."""
        order = [("run_at", pymongo.DESCENDING), ("_id", pymongo.DESCENDING)]
        cursor = self.tasks.find({"state": state.value}).sort(order).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    @_unavailable
    async def stale_sample(self, stale_after: float, *, limit: int) -> list[Task]:
        """At most `limit` of the tasks find_stale returns, oldest heartbeat first."""
        query = self._stale_filter(stale_after)
        cursor = self.tasks.find(query).sort("heartbeat_at", ASCENDING).limit(limit)
        return [Task.from_document(doc) async for doc in cursor]

    @_unavailable
    async def get_many(self, task_ids: Iterable[str]) -> dict[str, Task]:
        """The tasks among these ids that exist, by id, in one query."""
        keys = [key for i in task_ids for key in id_filter(i)["_id"]["$in"]]
        if not keys:
            return {}
        found = [Task.from_document(doc) async for doc in self.tasks.find({"_id": {"$in": keys}})]
        return {task.id: task for task in found}

    @_unavailable
    async def fingerprint(self) -> tuple[Any, ...]:
        """Something that changes when tasks are added, removed or change state, from cheap
        commands (counts on the time index, the newest _id): the feed's polling fallback."""
        counts = [await self.tasks.count_documents({"state": s.value}) for s in State]
        newest = await self.tasks.find_one({}, projection={"_id": True}, sort=[("_id", -1)])
        total = await self.tasks.estimated_document_count()
        return (*counts, total, None if newest is None else newest["_id"])

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
                        await asyncio.sleep(EMPTY_BATCH_PAUSE)  # see wakeups()
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

    # -- the workers' registry: who is alive and what each holds ---------------------------

    @_unavailable
    async def ensure_worker_indexes(self) -> None:
        """A TTL index: the server deletes a worker's record GONE_WORKERS_KEPT seconds after
        it was last seen (MongoDB and SecantusDB sweep once a minute); no client round trip."""
        await self.workers.create_index(
            [("last_seen", ASCENDING)], name="gone", expireAfterSeconds=GONE_WORKERS_KEPT
        )

    @_unavailable
    async def register_worker(self, worker_id: str, fields: dict[str, Any]) -> None:
        """Write this worker's record (one upsert); `last_seen` is the server's clock."""
        await self.workers.update_one(
            {"_id": worker_id},
            {"$set": fields, "$currentDate": {"last_seen": True}},
            upsert=True,
        )

    @_unavailable
    async def unregister_worker(self, worker_id: str) -> None:
        """Remove this worker's record (a clean stop)."""
        await self.workers.delete_one({"_id": worker_id})

    @_unavailable
    async def list_workers(self, stale_after: float, *, limit: int = 1000) -> list[WorkerSeen]:
        """Registered workers by id; one silent for over `stale_after` seconds (on the
        database clock) is gone."""
        now = self.clock.now()
        cursor = self.workers.find({}).sort("_id", ASCENDING).limit(limit)
        return [
            WorkerSeen.from_document(doc, now=now, stale_after=stale_after) async for doc in cursor
        ]

    # -- queue figures for /metrics ---------------------------------------------------
    #
    # Five reads, each served by an index of INDEXES. On MongoDB three of them read index
    # keys only (count scans, a covered scan), and the two that read documents read the
    # tasks not yet COMPLETE: what waits, runs or failed, never the history of done work.
    # SecantusDB has no index-only reads: there every read decodes the documents it
    # matches, so the per-type pass costs one pass over the collection.

    @_unavailable
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
        stale = await self.tasks.count_documents(self._stale_filter(stale_after))
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

    # -- retention: finished tasks expire (service/retention.py) ----------------------
    #
    # Only COMPLETE and FAILED tasks have `finished_at` (a requeue removes it), so a TTL
    # index on it expires finished work and nothing else.

    @_unavailable
    async def ensure_retention(self, seconds: float) -> str:
        """Make the TTL index on finished_at expire after `seconds` (0: drop it, keep all).
        Returns what was done: "created", "changed", "kept", "dropped" or "none"."""
        existing = (await self.tasks.index_information()).get(RETENTION_INDEX)
        if existing is not None and existing.get("partialFilterExpression") != FINISHED_RANGE:
            await self.tasks.drop_index(RETENTION_INDEX)  # another shape: made anew below
            existing = None
        if seconds <= 0:
            if existing is None:
                return "none"
            await self.tasks.drop_index(RETENTION_INDEX)
            return "dropped"
        expire = max(int(seconds), 1)
        if existing is None:
            await self.tasks.create_index(
                "finished_at",
                name=RETENTION_INDEX,
                expireAfterSeconds=expire,
                partialFilterExpression=FINISHED_RANGE,
            )
            return "created"
        if existing.get("expireAfterSeconds") == expire:
            return "kept"
        # Another setting than the index holds: change it in place (what create_index
        # refuses to do), so the last process to start with a new value wins.
        index = {"name": RETENTION_INDEX, "expireAfterSeconds": expire}
        await self.tasks.database.command("collMod", self.tasks.name, index=index)
        return "changed"

    @_unavailable
    async def delete_expired(self, *, finished_before: datetime, limit: int) -> int:
        """Delete at most `limit` COMPLETE or FAILED tasks that finished before the given
        time (for servers whose TTL monitor does not do it). One indexed read, one delete."""
        expired = {"finished_at": {"$lt": finished_before}, **FINISHED_RANGE}
        cursor = self.tasks.find(expired, projection={"_id": True}).limit(limit)
        keys = [doc["_id"] async for doc in cursor]
        if not keys:
            return 0
        result = await self.tasks.delete_many({"_id": {"$in": keys}, **expired})
        return result.deleted_count

    # -- recurring schedules (service/scheduler.py) -------------------------------------
    #
    # One document per schedule in its own collection, holding its next occurrence
    # (`next_at`). Workers turn a due occurrence into an ordinary task carrying
    # `schedule_id` and `occurrence`; the unique index OCCURRENCE_INDEX on those two makes
    # that insert idempotent, and advancing `next_at` is fenced on its old value.

    @_unavailable
    async def ensure_schedule_indexes(self) -> None:
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

    @_unavailable
    async def create_schedule(self, *, template: Mapping[str, Any], timing: Timing) -> Schedule:
        """Insert a schedule: `template` holds the task's type, args, priority, max_attempts
        and timeout (as the API checked them); its first occurrence is computed now."""
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

    @_unavailable
    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        """The schedule with this id, or None."""
        doc = await self.schedules.find_one(id_filter(schedule_id))
        return None if doc is None else Schedule.from_document(doc)

    @_unavailable
    async def list_schedules(self, *, limit: int) -> list[Schedule]:
        """Up to `limit` schedules, oldest first."""
        cursor = self.schedules.find({}).sort("_id", ASCENDING).limit(limit)
        return [Schedule.from_document(doc) async for doc in cursor]

    @_unavailable
    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule and the tasks it made ahead whose occurrence has not come yet
        (those already due or running stay); False if there was none."""
        doc = await self.schedules.find_one_and_delete(id_filter(schedule_id))
        if doc is None:
            return False
        await self.tasks.delete_many(self._ahead(doc["_id"]))
        return True

    @_unavailable
    async def pause_schedule(self, schedule_id: str, *, paused: bool) -> Schedule | None:
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
        schedule = Schedule.from_document(doc)
        if paused:
            earliest = await self.withdraw_ahead(schedule)
            if earliest is not None and (schedule.next_at is None or earliest < schedule.next_at):
                doc["next_at"] = earliest
        return Schedule.from_document(doc)

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

    @_unavailable
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

    @_unavailable
    async def schedule_active(self, schedule: Schedule) -> bool:
        """True while the schedule exists and is not paused."""
        doc = await self.schedules.find_one({"_id": schedule.key}, {"paused": 1})
        return doc is not None and doc.get("paused") is not True

    @_unavailable
    async def due_schedules(self, *, now: datetime, limit: int) -> list[Schedule]:
        """Schedules not paused whose next occurrence is at or before `now` (the due index;
        the schedule job passes a moment ahead of the clock)."""
        due = {"paused": False, "next_at": {"$lte": now}}
        cursor = self.schedules.find(due).sort("next_at", ASCENDING).limit(limit)
        return [Schedule.from_document(doc) async for doc in cursor]

    @_unavailable
    async def create_occurrence(self, schedule: Schedule, occurrence: datetime) -> Task | None:
        """Insert the task of one occurrence, due at it; None if a task for it exists
        already (another worker made it: the unique index refused this one)."""
        doc = self._new_task(
            ObjectId(),
            task_type=schedule.type,
            run_at=None,
            max_attempts=schedule.max_attempts or 1,
            args=schedule.args,
            priority=schedule.priority,
            time_limit=schedule.timeout,
        )
        doc.update(run_at=occurrence, schedule_id=schedule.id, occurrence=occurrence)
        try:
            await self.tasks.insert_one(doc)
        except DuplicateKeyError:
            return None
        return Task.from_document(doc)

    @_unavailable
    async def advance_schedule(
        self, schedule: Schedule, *, to: datetime | None, now: datetime
    ) -> bool:
        """Move the schedule's next occurrence on to `to` (None: it has no more), fenced on
        the value it was read with: of workers racing, one advances it; False for the rest,
        and if the schedule was deleted or paused meanwhile."""
        result = await self.schedules.update_one(
            {"_id": schedule.key, "next_at": schedule.next_at, "paused": False},
            {"$set": {"next_at": to, "advanced_at": now}},
        )
        return result.modified_count == 1

    # -- per-type concurrency limits: slots (service/limits.py) ------------------------
    #
    # One document per limited type, {_id: type, limit, holders: [{lease, worker, at}]}.
    # A worker takes a slot before it claims a task of the type, with the lease it then
    # claims with, and gives it back after the task left STARTED. Every change is one
    # atomic update of that document; the task's lease fences the slot: recovery frees a
    # slot only once no STARTED task holds its lease.

    @_unavailable
    async def take_slot(self, task_type: str, *, limit: int, lease: str, worker_id: str) -> bool:
        """Take one of the `limit` slots of `task_type` for `lease`; False when all are held.

        One update: it matches only while fewer than `limit` leases hold a slot (no element
        at index limit-1), so concurrent takers can never push past the limit. The first
        taker creates the document; a taker that finds it full collides on its _id.
        """
        holder = {"lease": lease, "worker": worker_id, "at": self.clock.now()}
        try:
            result = await self.limits.update_one(
                {"_id": task_type, f"holders.{limit - 1}": {"$exists": False}},
                {"$push": {"holders": holder}, "$set": {"limit": limit}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return result.modified_count == 1 or result.upserted_id is not None

    @_unavailable
    async def free_slot(self, task_type: str, lease: str) -> None:
        """Give back the slot `lease` holds (nothing if it holds none): one update."""
        await self.limits.update_one({"_id": task_type}, {"$pull": {"holders": {"lease": lease}}})

    @_unavailable
    async def free_lost_slots(self, stale_after: float, *, within: float | None = None) -> int:
        """Free the slots taken over `stale_after` seconds ago whose lease holds no STARTED
        task (its worker died, or its task was recovered); returns how many.

        A live holder is never freed: its task is STARTED under the slot's lease from the
        claim until its result is written, and its claim lands within a fraction of the
        stale threshold after the slot is taken (the claim is bounded), so a slot that old
        without a STARTED task is one whose claim found nothing or whose holder is gone.
        """
        cutoff = self.clock.surely_now() - timedelta(seconds=stale_after)
        freed = 0
        with pymongo.timeout(within):
            async for doc in self.limits.find({"holders.at": {"$lt": cutoff}}):
                holders = doc.get("holders")
                old = [
                    h["lease"]
                    for h in (holders if isinstance(holders, list) else [])
                    if isinstance(h, dict)
                    and isinstance(h.get("at"), datetime)
                    and h["at"] < cutoff
                ]
                held = {"state": State.STARTED.value, "lease": {"$in": old}}
                alive = set(await self.tasks.distinct("lease", held))
                lost = [lease for lease in old if lease not in alive]
                if lost:
                    gone = {"lease": {"$in": lost}, "at": {"$lt": cutoff}}
                    result = await self.limits.update_one(
                        {"_id": doc["_id"]}, {"$pull": {"holders": gone}}
                    )
                    freed += len(lost) if result.modified_count else 0
        return freed

    @_unavailable
    async def slot_holders(self, task_type: str) -> list[dict[str, Any]]:
        """The holders of `task_type`'s slots as stored (for operators and tests)."""
        doc = await self.limits.find_one({"_id": task_type})
        holders = None if doc is None else doc.get("holders")
        return list(holders) if isinstance(holders, list) else []


RETENTION_INDEX = "retention"
# COMPLETE and FAILED, as a range a partial index may hold on every server ($in may not):
# only they expire, whatever a person or a migration left in finished_at elsewhere.
FINISHED_RANGE: dict[str, Any] = {
    "state": {"$gte": State.COMPLETE.value, "$lte": State.FAILED.value}
}
# How long a gone worker's record stays to be seen (who died, holding what) before the
# server's TTL monitor deletes it.
GONE_WORKERS_KEPT = 3600


@dataclass(frozen=True, kw_only=True)
class WorkerSeen:
    """A worker's record as read, and whether it is alive: heard from within the stale
    threshold. Read defensively: a field of another shape reads as empty."""

    id: str
    host: str | None
    pid: int | None
    started_at: datetime | None
    concurrency: int | None
    running: int
    tasks: tuple[str, ...]
    version: str | None
    types: tuple[str, ...]
    metrics_port: int | None
    last_seen: datetime | None
    alive: bool
    seconds_since_seen: float | None

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, now: datetime, stale_after: float) -> WorkerSeen:
        """Build from a stored record; never raises."""

        def of(kind: type, name: str) -> Any:
            value = doc.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        def strings(name: str) -> tuple[str, ...]:
            value = doc.get(name)
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        last_seen = of(datetime, "last_seen")
        since = None if last_seen is None else (now - last_seen).total_seconds()
        return cls(
            id=str(doc.get("_id")),
            host=of(str, "host"),
            pid=of(int, "pid"),
            started_at=of(datetime, "started_at"),
            concurrency=of(int, "concurrency"),
            running=of(int, "running") or 0,
            tasks=strings("tasks"),
            version=of(str, "version"),
            types=strings("types"),
            metrics_port=of(int, "metrics_port"),
            last_seen=last_seen,
            alive=since is not None and since <= stale_after,
            seconds_since_seen=since,
        )


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


# -- recurring schedules: when occurrences fall ---------------------------------------------

OCCURRENCE_INDEX = "schedule_occurrence"
_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, kw_only=True)
class Timing:
    """When a schedule recurs, as the API checked it: `cron` (five fields, in `timezone`)
    or `every` seconds; optional bounds; the missed policy."""

    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    missed: str = MissedPolicy.LATEST.value


def next_occurrence(schedule: Schedule, after: datetime, *, inclusive: bool) -> datetime | None:
    """The schedule's first occurrence after `after` (or at it, if `inclusive`), not before
    start_at; None when it falls after end_at or the schedule cannot say."""
    if schedule.start_at is not None and after < schedule.start_at:
        after, inclusive = schedule.start_at, True
    found: datetime | None = None
    if schedule.every is not None and schedule.anchor is not None:
        step = round(schedule.every * 1000)
        elapsed = (after - schedule.anchor) // _MS
        count = max(0, -(-elapsed // step) if inclusive else elapsed // step + 1)
        found = schedule.anchor + count * step * _MS
    elif schedule.cron is not None:
        start = after - _MS if inclusive else after
        found = _cron_step(schedule, start, forward=True)
    if found is None or (schedule.end_at is not None and found > schedule.end_at):
        return None
    return to_millis(found)


def latest_occurrence(schedule: Schedule, now: datetime) -> datetime | None:
    """The schedule's last occurrence at or before `now`, never before its stored next one
    (None if that is after `now`): what the missed policy `latest` creates."""
    first = schedule.next_at
    if first is None or first > now:
        return None
    if schedule.end_at is not None:
        now = min(now, schedule.end_at)
    found: datetime | None = None
    if schedule.every is not None and schedule.anchor is not None:
        step = round(schedule.every * 1000)
        found = schedule.anchor + (now - schedule.anchor) // _MS // step * step * _MS
    elif schedule.cron is not None:
        found = _cron_step(schedule, now + _MS, forward=False)
    return first if found is None or found < first else to_millis(found)


def _cron_step(schedule: Schedule, start: datetime, *, forward: bool) -> datetime | None:
    """croniter's next (or previous) match strictly after (before) `start`, in the
    schedule's time zone, as UTC."""
    assert schedule.cron is not None
    try:
        zone = zoneinfo.ZoneInfo(schedule.timezone)
        matches = croniter(schedule.cron, start.astimezone(zone))
        found = matches.get_next(datetime) if forward else matches.get_prev(datetime)
    except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError, CroniterError):
        return None  # a stored expression this version cannot read: no occurrences
    assert isinstance(found, datetime)
    return found.astimezone(UTC)
