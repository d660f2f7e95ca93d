"""marshmallow schemas: what the API accepts and what it answers."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zoneinfo
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from bson import DatetimeMS, Int64, ObjectId, json_util
from bson.json_util import CANONICAL_JSON_OPTIONS
from croniter import croniter
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.models import PRIORITY_MAX, PRIORITY_MIN, MissedPolicy, State
from service.plugins import Registry, TaskDefinition

MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT = 7 * 24 * 3600
# The first instant BSON dates and ISO 8601 four-digit years cannot hold.
YEAR_10000 = 253_402_300_800
# Unix seconds in a path: ASCII digits, at most one decimal point. int() and float() also
# take "1_000", " 12", "1e3" and every script's digits ("١٢"); the API does not.
UNIX_SECONDS_PATH = re.compile(r"[0-9]+(\.[0-9]+)?")
ASCII_DIGITS = re.compile(r"[0-9]+")


class AnyCaseEnum(fields.Field[StrEnum]):
    """A string enum matched without regard to letter case ("FOO", "foo", "Foo")."""

    def __init__(self, enum: type[StrEnum], **kwargs: Any) -> None:
        self.enum = enum
        self.choices = [member.value for member in enum]
        kwargs["metadata"] = {"enum": self.choices, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else value.value

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> StrEnum:
        if isinstance(value, str):
            for member in self.enum:
                if member.value.lower() == value.lower():
                    return member
        raise ValidationError(f"must be one of {', '.join(self.choices)} (any letter case)")


class TaskTypeName(fields.Field[TaskDefinition]):
    """A task type the API has loaded, by name in any letter case ("FOO", "foo", "Foo").

    The types come from the schema's registry (see WithRegistry); the OpenAPI document
    lists them as this field's enum.
    """

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else value.name

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> TaskDefinition:
        registry: Registry | None = getattr(self.root, "registry", None)
        if registry is None:
            raise ValidationError("no task types are loaded")
        definition = registry.get(value) if isinstance(value, str) else None
        if definition is None:
            raise ValidationError(f"must be one of {', '.join(registry.names)} (any letter case)")
        return definition


class WithRegistry(Schema):
    """A schema that checks task types against the types a process has loaded."""

    def __init__(self, *, registry: Registry | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry


def parse_unix_seconds(value: Any) -> datetime:
    """Unix seconds (int or float, not bool) as an aware UTC datetime, year 1970 to 9999."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError("must be Unix seconds (a number) or ISO 8601 with a UTC offset")
    # Range first: math.isfinite() of an int beyond a float's range raises OverflowError.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("must be Unix seconds (a number) or ISO 8601 with a UTC offset")
    if not 0 <= value < YEAR_10000:
        raise ValidationError(f"Unix seconds must be from 0 to {YEAR_10000 - 1}")
    return datetime.fromtimestamp(value, UTC)


class Timestamp(fields.Field[datetime]):
    """A time in an answer: ISO 8601 in UTC with milliseconds and a Z."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else iso(value)


class RunAt(Timestamp):
    """When a task may start: ISO 8601 with an offset, or Unix seconds."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            return parse_unix_seconds(value)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                "must be ISO 8601 (e.g. 2026-01-31T12:00:00Z) or Unix seconds"
            ) from None
        if parsed.tzinfo is None:
            raise ValidationError("ISO 8601 time needs a UTC offset (e.g. Z or +02:00)")
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # 9999-12-31T23:00:00-14:00 is in year 10000 UTC; 0001-01-01T00:00+14:00 in year 0.
            raise ValidationError("must fall within the years 0001 to 9999 in UTC") from None


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as every time in the API is written."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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

    @validates_schema(skip_on_field_errors=False)
    def _check_args(self, data: dict[str, Any], **kwargs: Any) -> None:
        # Checked by the type's own schema, alongside the other fields' errors.
        definition = data.get("type")
        if isinstance(definition, TaskDefinition) and "args" in data:
            try:
                data["args"] = definition.accept_args(data.get("args"))
            except ValidationError as exc:
                raise ValidationError(exc.messages, field_name="args") from None


def parse_number(raw: str) -> int | float:
    """A path segment of ASCII digits with at most one decimal point ("1700000000",
    "1700000000.5") as a number; anything else is a ValidationError.
    """
    if not UNIX_SECONDS_PATH.fullmatch(raw):
        raise ValidationError(
            {"run_at": ["Unix seconds must be ASCII digits with at most one decimal point"]}
        )
    try:
        return float(raw) if "." in raw else int(raw)
    except ValueError:  # more digits than int() takes (sys.get_int_max_str_digits())
        raise ValidationError(
            {"run_at": [f"Unix seconds must be from 0 to {YEAR_10000 - 1}"]}
        ) from None


class DigitsInteger(fields.Integer):
    """An integer from a query string: ASCII digits only (not "1_0", " 5" or Arabic-Indic)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and not ASCII_DIGITS.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class ListQuerySchema(WithRegistry):
    """GET /tasks query parameters."""

    class Meta:
        unknown = RAISE

    state = AnyCaseEnum(State, load_default=None)
    type = TaskTypeName(load_default=None)
    limit = DigitsInteger(
        load_default=100,
        validate=validate.Range(min=1, max=1000),
        metadata={"description": "page size; at most TASK_RUNNER_MAX_PAGE_SIZE (1000)"},
    )
    cursor = fields.String(load_default=None)


# The longest GET /tasks/{id}?wait= (seconds); the request timeout may cap it further.
MAX_WAIT = 60


class DigitsNumber(fields.Float):
    """A number from a query string: ASCII digits with at most one decimal point ("10",
    "0.5"; not "1e1", ".5", " 5", "inf" or another script's digits)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, str) and not UNIX_SECONDS_PATH.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


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


class AttemptErrorSchema(Schema):
    """One failed attempt."""

    attempt = fields.Integer(required=True, allow_none=True)
    error = fields.String(required=True)
    at = Timestamp(required=True, allow_none=True)
    worker = fields.String(allow_none=True)


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
            "description": f"{', '.join(State)}; anything else only with `problems`",
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
    problems = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "what is malformed in the stored document; empty when none"},
    )


class TaskPageSchema(Schema):
    """One page of GET /tasks."""

    tasks = fields.List(fields.Nested(TaskSchema), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True, metadata={"description": "pass as cursor; null: last"}
    )


class ErrorBodySchema(Schema):
    """What went wrong."""

    code = fields.String(required=True, metadata={"description": "stable, for programs"})
    message = fields.String(required=True, metadata={"description": "for people"})
    details = fields.Dict(required=True, metadata={"description": "which input, and why"})


class ErrorSchema(Schema):
    """Every 4xx and 5xx answer."""

    error = fields.Nested(ErrorBodySchema, required=True)


class HealthSchema(Schema):
    """GET /health when the database answers."""

    status = fields.String(required=True, validate=validate.Equal("ok"))


class DeletedSchema(Schema):
    """DELETE / (delete all)."""

    deleted = fields.Integer(required=True)


class WorkerSchema(Schema):
    """A worker process as it registered itself, and whether it is alive."""

    id = fields.String(required=True, metadata={"description": "host:pid"})
    host = fields.String(required=True, allow_none=True)
    pid = fields.Integer(required=True, allow_none=True)
    started_at = Timestamp(required=True, allow_none=True)
    concurrency = fields.Integer(required=True, allow_none=True)
    running = fields.Integer(required=True, metadata={"description": "tasks it runs now"})
    tasks = fields.List(
        fields.String(), required=True, metadata={"description": "the ids of those tasks"}
    )
    version = fields.String(required=True, allow_none=True)
    types = fields.List(fields.String(), required=True, metadata={"description": "it runs"})
    metrics_port = fields.Integer(
        required=True, allow_none=True, metadata={"description": "its /metrics; null: none"}
    )
    last_seen = Timestamp(required=True, allow_none=True, metadata={"description": "DB clock"})
    alive = fields.Boolean(
        required=True, metadata={"description": "heard from within stale_after seconds"}
    )
    seconds_since_seen = fields.Float(required=True, allow_none=True)


class WorkerListSchema(Schema):
    """GET /workers: every registered worker, alive or gone, by id."""

    stale_after = fields.Float(
        required=True, metadata={"description": "seconds of silence after which one is gone"}
    )
    workers = fields.List(fields.Nested(WorkerSchema), required=True)


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


# -- the dashboard's summary and the operator's actions (issue 11) ----------------------------


class StateTypeCountSchema(Schema):
    """How many tasks are in one state and of one type (as stored: odd values as text)."""

    state = fields.String(required=True, allow_none=True)
    type = fields.String(required=True, allow_none=True)
    count = fields.Integer(required=True)


class OldestDueSchema(Schema):
    """The due task that has waited longest."""

    id = fields.String(required=True)
    type = fields.String(required=True)
    run_at = Timestamp(required=True, allow_none=True)
    lag_seconds = fields.Float(
        required=True, allow_none=True, metadata={"description": "how long past run_at, now"}
    )


class StatsSchema(Schema):
    """GET /stats: the queue at a glance."""

    now = Timestamp(required=True, metadata={"description": "the database's time"})
    total = fields.Integer(required=True)
    by_state = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    by_type = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    counts = fields.List(fields.Nested(StateTypeCountSchema), required=True)
    due = fields.Integer(
        required=True, metadata={"description": "NOTSTARTED tasks already due: the backlog"}
    )
    oldest_due = fields.Nested(OldestDueSchema, required=True, allow_none=True)
    stale_after = fields.Float(required=True, metadata={"description": "seconds; the setting"})
    stale = fields.Integer(
        required=True, metadata={"description": "STARTED tasks with no heartbeat within it"}
    )
    stale_tasks = fields.List(
        fields.Nested(TaskSchema),
        required=True,
        metadata={"description": "up to 20 of them, the longest silent first"},
    )
    unreadable = fields.Integer(
        required=True, metadata={"description": "documents no worker can claim or recover"}
    )
    recent_failures = fields.List(
        fields.Nested(TaskSchema),
        required=True,
        metadata={"description": "the 10 FAILED tasks due last"},
    )


class NotRecoveredSchema(Schema):
    """A stale task that recovery left as it was."""

    id = fields.String(required=True)
    reason = fields.String(required=True)


class RecoverSchema(Schema):
    """POST /recover: what one recovery pass did."""

    stale_after = fields.Float(required=True, metadata={"description": "seconds; the setting"})
    found = fields.Integer(required=True, metadata={"description": "stale tasks found"})
    requeued = fields.List(
        fields.String(), required=True, metadata={"description": "back to NOTSTARTED"}
    )
    failed = fields.List(
        fields.String(), required=True, metadata={"description": "FAILED: attempts used up"}
    )
    not_recovered = fields.List(fields.Nested(NotRecoveredSchema), required=True)


# -- recurring schedules (issue 13) -----------------------------------------------------------

# The longest `every`: ten years of seconds.
MAX_EVERY = 10 * 366 * 24 * 3600


class CreateScheduleSchema(CreateTaskSchema):
    """POST /schedules body: a task template (as POST /tasks takes, without run_at) and when
    it recurs: `cron` (five fields, in `timezone`) or `every` seconds."""

    class Meta:
        unknown = RAISE
        exclude = ("run_at",)

    cron = fields.String(
        load_default=None,
        allow_none=False,
        metadata={
            "description": "five fields: minute hour day-of-month month day-of-week, read in "
            "`timezone`; give this or `every`",
            "example": "*/5 * * * *",
        },
    )
    timezone = fields.String(
        load_default="UTC",
        allow_none=False,
        metadata={"description": "an IANA time zone for `cron` (e.g. Europe/Paris)"},
    )
    every = fields.Float(
        load_default=None,
        allow_none=False,
        allow_nan=False,
        validate=validate.Range(min=1, max=MAX_EVERY),
        metadata={"description": "seconds between occurrences (at least 1); give this or `cron`"},
    )
    start_at = RunAt(
        load_default=None,
        allow_none=False,
        metadata={"description": "no occurrence before this time; `every` counts from it"},
    )
    end_at = RunAt(
        load_default=None,
        allow_none=False,
        metadata={"description": "no occurrence after this time"},
    )
    missed = AnyCaseEnum(
        MissedPolicy,
        load_default=MissedPolicy.LATEST,
        metadata={
            "description": "occurrences missed while no worker ran: latest (create the latest "
            "one, once) or skip (create none)"
        },
    )

    @validates_schema(skip_on_field_errors=True)
    def _check_timing(self, data: dict[str, Any], **kwargs: Any) -> None:
        cron, every = data.get("cron"), data.get("every")
        if (cron is None) == (every is None):
            raise ValidationError("give either cron or every", field_name="cron")
        if cron is not None:
            if len(cron.split()) != 5 or not croniter.is_valid(cron):
                raise ValidationError(
                    "must be a cron expression of five fields (e.g. */5 * * * *)",
                    field_name="cron",
                )
            try:
                zoneinfo.ZoneInfo(data["timezone"])
            except (ValueError, zoneinfo.ZoneInfoNotFoundError):
                raise ValidationError(
                    "must be an IANA time zone (e.g. UTC, Europe/Paris)", field_name="timezone"
                ) from None
        elif data.get("timezone", "UTC") != "UTC":
            raise ValidationError("only with cron", field_name="timezone")
        start, end = data.get("start_at"), data.get("end_at")
        if start is not None and end is not None and end <= start:
            raise ValidationError("must be after start_at", field_name="end_at")


class ScheduleSchema(Schema):
    """A recurring schedule as the API shows it; every time is ISO 8601 UTC."""

    id = fields.String(required=True)
    type = fields.String(required=True)
    args = fields.Dict(required=True, allow_none=True)
    priority = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True, allow_none=True)
    timeout = fields.Float(required=True, allow_none=True)
    cron = fields.String(required=True, allow_none=True)
    timezone = fields.String(required=True)
    every = fields.Float(required=True, allow_none=True)
    start_at = Timestamp(required=True, allow_none=True)
    end_at = Timestamp(required=True, allow_none=True)
    missed = fields.String(required=True, metadata={"description": "latest or skip"})
    paused = fields.Boolean(required=True)
    next_at = Timestamp(
        required=True,
        allow_none=True,
        metadata={
            "description": "the next occurrence no task was made for yet (tasks are made a "
            "little ahead); null: none left (past end_at)"
        },
    )
    created_at = Timestamp(required=True, allow_none=True)
    problems = fields.List(fields.String(), required=True)


class ScheduleListSchema(Schema):
    """GET /schedules: every schedule, oldest first."""

    schedules = fields.List(fields.Nested(ScheduleSchema), required=True)
