"""The task record, its states and types. Standard library only."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Where a task is in its life. The first three are the names clients already use."""

    NOTSTARTED = "NOTSTARTED"
    STARTED = "STARTED"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"


TERMINAL = frozenset({State.COMPLETE, State.FAILED})
PRIORITY_MIN, PRIORITY_MAX = -10, 10
# A schedule's `every`: from a second to ten years of seconds (the API's bounds, and what
# the occurrence arithmetic is safe with: a step of milliseconds that is never 0).
EVERY_MIN, EVERY_MAX = 1, 10 * 366 * 24 * 3600
ACTIVE = frozenset({State.NOTSTARTED, State.STARTED})
# A task's queue: the default one unless given; a document without `queue` is in it.
DEFAULT_QUEUE = "default"
# "." and ".." are left out: path segments that browsers and clients resolve away, so the
# dashboard and the clients could not address such a queue (/queues/{name}).
QUEUE_NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.-]{1,64}")


class TaskType(StrEnum):
    """What a task does when it runs (see service.tasks)."""

    FOO = "foo"
    BAR = "bar"
    BAZ = "baz"

    @classmethod
    def parse(cls, raw: str) -> TaskType:
        """Accept any letter case: "FOO", "Foo" and "foo" are the same type."""
        return cls(raw.lower())


@dataclass(frozen=True, kw_only=True)
class TaskFilter:
    """Which tasks a bulk action takes: those that match every field given.

    `type` matches in any letter case as stored; `tag` is one of the task's `tags`;
    `finished_after` is inclusive, `finished_before` exclusive.
    """

    state: State | None = None
    type: str | None = None
    tag: str | None = None
    finished_before: datetime | None = None
    finished_after: datetime | None = None

    @property
    def empty(self) -> bool:
        """True when no field is given (which would match every task)."""
        given = (self.state, self.type, self.tag, self.finished_before, self.finished_after)
        return all(value is None for value in given)


@dataclass(frozen=True, kw_only=True)
class AttemptError:
    """Why one attempt failed."""

    attempt: int | None
    error: str
    at: datetime | None
    worker: str | None = None


class CallbackState(StrEnum):
    """Where a completion callback's delivery is."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


@dataclass(frozen=True, kw_only=True)
class Callback:
    """The delivery of a finished task to its `callback_url` (an outbox entry on the task)."""

    state: str  # a CallbackState when well formed
    attempts: int = 0
    last_error: str | None = None
    next_at: datetime | None = None  # not before this (the backoff, or a lease's end)
    lease: str | None = None  # the worker delivering it now, fenced like a claim


@dataclass(frozen=True, kw_only=True)
class Task:
    """One task document, as the store reads it.

    Documents are read defensively: the database may hold what an older or newer version, a
    migration or a person wrote. A field of the wrong shape reads as None (or is left out of
    `errors`) and is named in `problems`; nothing stored makes reading fail.
    """

    id: str
    type: str  # lowercase; may name a type that no worker here knows
    state: str  # a State when the document is well formed
    run_at: datetime | None
    created_at: datetime | None
    max_attempts: int | None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    lease: str | None = None
    worker: str | None = None
    output: str | None = None
    error: str | None = None
    errors: tuple[AttemptError, ...] = field(default_factory=tuple)
    args: dict[str, Any] | None = None  # as stored; the type's schema loads them to run
    priority: int = 0  # -10..10: among due tasks, the higher is claimed first
    timeout: float | None = None  # seconds one run may take; None: the type's default
    schedule_id: str | None = None  # the schedule that created it, if one did
    occurrence: datetime | None = None  # the schedule's occurrence it stands for (its run_at)
    tags: tuple[str, ...] = ()  # labels the API filters by (`GET /tasks?tag=`)
    queue: str = DEFAULT_QUEUE  # its queue's rate, concurrency and pause apply to it
    callback_url: str | None = None  # where the finished task is POSTed
    callback: Callback | None = None  # that delivery's state, once the task has finished
    traceparent: str | None = None  # the W3C trace context of the request that created it
    problems: tuple[str, ...] = ()
    malformed: frozenset[str] = frozenset()  # the fields named in `problems`
    # The stored _id, whatever its BSON type: writes address the document by it.
    key: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Task:
        """Build a Task from a MongoDB document of any shape; never raises."""
        reader = _Reader(doc)
        state = reader.text("state", required=True)
        known_state = state in State.__members__
        if state is not None and not known_state:
            reader.problems.append(("state", f"state {state!r} is not one of {', '.join(State)}"))
        task_type = reader.text("type", required=True)
        return cls(
            id=str(doc.get("_id")),
            key=doc.get("_id"),
            type=(task_type or "").lower(),
            state=State(state) if known_state and state is not None else (state or ""),
            run_at=reader.time("run_at", required=True),
            created_at=reader.time("created_at", required=True),
            max_attempts=reader.count("max_attempts", required=True, least=1),
            attempts=reader.count("attempts", required=False, least=0) or 0,
            started_at=reader.time("started_at"),
            finished_at=reader.time("finished_at"),
            heartbeat_at=reader.time("heartbeat_at"),
            lease=reader.text("lease"),
            worker=reader.text("worker"),
            output=reader.text("output"),
            error=reader.text("error"),
            errors=reader.attempt_errors(),
            args=reader.mapping("args"),
            priority=reader.priority(),
            timeout=reader.seconds("timeout"),
            schedule_id=reader.text("schedule_id"),
            occurrence=reader.time("occurrence"),
            tags=reader.tags(),
            queue=reader.text("queue") or DEFAULT_QUEUE,
            callback_url=reader.text("callback_url"),
            callback=reader.callback(),
            traceparent=reader.text("traceparent"),
            problems=tuple(problem for _, problem in reader.problems),
            malformed=frozenset(name for name, _ in reader.problems),
        )

    @property
    def unrunnable(self) -> tuple[str, ...]:
        """The problems that stop a worker from running this task (none: it can run)."""
        needed = ("type", "max_attempts", "attempts", "args")
        # Each problem begins with the name of its field.
        return tuple(p for p in self.problems if p.split(" ", 1)[0] in needed)


class MissedPolicy(StrEnum):
    """What a schedule does with occurrences that came and went while no worker ran."""

    LATEST = "latest"  # create the latest missed occurrence, once
    SKIP = "skip"  # create none; wait for the next future occurrence


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A recurring schedule: a task template and when it recurs (`cron` in `timezone`, or
    `every` seconds from `anchor`), with the time of its next occurrence (`next_at`; None
    once it has no more, past `end_at`). Read defensively like Task: a field of the wrong
    shape reads as None and is named in `problems`.
    """

    id: str
    type: str
    args: dict[str, Any] | None
    priority: int
    max_attempts: int | None
    timeout: float | None
    cron: str | None
    timezone: str
    every: float | None
    anchor: datetime | None  # `every`: the first occurrence; the others follow it
    start_at: datetime | None
    end_at: datetime | None
    missed: str
    paused: bool
    next_at: datetime | None
    created_at: datetime | None
    tags: tuple[str, ...] = ()  # copied onto each occurrence's task
    queue: str = DEFAULT_QUEUE  # the queue of each occurrence's task
    callback_url: str | None = None  # copied onto each occurrence's task
    problems: tuple[str, ...] = ()
    key: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Schedule:
        """Build a Schedule from a stored document of any shape; never raises."""
        reader = _Reader(doc)
        missed = reader.text("missed")
        if missed is not None and missed not in set(MissedPolicy):
            reader.problems.append(("missed", f"missed {missed!r} is not latest or skip"))
        cron = reader.text("cron")
        every = reader.seconds("every", least=EVERY_MIN, most=EVERY_MAX)
        anchor = reader.time("anchor")
        timing_read = not {"cron", "every", "anchor"} & {name for name, _ in reader.problems}
        if timing_read and cron is None and (every is None or anchor is None):
            reader.problems.append(("cron", "neither cron nor every with an anchor is set"))
        return cls(
            id=str(doc.get("_id")),
            key=doc.get("_id"),
            type=(reader.text("type", required=True) or "").lower(),
            args=reader.mapping("args"),
            priority=reader.priority(),
            max_attempts=reader.count("max_attempts", required=True, least=1),
            timeout=reader.seconds("timeout"),
            cron=cron,
            timezone=reader.text("timezone") or "UTC",
            every=every,
            anchor=anchor,
            start_at=reader.time("start_at"),
            end_at=reader.time("end_at"),
            missed=missed if missed in set(MissedPolicy) else MissedPolicy.LATEST.value,
            paused=doc.get("paused") is True,
            next_at=reader.time("next_at"),
            created_at=reader.time("created_at"),
            tags=reader.tags(),
            queue=reader.text("queue") or DEFAULT_QUEUE,
            callback_url=reader.text("callback_url"),
            problems=tuple(problem for _, problem in reader.problems),
        )


class _Reader:
    """Reads typed fields out of a document, noting each one of the wrong shape."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc
        self.problems: list[tuple[str, str]] = []  # (field, what is wrong with it)

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.doc:
            if required:
                self.problems.append((name, f"{name} is missing"))
            return None
        return self.doc[name]

    def _wrong(self, name: str, value: Any, expected: str) -> None:
        described = f"{name} is {type(value).__name__} {_short(value)}, not {expected}"
        self.problems.append((name, described))

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self._get(name, required)
        if value is None or isinstance(value, str):
            if value is None and required and name in self.doc:
                self.problems.append((name, f"{name} is null"))
            return value
        self._wrong(name, value, "a string")
        return None

    def time(self, name: str, *, required: bool = False) -> datetime | None:
        value = self._get(name, required)
        if isinstance(value, datetime):
            return value
        if value is not None or (required and name in self.doc):
            self._wrong(name, value, "a date")
        return None

    def count(self, name: str, *, required: bool, least: int) -> int | None:
        value = self._get(name, required)
        if value is None and not (required and name in self.doc):
            return None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and value == int(value) and value >= least:
            return int(value)
        self._wrong(name, value, f"a whole number of at least {least}")
        return None

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, Mapping):
            try:
                # What the API stores is JSON; a date, an ObjectId or a NaN put there by
                # hand could be neither shown nor handed to a schema as the API gave it.
                json.dumps(value, allow_nan=False)
                return dict(value)
            except (TypeError, ValueError):
                pass
        self._wrong(name, value, "an object of JSON values")
        return None

    def priority(self) -> int:
        value = self._get("priority", False)
        if value is None:
            return 0
        if type(value) is int and PRIORITY_MIN <= value <= PRIORITY_MAX:
            return value
        self._wrong("priority", value, f"a whole number from {PRIORITY_MIN} to {PRIORITY_MAX}")
        return 0

    def seconds(
        self, name: str, *, least: float | None = None, most: float | None = None
    ) -> float | None:
        value = self._get(name, False)
        if value is None:
            return None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = number and math.isfinite(value) and value > 0
        if fits and (least is None or value >= least) and (most is None or value <= most):
            return float(value)
        expected = "a number of seconds above 0"
        if least is not None and most is not None:
            expected = f"a number of seconds from {least} to {most}"
        self._wrong(name, value, expected)
        return None

    def callback(self) -> Callback | None:
        value = self._get("callback", False)
        if value is None:
            return None
        if isinstance(value, Mapping) and isinstance(value.get("state"), str):
            attempts = value.get("attempts")
            error = value.get("last_error")
            next_at = value.get("next_at")
            lease = value.get("lease")
            return Callback(
                state=value["state"],
                attempts=attempts if type(attempts) is int else 0,
                last_error=error if isinstance(error, str) else None,
                next_at=next_at if isinstance(next_at, datetime) else None,
                lease=lease if isinstance(lease, str) else None,
            )
        self._wrong("callback", value, "a callback record")
        return None

    def tags(self) -> tuple[str, ...]:
        value = self._get("tags", False)
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(tag, str) for tag in value):
            return tuple(value)
        self._wrong("tags", value, "a list of strings")
        return ()

    def attempt_errors(self) -> tuple[AttemptError, ...]:
        raw = self.doc.get("errors", [])
        if not isinstance(raw, list):
            self._wrong("errors", raw, "a list")
            return ()
        read: list[AttemptError] = []
        for index, entry in enumerate(raw):
            if isinstance(entry, Mapping) and isinstance(entry.get("error"), str):
                attempt = entry.get("attempt")
                at = entry.get("at")
                worker = entry.get("worker")
                read.append(
                    AttemptError(
                        attempt=attempt if type(attempt) is int else None,
                        error=entry["error"],
                        at=at if isinstance(at, datetime) else None,
                        worker=worker if isinstance(worker, str) else None,
                    )
                )
            else:
                self._wrong(f"errors[{index}]", entry, "an attempt record")
        return tuple(read)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
