"""Recurring schedules: the body of a new one (a task template and when it recurs), a
schedule as answered, and the list of them."""

from __future__ import annotations

import zoneinfo
from typing import Any

from croniter import croniter
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.models import MissedPolicy
from service.task_view import Timestamp
from service.web.schemas.fields import AnyCaseEnum, RunAt
from service.web.schemas.tasks import CreateTaskSchema

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
    missed = fields.String(
        required=True, metadata={"enum": [policy.value for policy in MissedPolicy]}
    )
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
    tags = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "copied onto each occurrence's task; empty when none"},
    )
    queue = fields.String(required=True, metadata={"description": "each occurrence's queue"})
    callback_url = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "copied onto each occurrence's task; null: none"},
    )
    problems = fields.List(fields.String(), required=True)


class ScheduleListSchema(Schema):
    """GET /schedules: every schedule, oldest first."""

    schedules = fields.List(fields.Nested(ScheduleSchema), required=True)
