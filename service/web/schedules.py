"""Recurring schedules: create, list, get, delete, pause and resume."""

from __future__ import annotations

import logging

from aiohttp import web

from service.errors import DatabaseUnavailable, ScheduleNotFound
from service.models import Schedule
from service.store.materialiser import Materialiser
from service.store.occurrences import Timing
from service.web.common import json_object, json_response
from service.web.keys import REGISTRY, SETTINGS, STORE
from service.web.openapi import also_error, operation
from service.web.schemas.schedules import (
    CreateScheduleSchema,
    ScheduleListSchema,
    ScheduleSchema,
)

logger = logging.getLogger(__name__)
schedule_schema = ScheduleSchema()
NO_SCHEDULE = "no such schedule"


def _schedule_response(
    schedule: Schedule | None, schedule_id: str, *, status: int = 200
) -> web.Response:
    if schedule is None:
        raise ScheduleNotFound(schedule_id)
    response = json_response(schedule_schema.dump(schedule), status=status)
    if status == 201:
        response.headers["Location"] = f"/schedules/{schedule.id}"
    return response


@operation(
    "create a recurring schedule",
    operation_id="createSchedule",
    responses={201: ScheduleSchema},
    errors=(400, 413, 415),
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": CreateScheduleSchema}},
    },
)
async def create_schedule(request: web.Request) -> web.Response:
    """Create a schedule: a task template ({"type", "args", "priority", "max_attempts",
    "timeout", "tags", "queue", "callback_url"}, checked as POST /tasks checks them) with
    "cron" (and "timezone") or "every"."""
    body = await json_object(request)
    loaded = CreateScheduleSchema(registry=request.app[REGISTRY]).load(body)
    template = {
        "type": loaded["type"].name,
        "args": loaded["args"],
        "priority": loaded["priority"],
        "max_attempts": loaded["max_attempts"] or request.app[SETTINGS].max_attempts,
        "timeout": loaded["timeout"],
        "tags": loaded["tags"] or None,
        "queue": loaded["queue"],
        "callback_url": loaded["callback_url"],
    }
    timing = Timing(
        cron=loaded["cron"],
        timezone=loaded["timezone"],
        every=loaded["every"],
        start_at=loaded["start_at"],
        end_at=loaded["end_at"],
        missed=loaded["missed"].value,
    )
    schedule = await request.app[STORE].schedules.create(template=template, timing=timing)
    return _schedule_response(await _made_ahead(request, schedule), schedule.id, status=201)


async def _made_ahead(request: web.Request, schedule: Schedule | None) -> Schedule | None:
    """The schedule after its occurrences within the schedule job's first lookahead are made
    (as a worker's round would, so they start on time rather than when a round finds them)."""
    if schedule is None or schedule.paused:
        return schedule
    schedules = request.app[STORE].schedules
    maker = Materialiser(schedules, interval=request.app[SETTINGS].schedule_interval)
    try:
        if not await maker.materialise(schedule, schedules.clock.surely_now()):
            return schedule
        return await schedules.get(schedule.id)
    except DatabaseUnavailable as exc:
        # The schedule stands (a retried create would make a second one): the workers'
        # rounds make these occurrences, a round late at worst.
        logger.warning(
            "schedule %s: its first occurrences left to the workers: %s", schedule.id, exc
        )
        return schedule


@operation("list schedules", operation_id="listSchedules", responses={200: ScheduleListSchema})
async def list_schedules(request: web.Request) -> web.Response:
    """Every schedule (up to TASK_RUNNER_MAX_PAGE_SIZE), oldest first."""
    limit = request.app[SETTINGS].max_page_size
    schedules = await request.app[STORE].schedules.page(limit=limit)
    return json_response(ScheduleListSchema().dump({"schedules": schedules}))


@also_error(404, NO_SCHEDULE)
@operation("one schedule", operation_id="getSchedule", responses={200: ScheduleSchema})
async def get_schedule(request: web.Request) -> web.Response:
    """One schedule, with its next occurrence."""
    schedule_id = request.match_info["id"]
    return _schedule_response(await request.app[STORE].schedules.get(schedule_id), schedule_id)


@also_error(404, NO_SCHEDULE)
@operation("delete a schedule", operation_id="deleteSchedule", responses={204: None})
async def delete_schedule(request: web.Request) -> web.Response:
    """Delete a schedule: no more occurrences; its tasks made ahead whose occurrence has not
    come yet are deleted with it, those already due or running run as usual."""
    if not await request.app[STORE].schedules.delete(request.match_info["id"]):
        raise ScheduleNotFound(request.match_info["id"])
    return web.Response(status=204)


@also_error(404, NO_SCHEDULE)
@operation("pause a schedule", operation_id="pauseSchedule", responses={200: ScheduleSchema})
async def pause_schedule(request: web.Request) -> web.Response:
    """Pause a schedule: it creates nothing until resumed, and its tasks made ahead whose
    occurrence has not come yet are withdrawn (its next_at moves back to the first of them)."""
    schedules = request.app[STORE].schedules
    schedule_id = request.match_info["id"]
    return _schedule_response(await schedules.pause(schedule_id, paused=True), schedule_id)


@also_error(404, NO_SCHEDULE)
@operation("resume a schedule", operation_id="resumeSchedule", responses={200: ScheduleSchema})
async def resume_schedule(request: web.Request) -> web.Response:
    """Resume a paused schedule; occurrences missed meanwhile follow its missed policy."""
    schedules = request.app[STORE].schedules
    schedule_id = request.match_info["id"]
    resumed = await _made_ahead(request, await schedules.pause(schedule_id, paused=False))
    return _schedule_response(resumed, schedule_id)
