"""The task record, its states and types. Standard library only."""

from __future__ import annotations

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
ACTIVE = frozenset({State.NOTSTARTED, State.STARTED})


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
class AttemptError:
    """Why one attempt failed."""

    attempt: int
    error: str
    at: datetime
    worker: str | None = None


@dataclass(frozen=True, kw_only=True)
class Task:
    """One task document, as the store returns it."""

    id: str
    type: TaskType
    state: State
    run_at: datetime
    created_at: datetime
    max_attempts: int
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    lease: str | None = None
    worker: str | None = None
    output: str | None = None
    error: str | None = None
    errors: tuple[AttemptError, ...] = field(default_factory=tuple)

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Task:
        """Build a Task from a MongoDB document."""
        return cls(
            id=str(doc["_id"]),
            type=TaskType(doc["type"]),
            state=State(doc["state"]),
            run_at=doc["run_at"],
            created_at=doc["created_at"],
            max_attempts=doc["max_attempts"],
            attempts=doc.get("attempts", 0),
            started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            heartbeat_at=doc.get("heartbeat_at"),
            lease=doc.get("lease"),
            worker=doc.get("worker"),
            output=doc.get("output"),
            error=doc.get("error"),
            errors=tuple(AttemptError(**e) for e in doc.get("errors", ())),
        )
