"""Queues: the body of PUT /queues/{name}, a queue as answered, and the list of them."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.models import State

# Bounds that keep the arithmetic sane; far above what one database serves.
MAX_RATE = 1_000_000
MAX_SLOTS = 100_000


class JsonNumber(fields.Float):
    """A float given as a JSON number: not a string of digits (fields.Float takes "5")."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, str):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class JsonBoolean(fields.Boolean):
    """true or false only: not 1 or 0 (1 == True, so truthy={True} lets 1 through)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class QueueSettingsSchema(Schema):
    """PUT /queues/{name} body: any of rate, burst, concurrency, paused (at least one); null
    clears rate or concurrency (and sets burst back to 1)."""

    class Meta:
        unknown = RAISE

    rate = JsonNumber(
        allow_none=True,
        allow_nan=False,
        validate=validate.Range(min=0, min_inclusive=False, max=MAX_RATE),
        metadata={
            "description": "tasks a second started at most, across every worker (a token "
            "bucket); null: no rate limit",
            "exclusiveMinimum": True,
            "example": 4,
        },
    )
    burst = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1, max=MAX_SLOTS),
        metadata={
            "description": "tokens the bucket holds: starts allowed at once after a quiet "
            "spell (default 1)",
            "example": 1,
        },
    )
    concurrency = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1, max=MAX_SLOTS),
        metadata={
            "description": "tasks STARTED at once at most, across every worker; null: no limit",
            "example": 2,
        },
    )
    paused = JsonBoolean(
        metadata={"description": "true: no task of the queue starts; running ones finish"},
    )

    @validates_schema
    def _something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError(
                "give at least one of rate, burst, concurrency, paused", field_name="body"
            )


class QueueSchema(Schema):
    """A queue: its settings and its tasks counted by state."""

    name = fields.String(required=True)
    rate = fields.Float(required=True, allow_none=True, metadata={"description": "tasks/s"})
    burst = fields.Integer(required=True)
    concurrency = fields.Integer(required=True, allow_none=True)
    paused = fields.Boolean(required=True)
    counts = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        required=True,
        metadata={
            "description": "its tasks by state: "
            + ", ".join(state.value for state in State)
            + " (each present, 0 when none)"
        },
    )


class QueueListSchema(Schema):
    """GET /queues: every queue that has settings or tasks, by name."""

    queues = fields.List(fields.Nested(QueueSchema), required=True)
