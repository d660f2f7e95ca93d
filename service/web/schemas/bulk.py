"""Bulk actions: the filter of POST /tasks/requeue and POST /tasks/delete, and their answers."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, fields, post_load, validate

from service.models import State, TaskFilter
from service.web.schemas.fields import AnyCaseEnum, RunAt

# A tag or a type name as a filter: any text up to this long (tasks of a type no longer
# loaded can still be found).
MAX_NAME = 100


class TaskFilterSchema(Schema):
    """Which tasks a bulk action takes: those that match every field given (at least one)."""

    class Meta:
        unknown = RAISE

    state = AnyCaseEnum(
        State,
        load_default=None,
        allow_none=False,
        metadata={"description": "any letter case; which states each action allows: see it"},
    )
    type = fields.String(
        load_default=None,
        allow_none=False,
        validate=validate.Length(min=1, max=MAX_NAME),
        metadata={"description": "a task type, any letter case, loaded or not"},
    )
    tag = fields.String(
        load_default=None,
        allow_none=False,
        validate=validate.Length(min=1, max=MAX_NAME),
        metadata={"description": "one of the task's tags"},
    )
    finished_after = RunAt(
        load_default=None,
        allow_none=False,
        metadata={"description": "finished at or after it (ISO 8601 or Unix seconds)"},
    )
    finished_before = RunAt(
        load_default=None,
        allow_none=False,
        metadata={"description": "finished before it (ISO 8601 or Unix seconds)"},
    )

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> TaskFilter:
        return TaskFilter(**data)


# What the docs page pre-fills for "Try it out": every FAILED bar task.
FILTER_EXAMPLE = {"state": "FAILED", "type": "bar"}
MORE = (
    "true: the call stopped for time before it was done; call again with the same filter "
    "to go on (false: nothing it matched is left)"
)


class BulkRequeuedSchema(Schema):
    """POST /tasks/requeue: how many tasks this call put back in the queue."""

    requeued = fields.Integer(required=True)
    more = fields.Boolean(required=True, metadata={"description": MORE})


class BulkDeletedSchema(Schema):
    """POST /tasks/delete: how many tasks this call deleted."""

    deleted = fields.Integer(required=True)
    more = fields.Boolean(required=True, metadata={"description": MORE})
