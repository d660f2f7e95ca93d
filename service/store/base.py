"""What every part of the store shares: the collections, the client, the errors it
raises, and the helpers that read ids and shape documents."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, WriteConcern, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from service.clock import DbClock, to_millis
from service.errors import DatabaseRefused, DatabaseUnavailable, TaskNotFound
from service.models import DEFAULT_QUEUE, State

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

TASKS = "tasks"
IDEMPOTENCY_KEYS = "idempotency_keys"
SCHEDULES = "schedules"
WORKERS = "workers"
LIMITS = "limits"
QUEUES = "queues"
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
# The dates a run_at may hold: a range matches dates only (not strings, numbers or null),
# uses the index, and leaves out dates that Python cannot decode.
EARLIEST_RUN_AT = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
LATEST_RUN_AT = datetime.fromisoformat("9999-12-31T23:59:59.999+00:00")
DURABLE = WriteConcern(w="majority", j=True)


# Server error codes that mean the credentials, or what they may do, are refused.
REFUSALS = {18: "AuthenticationFailed", 13: "Unauthorized"}


def unavailable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the driver's connection errors into DatabaseUnavailable, and a refusal of the
    credentials into DatabaseRefused."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ConnectionFailure as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        except OperationFailure as exc:
            if exc.code in REFUSALS:
                name = (exc.details or {}).get("codeName") or REFUSALS[exc.code]
                raise DatabaseRefused(f"the database refused this client: {name}") from None
            if exc.timeout:
                raise DatabaseUnavailable("database timed out") from exc
            raise
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


def open_client(
    url: str,
    *,
    timeout: float,
    appname: str,
    event_listeners: Sequence[monitoring._EventListener] = (),
    retry_writes: bool = True,
) -> AsyncMongoClient[dict[str, Any]]:
    """A client configured the same way by every part of the service.

    `retry_writes=False` is for the claim alone (see Store's `claim_client`).

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
        retryWrites=retry_writes,
    )


def type_names(types: Iterable[str]) -> list[str]:
    """How the given types may be stored: lowercase as the API writes them, or as a person or
    an earlier version wrote them ("FOO", "Foo")."""
    return sorted({variant for t in types for variant in (t, t.upper(), t.capitalize())})


def label(value: Any) -> str:
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


DocCollection = AsyncCollection[dict[str, Any]]


@dataclass(frozen=True)
class Database:
    """The client, the database clock and the service's collections, each with the write
    concern its guarantees need."""

    client: AsyncMongoClient[dict[str, Any]]
    clock: DbClock
    tasks: DocCollection
    idempotency_keys: DocCollection
    schedules: DocCollection
    workers: DocCollection
    limits: DocCollection
    queues: DocCollection

    @classmethod
    def open(
        cls, client: AsyncMongoClient[dict[str, Any]], *, database: str, clock: DbClock
    ) -> Database:
        """The collections of `database` on `client`."""
        db = client[database]
        return cls(
            client=client,
            clock=clock,
            # Durable acknowledgement asked for explicitly, whatever the server's or the
            # URL's default: a write the guarantees rest on must survive a crash of the server.
            tasks=db.get_collection(TASKS, write_concern=DURABLE),
            # One record per Idempotency-Key, until it expires.
            idempotency_keys=db.get_collection(IDEMPOTENCY_KEYS, write_concern=DURABLE),
            # The schedules, written as durably as the tasks they create.
            schedules=db.get_collection(SCHEDULES, write_concern=DURABLE),
            # One document per worker process, refreshed by its heartbeat. Acknowledged by
            # the primary only: no guarantee rests on this advisory record, it is rewritten
            # within a stale threshold, and a replicated, journaled write would make every
            # heartbeat wait.
            workers=db.get_collection(WORKERS, write_concern=WriteConcern(w=1)),
            # One document per limited type: the leases that hold its slots.
            limits=db.get_collection(LIMITS, write_concern=DURABLE),
            # One document per queue with settings: rate, burst, concurrency, paused, and
            # the rate's token bucket (tokens, refilled_at).
            queues=db.get_collection(QUEUES, write_concern=DURABLE),
        )


@dataclass(frozen=True, kw_only=True)
class NewTask:
    """A task to create, as the API checked it: `run_at` None (or a past time) for now,
    `args` as its type's schema accepted them, `time_limit` its timeout in seconds."""

    task_type: str
    run_at: datetime | None
    max_attempts: int
    args: Mapping[str, Any] | None = None
    priority: int = 0
    time_limit: float | None = None
    tags: Sequence[str] = ()
    queue: str = DEFAULT_QUEUE
    callback_url: str | None = None
    traceparent: str | None = None

    def fields(self) -> dict[str, Any]:
        """The keyword arguments of new_task_document (and of the creates)."""
        return {
            "task_type": self.task_type,
            "run_at": self.run_at,
            "max_attempts": self.max_attempts,
            "args": self.args,
            "priority": self.priority,
            "time_limit": self.time_limit,
            "tags": self.tags,
            "queue": self.queue,
            "callback_url": self.callback_url,
            "traceparent": self.traceparent,
        }


def new_task_document(
    clock: DbClock,
    task_id: ObjectId,
    *,
    task_type: str,
    run_at: datetime | None,
    max_attempts: int,
    args: Mapping[str, Any] | None,
    priority: int,
    time_limit: float | None,
    tags: Sequence[str] = (),
    queue: str = DEFAULT_QUEUE,
    callback_url: str | None = None,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """A NOTSTARTED task document as every create path stores it; `tags` stored as an
    array when there are any, `queue` always (a document without one is in the default
    queue), `callback_url` and `traceparent` when given."""
    # "Now" is a time the database has surely reached, so the task is due at once.
    # A past time is stored as now, so lag figures and FIFO order among due tasks hold.
    now = clock.surely_now()
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
        "queue": queue,
    }
    if args is not None:
        doc["args"] = dict(args)
    if time_limit is not None:
        doc["timeout"] = time_limit
    if tags:
        doc["tags"] = list(tags)
    if callback_url is not None:
        doc["callback_url"] = callback_url
    if traceparent is not None:
        doc["traceparent"] = traceparent
    return doc


def in_queue(name: str) -> dict[str, Any]:
    """The tasks of queue `name`: a document without `queue` is in the default one."""
    if name == DEFAULT_QUEUE:
        return {"queue": {"$in": [DEFAULT_QUEUE, None]}}
    return {"queue": name}


def stale_filter(clock: DbClock, stale_after: float) -> dict[str, Any]:
    """STARTED tasks whose heartbeat is older than `stale_after` seconds on the database clock."""
    cutoff = clock.surely_now() - timedelta(seconds=stale_after)
    return {"state": State.STARTED.value, "heartbeat_at": {"$lt": cutoff}}


def requeue_update(clock: DbClock) -> dict[str, Any]:
    """The update that puts a finished task back in the queue: NOTSTARTED, due now, a fresh
    set of attempts, no lease or worker left (its errors, output and start kept); its
    callback, if any, is delivered afresh when it ends again."""
    return {
        "$set": {
            "state": State.NOTSTARTED.value,
            "run_at": clock.surely_now(),
            "attempts": 0,
        },
        "$unset": {
            "finished_at": "",
            "lease": "",
            "worker": "",
            "heartbeat_at": "",
            "callback": "",
        },
    }
