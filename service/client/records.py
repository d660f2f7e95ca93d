"""What the API answers, as frozen dataclasses: Task (with its AttemptErrors), Page,
Schedule, Worker, Stats, and ItemError for an item of a batch the API refused.

Answers are read defensively: a field missing or of another shape (a newer or older API, a
document stored by hand, which the API shows as stored) reads as None or its default, never
as an exception; times are aware datetimes in UTC. Only an answer that is not an object
with a string `id` is an UnexpectedResponse. Each record keeps the answer it was read from
as `raw`, for the fields this client does not know yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.client.errors import UnexpectedResponse
from service.models import TERMINAL, State


class Fields:
    """Typed reads of one JSON object; a value of the wrong type reads as None."""

    def __init__(self, data: Any, *, what: str, status: int = 200) -> None:
        if not isinstance(data, Mapping):
            raise UnexpectedResponse(f"{what} is not an object", status=status, body=repr(data))
        self.data: Mapping[str, Any] = data

    def text(self, name: str) -> str | None:
        value = self.data.get(name)
        return value if isinstance(value, str) else None

    def time(self, name: str) -> datetime | None:
        return parse_time(self.data.get(name))

    def integer(self, name: str) -> int | None:
        value = self.data.get(name)
        return value if type(value) is int else None

    def number(self, name: str) -> float | None:
        value = self.data.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None

    def boolean(self, name: str) -> bool | None:
        value = self.data.get(name)
        return value if isinstance(value, bool) else None

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.data.get(name)
        return dict(value) if isinstance(value, Mapping) else None

    def texts(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name)
        if not isinstance(value, list):
            return ()
        return tuple(item for item in value if isinstance(item, str))

    def counts(self, name: str) -> dict[str, int]:
        value = self.data.get(name)
        if not isinstance(value, Mapping):
            return {}
        return {str(k): v for k, v in value.items() if type(v) is int}

    def objects(self, name: str) -> list[Any]:
        value = self.data.get(name)
        return (
            [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []
        )


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time as an aware datetime in UTC (one without an offset is taken as UTC,
    as the API writes every time); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_state(value: str | None) -> State | str:
    """A State when the API says one; what it says otherwise (a document stored by hand)."""
    if value is not None and value in State.__members__:
        return State(value)
    return value or ""


@dataclass(frozen=True, kw_only=True)
class AttemptError:
    """Why one attempt of a task failed."""

    attempt: int | None
    error: str
    at: datetime | None
    worker: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttemptError:
        """Read one entry of a task's `errors`."""
        read = Fields(data, what="an attempt error")
        return cls(
            attempt=read.integer("attempt"),
            error=read.text("error") or "",
            at=read.time("at"),
            worker=read.text("worker"),
        )


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task as GET /tasks/{id} shows it. `state` is a State (a str), or the stored text
    of a document the API could not read (see `problems`); `done` once COMPLETE or FAILED.
    `tags`, `queue` and `callback_url` are read when the API has them."""

    id: str
    type: str
    state: State | str
    run_at: datetime | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    attempts: int = 0
    max_attempts: int | None = None
    worker: str | None = None
    output: str | None = None
    error: str | None = None
    errors: tuple[AttemptError, ...] = ()
    args: dict[str, Any] | None = None
    priority: int = 0
    timeout: float | None = None
    schedule_id: str | None = None
    occurrence: datetime | None = None
    tags: tuple[str, ...] = ()
    queue: str | None = None
    callback_url: str | None = None
    problems: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the task is COMPLETE or FAILED: it will not run again unless requeued."""
        return self.state in TERMINAL

    @classmethod
    def from_json(cls, data: Any, *, status: int = 200) -> Task:
        """Read a task answer; UnexpectedResponse if it is not an object with an `id`."""
        read = Fields(data, what="a task", status=status)
        task_id = read.text("id")
        if task_id is None:
            raise UnexpectedResponse("a task without an id", status=status, body=repr(data))
        return cls(
            id=task_id,
            type=read.text("type") or "",
            state=parse_state(read.text("state")),
            run_at=read.time("run_at"),
            created_at=read.time("created_at"),
            started_at=read.time("started_at"),
            finished_at=read.time("finished_at"),
            heartbeat_at=read.time("heartbeat_at"),
            attempts=read.integer("attempts") or 0,
            max_attempts=read.integer("max_attempts"),
            worker=read.text("worker"),
            output=read.text("output"),
            error=read.text("error"),
            errors=tuple(AttemptError.from_json(entry) for entry in read.objects("errors")),
            args=read.mapping("args"),
            priority=read.integer("priority") or 0,
            timeout=read.number("timeout"),
            schedule_id=read.text("schedule_id"),
            occurrence=read.time("occurrence"),
            tags=read.texts("tags"),
            queue=read.text("queue"),
            callback_url=read.text("callback_url"),
            problems=read.texts("problems"),
            raw=dict(read.data),
        )


@dataclass(frozen=True)
class Page:
    """One page of GET /tasks: its tasks, and the cursor of the next (None: the last)."""

    tasks: list[Task]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Any, *, status: int = 200) -> Page:
        """Read a page answer."""
        read = Fields(data, what="a page of tasks", status=status)
        tasks = [Task.from_json(entry, status=status) for entry in read.objects("tasks")]
        return cls(tasks=tasks, next_cursor=read.text("next_cursor"))


@dataclass(frozen=True, kw_only=True)
class ItemError:
    """An item of a batch the API refused: its position in the batch and why (the fields of
    an error answer: `code`, `message`, `details`)."""

    index: int
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, index: int, data: Any) -> ItemError:
        """Read `{"code", "message", "details"}` (or an object holding it as `error`)."""
        if isinstance(data, Mapping) and isinstance(data.get("error"), Mapping):
            data = data["error"]
        read = Fields(data, what="an item's error")
        return cls(
            index=index,
            code=read.text("code") or "",
            message=read.text("message") or "",
            details=read.mapping("details") or {},
        )


@dataclass(frozen=True, kw_only=True)
class Queue:
    """A queue as GET /queues/{name} shows it: its settings (None: not set) and its tasks
    counted by state."""

    name: str
    rate: float | None = None
    burst: int = 1
    concurrency: int | None = None
    paused: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any, *, status: int = 200) -> Queue:
        """Read a queue answer; UnexpectedResponse if it is not an object with a `name`."""
        read = Fields(data, what="a queue", status=status)
        name = read.text("name")
        if name is None:
            raise UnexpectedResponse("a queue without a name", status=status, body=repr(data))
        counts = read.mapping("counts") or {}
        return cls(
            name=name,
            rate=read.number("rate"),
            burst=read.integer("burst") or 1,
            concurrency=read.integer("concurrency"),
            paused=read.data.get("paused") is True,
            counts={k: v for k, v in counts.items() if isinstance(v, int)},
            raw=dict(read.data),
        )


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A recurring schedule as GET /schedules/{id} shows it: its task template, when it
    recurs (`cron` in `timezone`, or `every` seconds) and its `next_at`."""

    id: str
    type: str
    args: dict[str, Any] | None = None
    priority: int = 0
    max_attempts: int | None = None
    timeout: float | None = None
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    missed: str = "latest"
    paused: bool = False
    next_at: datetime | None = None
    created_at: datetime | None = None
    queue: str | None = None
    problems: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any, *, status: int = 200) -> Schedule:
        """Read a schedule answer; UnexpectedResponse if it is not an object with an `id`."""
        read = Fields(data, what="a schedule", status=status)
        schedule_id = read.text("id")
        if schedule_id is None:
            raise UnexpectedResponse("a schedule without an id", status=status, body=repr(data))
        return cls(
            id=schedule_id,
            type=read.text("type") or "",
            args=read.mapping("args"),
            priority=read.integer("priority") or 0,
            max_attempts=read.integer("max_attempts"),
            timeout=read.number("timeout"),
            cron=read.text("cron"),
            timezone=read.text("timezone") or "UTC",
            every=read.number("every"),
            start_at=read.time("start_at"),
            end_at=read.time("end_at"),
            missed=read.text("missed") or "latest",
            paused=read.boolean("paused") is True,
            next_at=read.time("next_at"),
            created_at=read.time("created_at"),
            queue=read.text("queue"),
            problems=read.texts("problems"),
            raw=dict(read.data),
        )


@dataclass(frozen=True, kw_only=True)
class Worker:
    """A worker process as GET /workers shows it: what it runs and whether it is alive."""

    id: str
    alive: bool
    running: int = 0
    tasks: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    host: str | None = None
    pid: int | None = None
    concurrency: int | None = None
    version: str | None = None
    started_at: datetime | None = None
    last_seen: datetime | None = None
    seconds_since_seen: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Worker:
        """Read one entry of GET /workers."""
        read = Fields(data, what="a worker")
        return cls(
            id=read.text("id") or "",
            alive=read.boolean("alive") is True,
            running=read.integer("running") or 0,
            tasks=read.texts("tasks"),
            types=read.texts("types"),
            host=read.text("host"),
            pid=read.integer("pid"),
            concurrency=read.integer("concurrency"),
            version=read.text("version"),
            started_at=read.time("started_at"),
            last_seen=read.time("last_seen"),
            seconds_since_seen=read.number("seconds_since_seen"),
            raw=dict(read.data),
        )


@dataclass(frozen=True, kw_only=True)
class Stats:
    """GET /stats, the queue at a glance: counts by state and type, the due backlog and how
    late its oldest task is, stale tasks, unreadable documents, the latest failures."""

    now: datetime | None
    total: int
    by_state: dict[str, int]
    by_type: dict[str, int]
    due: int
    oldest_due_id: str | None
    oldest_due_lag: float | None
    stale: int
    stale_tasks: tuple[Task, ...]
    unreadable: int
    unusable_schedules: int
    recent_failures: tuple[Task, ...]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Stats:
        """Read the answer of GET /stats."""
        read = Fields(data, what="the stats")
        oldest = Fields(read.mapping("oldest_due") or {}, what="the oldest due task")
        return cls(
            now=read.time("now"),
            total=read.integer("total") or 0,
            by_state=read.counts("by_state"),
            by_type=read.counts("by_type"),
            due=read.integer("due") or 0,
            oldest_due_id=oldest.text("id"),
            oldest_due_lag=oldest.number("lag_seconds"),
            stale=read.integer("stale") or 0,
            stale_tasks=tuple(Task.from_json(t) for t in read.objects("stale_tasks")),
            unreadable=read.integer("unreadable") or 0,
            unusable_schedules=read.integer("unusable_schedules") or 0,
            recent_failures=tuple(Task.from_json(t) for t in read.objects("recent_failures")),
            raw=dict(read.data),
        )
