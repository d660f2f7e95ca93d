"""Tasks: the body of a new task (and of a batch of them, and of a change to a waiting one),
the query parameters of the list and of one task, a task and a page of them as answered,
and the list's opaque cursors."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any

from bson import DatetimeMS, Int64, ObjectId, json_util
from bson.json_util import CANONICAL_JSON_OPTIONS
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.destinations import check_url
from service.models import (
    DEFAULT_QUEUE,
    PRIORITY_MAX,
    PRIORITY_MIN,
    QUEUE_NAME,
    State,
)
from service.plugins import TaskDefinition
from service.task_view import TaskSchema
from service.web.schemas.fields import (
    AnyCaseEnum,
    DigitsInteger,
    DigitsNumber,
    RunAt,
    TaskTypeName,
    WithRegistry,
)

MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT = 7 * 24 * 3600
MAX_TAGS = 10
MAX_TAG_LENGTH = 64
# An Idempotency-Key (the header, or a batch item's `idempotency_key`).
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
IDEMPOTENCY_KEY_RULE = "give one key of 1 to 255 printable ASCII characters"


def _distinct(tags: list[str]) -> None:
    if len(set(tags)) != len(tags):
        raise ValidationError("tags must be distinct")


def tags_field(**kwargs: Any) -> fields.List[str]:
    """A task's tags: up to MAX_TAGS distinct strings of 1 to MAX_TAG_LENGTH characters."""
    metadata = {
        "description": f"up to {MAX_TAGS} distinct labels of 1 to {MAX_TAG_LENGTH} characters, "
        "to filter by (GET /tasks?tag=)",
        "uniqueItems": True,
        **kwargs.pop("metadata", {}),
    }
    return fields.List(
        fields.String(validate=validate.Length(min=1, max=MAX_TAG_LENGTH)),
        validate=[validate.Length(max=MAX_TAGS), _distinct],
        metadata=metadata,
        **kwargs,
    )


QUEUE_RULE = "must be 1 to 64 letters, digits, '_', '-' or '.', not '.' or '..'"
QUEUE_PATTERN = "^(?!\\.\\.?$)[A-Za-z0-9_.-]{1,64}$"


def _queue_name(name: str) -> None:
    if not QUEUE_NAME.fullmatch(name):
        raise ValidationError(QUEUE_RULE)


def queue_field(**kwargs: Any) -> fields.String:
    """A queue's name: 1 to 64 letters, digits, `_`, `-` or `.`."""
    metadata = {"pattern": QUEUE_PATTERN, **kwargs.pop("metadata", {})}
    return fields.String(validate=_queue_name, metadata=metadata, **kwargs)


def _destination(url: str) -> None:
    try:
        check_url(url)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


def callback_url_field(**kwargs: Any) -> fields.String:
    """Where a finished task is POSTed: an http(s) URL the destination rules allow."""
    return fields.String(
        load_default=None,
        allow_none=False,
        validate=_destination,
        metadata={
            "description": "when the task ends COMPLETE or FAILED, it is POSTed here as GET "
            "/tasks/{id} shows it, signed like http tasks (docs/calling-services.md); the same "
            "destination rules apply",
            "maxLength": 2048,
            "example": "https://api.example.com/task-done",
        },
        **kwargs,
    )


class CreateTaskSchema(WithRegistry):
    """POST /tasks body. `type` loads as the type's TaskDefinition and `args` as what its
    schema accepted (the dump of its load), ready to store."""

    class Meta:
        unknown = RAISE

    # Each field's `example` is what the docs page pre-fills for "Try it out"; a test posts
    # the request built from them and expects 201.
    type = TaskTypeName(
        required=True, metadata={"description": "any letter case", "example": "foo"}
    )
    run_at = RunAt(
        load_default=None,
        allow_none=False,
        metadata={
            "description": "ISO 8601 with a UTC offset, or Unix seconds; omit, or give a past "
            "time, for now",
            "example": "2026-01-31T12:00:00Z",
        },
    )
    max_attempts = fields.Integer(
        strict=True,
        load_default=None,
        allow_none=False,
        validate=validate.Range(min=1, max=MAX_ATTEMPTS_LIMIT),
        metadata={
            "description": "cap on attempts; the service default when omitted",
            "example": 3,
        },
    )
    args = fields.Dict(
        keys=fields.String(),
        load_default=None,
        allow_none=False,
        metadata={
            "description": "the task's arguments, checked against its type's schema; a type "
            "without a schema takes none",
            "example": {},
        },
    )
    priority = fields.Integer(
        strict=True,
        load_default=0,
        validate=validate.Range(min=PRIORITY_MIN, max=PRIORITY_MAX),
        metadata={
            "description": "among due tasks, the higher is claimed first",
            "example": 0,
        },
    )
    timeout = fields.Float(
        load_default=None,
        allow_none=False,
        allow_nan=False,
        validate=validate.Range(min=0, min_inclusive=False, max=MAX_TIMEOUT),
        metadata={
            "description": "seconds one run may take before it is cancelled and counted as a "
            "failed attempt; default: the type's, then TASK_RUNNER_TASK_TIMEOUT",
            "example": 60,
        },
    )
    tags = tags_field(load_default=None, allow_none=False, metadata={"example": ["nightly"]})
    queue = queue_field(
        load_default=DEFAULT_QUEUE,
        allow_none=False,
        metadata={
            "description": "the queue it belongs to: its rate, concurrency and pause apply "
            "(docs/queues.md)",
            "example": DEFAULT_QUEUE,
        },
    )
    callback_url = callback_url_field()

    @validates_schema(skip_on_field_errors=False)
    def _check_args(self, data: dict[str, Any], **kwargs: Any) -> None:
        # Checked by the type's own schema, alongside the other fields' errors.
        definition = data.get("type")
        if isinstance(definition, TaskDefinition) and "args" in data:
            try:
                data["args"] = definition.accept_args(data.get("args"))
            except ValidationError as exc:
                raise ValidationError(exc.messages, field_name="args") from None


def _idempotency_key(key: str) -> None:
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationError(IDEMPOTENCY_KEY_RULE)


class BatchItemSchema(CreateTaskSchema):
    """One item of POST /tasks/batch: what POST /tasks takes, and an optional
    `idempotency_key` with the Idempotency-Key header's rules."""

    class Meta:
        unknown = RAISE

    idempotency_key = fields.String(
        load_default=None,
        allow_none=False,
        validate=_idempotency_key,
        metadata={
            "description": "as the Idempotency-Key header of POST /tasks (1 to 255 printable "
            "ASCII characters): the same key with the same item replays its task",
            "pattern": "^[ -~]{1,255}$",
        },
    )


# The most items one POST /tasks/batch takes.
MAX_BATCH = 1000


class BatchBodySchema(Schema):
    """POST /tasks/batch body: {"tasks": [item, ...]}, 1 to MAX_BATCH items, each loaded
    on its own with BatchItemSchema (an item that does not load is that item's error)."""

    class Meta:
        unknown = RAISE

    tasks = fields.List(
        fields.Raw(allow_none=True), required=True, validate=validate.Length(min=1, max=MAX_BATCH)
    )


class UpdateTaskSchema(Schema):
    """PATCH /tasks/{id} body: any of run_at, priority, args (checked by the task's type's
    schema once the task is read) and tags, as POST /tasks takes them; at least one."""

    class Meta:
        unknown = RAISE

    run_at = RunAt(
        allow_none=False,
        metadata={"description": "as on create: a past time means now"},
    )
    priority = fields.Integer(
        strict=True, validate=validate.Range(min=PRIORITY_MIN, max=PRIORITY_MAX)
    )
    args = fields.Dict(
        keys=fields.String(),
        allow_none=False,
        metadata={"description": "replaces the task's arguments; checked by its type's schema"},
    )
    tags = tags_field(allow_none=False, metadata={"description": "replaces the task's tags"})

    @validates_schema
    def _something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError(
                "give at least one of run_at, priority, args, tags", field_name="body"
            )


class ListQuerySchema(WithRegistry):
    """GET /tasks query parameters."""

    class Meta:
        unknown = RAISE

    state = AnyCaseEnum(State, load_default=None)
    type = TaskTypeName(load_default=None)
    tag = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=MAX_TAG_LENGTH),
        metadata={"description": "only the tasks that have this tag"},
    )
    queue = queue_field(load_default=None, metadata={"description": "only this queue's tasks"})
    limit = DigitsInteger(
        load_default=100,
        validate=validate.Range(min=1, max=1000),
        metadata={"description": "page size; at most TASK_RUNNER_MAX_PAGE_SIZE (1000)"},
    )
    cursor = fields.String(load_default=None)
    order = fields.String(
        load_default="asc",
        validate=validate.OneOf(["asc", "desc"]),
        metadata={"description": "asc: the earliest run_at first; desc: the latest first"},
    )


# The longest GET /tasks/{id}?wait= (seconds); the request timeout may cap it further.
MAX_WAIT = 60


class TaskQuerySchema(Schema):
    """GET /tasks/{id} query parameters."""

    class Meta:
        unknown = RAISE

    wait = DigitsNumber(
        load_default=None,
        validate=validate.Range(min=0, max=MAX_WAIT, min_inclusive=False),
        metadata={
            "exclusiveMinimum": True,
            "description": "seconds (more than 0, at most 60; ASCII digits, optionally with a "
            "decimal point) to wait for the task to be COMPLETE or FAILED: the answer comes as "
            "soon as it is, or at the end of the wait with the task as it is then. The wait is "
            "cut to end before TASK_RUNNER_REQUEST_TIMEOUT: at the timeout minus a margin of "
            "a quarter of it, at most one second (29 s with the default 30 s). 404 if the "
            "task does not exist or is deleted during the wait.",
        },
    )


class TaskPageSchema(Schema):
    """One page of GET /tasks."""

    tasks = fields.List(fields.Nested(TaskSchema), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True, metadata={"description": "pass as cursor; null: last"}
    )


class DeletedSchema(Schema):
    """DELETE / (delete all)."""

    deleted = fields.Integer(required=True)


def encode_cursor(after: tuple[Any, Any]) -> str:
    """The opaque cursor for the page after a task's stored (run_at, _id).

    The usual key (a date and an ObjectId) is written compactly; a document of another
    shape as BSON's extended JSON, so paging goes on past it.
    """
    run_at, key = after
    if isinstance(run_at, datetime) and isinstance(key, ObjectId):
        value: list[Any] = [round(run_at.timestamp() * 1000), str(key)]
    else:
        value = ["bson", json_util.dumps([run_at, key], json_options=CANONICAL_JSON_OPTIONS)]
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# What a stored sort key may hold; anything else in a cursor (a document with operators,
# a regular expression, code) was not written by this API.
CURSOR_SCALARS = (type(None), bool, int, float, str, datetime, DatetimeMS, ObjectId, Int64)


def decode_cursor(cursor: str) -> tuple[Any, Any]:
    """Undo encode_cursor; anything else is a ValidationError."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        first, second = json.loads(raw)
        if first == "bson" and isinstance(second, str):
            run_at, key = json_util.loads(second, json_options=CANONICAL_JSON_OPTIONS)
            if not all(isinstance(v, CURSOR_SCALARS) for v in (run_at, key)):
                raise ValueError(cursor)
            return run_at, key
        if isinstance(first, bool) or not isinstance(first, int) or not ObjectId.is_valid(second):
            raise ValueError(cursor)
        return datetime.fromtimestamp(first / 1000, UTC), ObjectId(second)
    except (ValueError, TypeError, binascii.Error, OverflowError, OSError, RecursionError):
        raise ValidationError({"cursor": ["not a cursor this API issued"]}) from None
