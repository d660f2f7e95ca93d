"""The operator's view and actions: the worker processes, the queue at a glance (GET
/stats, what the dashboard shows) and what one recovery pass did."""

from __future__ import annotations

from marshmallow import Schema, fields

from service.task_view import TaskSchema, Timestamp


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
    unusable_schedules = fields.Integer(
        required=True,
        metadata={"description": "schedules left alone for what they hold (see `problems`)"},
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
