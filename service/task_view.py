"""The task as the API shows it: the body of GET /tasks/{id}, and what a completion callback
POSTs. The web layer and the worker's callbacks both import it (and never each other)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import Schema, fields

from service.models import CallbackState, State


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as every time in the API is written."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Timestamp(fields.Field[datetime]):
    """A time in an answer: ISO 8601 in UTC with milliseconds and a Z."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else iso(value)


class AttemptErrorSchema(Schema):
    """One failed attempt."""

    attempt = fields.Integer(required=True, allow_none=True)
    error = fields.String(required=True)
    at = Timestamp(required=True, allow_none=True)
    worker = fields.String(allow_none=True)


class CallbackSchema(Schema):
    """The delivery of a finished task to its callback_url."""

    state = fields.String(
        required=True, metadata={"enum": [state.value for state in CallbackState]}
    )
    attempts = fields.Integer(required=True, metadata={"description": "deliveries tried"})
    last_error = fields.String(
        required=True, allow_none=True, metadata={"description": "why the last one failed"}
    )


class TaskSchema(Schema):
    """A task as the API shows it; every time is ISO 8601 UTC.

    A document stored in another shape (by hand, a migration, another version) is shown as
    far as it can be read: a field of the wrong shape is null and `problems` says why.
    """

    id = fields.String(required=True)
    type = fields.String(
        required=True,
        metadata={"description": "lowercase; one of the types the API has loaded, or as stored"},
    )
    state = fields.String(
        required=True,
        metadata={
            "enum": [state.value for state in State],
            "description": "a document stored with another state (by hand, another version) "
            "is shown as stored, with `problems` saying so",
        },
    )
    run_at = Timestamp(required=True, allow_none=True)
    created_at = Timestamp(required=True, allow_none=True)
    started_at = Timestamp(required=True, allow_none=True)
    finished_at = Timestamp(required=True, allow_none=True)
    heartbeat_at = Timestamp(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True, allow_none=True)
    worker = fields.String(required=True, allow_none=True)
    output = fields.String(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)
    errors = fields.List(fields.Nested(AttemptErrorSchema), required=True)
    args = fields.Dict(required=True, allow_none=True, metadata={"description": "as given"})
    priority = fields.Integer(required=True)
    timeout = fields.Float(required=True, allow_none=True)
    schedule_id = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "the schedule that created this task; null: none did"},
    )
    occurrence = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "the schedule's occurrence this task stands for (its run_at)"},
    )
    tags = fields.List(
        fields.String(), required=True, metadata={"description": "its labels; empty when none"}
    )
    queue = fields.String(
        required=True, metadata={"description": "its queue; `default` unless given"}
    )
    callback_url = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "where the task is POSTed when it ends; null: nowhere"},
    )
    callback = fields.Nested(
        CallbackSchema,
        required=True,
        allow_none=True,
        metadata={"description": "that delivery, once the task has ended; null before"},
    )
    traceparent = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "the W3C trace context of the request that created it"},
    )
    problems = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "what is malformed in the stored document; empty when none"},
    )
