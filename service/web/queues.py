"""Queues: list them, one queue, change its settings, pause and resume it, delete its
settings."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from marshmallow import ValidationError

from service.errors import QueueNotFound
from service.models import QUEUE_NAME, State
from service.store.queues import QueueSettings, QueueTable
from service.web.common import json_object, json_response
from service.web.keys import STORE
from service.web.openapi import also_error, operation
from service.web.schemas.queues import QueueListSchema, QueueSchema, QueueSettingsSchema
from service.web.schemas.tasks import QUEUE_RULE

queue_schema = QueueSchema()
settings_schema = QueueSettingsSchema()
NO_QUEUE = "no such queue: it has neither settings nor tasks (queue_not_found)"
NO_SETTINGS = "the queue has no settings (queue_not_found)"


def queue_view(settings: QueueSettings, counts: dict[str, int]) -> dict[str, Any]:
    """A queue as answered: its settings and a count for every state."""
    by_state = {state.value: 0 for state in State} | counts
    return {
        "name": settings.name,
        "rate": settings.rate,
        "burst": settings.burst,
        "concurrency": settings.concurrency,
        "paused": settings.paused,
        "counts": by_state,
    }


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not QUEUE_NAME.fullmatch(name):
        raise ValidationError({"name": [QUEUE_RULE]})
    return name


async def _answer(table: QueueTable, name: str, settings: QueueSettings | None) -> web.Response:
    counts = (await table.counts(name)).get(name, {})
    if settings is None and not counts:
        raise QueueNotFound(name)
    view = queue_view(settings or QueueSettings(name=name), counts)
    return json_response(queue_schema.dump(view))


@operation("list queues", operation_id="listQueues", responses={200: QueueListSchema})
async def list_queues(request: web.Request) -> web.Response:
    """Every queue that has settings or tasks, by name: its settings and counts by state."""
    table = request.app[STORE].queues
    settings = {q.name: q for q in await table.all()}
    counts = await table.counts()
    names = sorted(set(settings) | set(counts))
    views = [queue_view(settings.get(n) or QueueSettings(name=n), counts.get(n, {})) for n in names]
    return json_response(QueueListSchema().dump({"queues": views}))


@also_error(404, NO_QUEUE)
@operation("one queue", operation_id="getQueue", responses={200: QueueSchema}, errors=(400,))
async def get_queue(request: web.Request) -> web.Response:
    """One queue: its settings and its tasks counted by state."""
    name = _name(request)
    table = request.app[STORE].queues
    return await _answer(table, name, await table.get(name))


@operation(
    "change a queue's settings",
    operation_id="putQueue",
    responses={200: QueueSchema},
    errors=(400, 413, 415),
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": QueueSettingsSchema}},
    },
)
async def put_queue(request: web.Request) -> web.Response:
    """Set any of rate, burst, concurrency and paused (null clears one); the other settings
    are kept. Every worker applies the change within about a second (docs/queues.md)."""
    name = _name(request)
    changes = settings_schema.load(await json_object(request))
    table = request.app[STORE].queues
    return await _answer(table, name, await table.put(name, changes))


@operation("pause a queue", operation_id="pauseQueue", responses={200: QueueSchema}, errors=(400,))
async def pause_queue(request: web.Request) -> web.Response:
    """Pause a queue: no task of it starts once workers have seen the pause (within about a
    second); running ones finish."""
    name = _name(request)
    table = request.app[STORE].queues
    return await _answer(table, name, await table.put(name, {"paused": True}))


@operation(
    "resume a queue", operation_id="resumeQueue", responses={200: QueueSchema}, errors=(400,)
)
async def resume_queue(request: web.Request) -> web.Response:
    """Resume a paused queue: its due tasks start again (under its rate and concurrency)."""
    name = _name(request)
    table = request.app[STORE].queues
    return await _answer(table, name, await table.put(name, {"paused": False}))


@also_error(404, NO_SETTINGS)
@operation(
    "delete a queue's settings", operation_id="deleteQueue", responses={204: None}, errors=(400,)
)
async def delete_queue(request: web.Request) -> web.Response:
    """Delete a queue's settings: its tasks stay and run as in a queue without settings (no
    rate, no concurrency cap, not paused) once workers have seen it (within about a second);
    tasks running under a slot of its concurrency give it back as they finish."""
    name = _name(request)
    if not await request.app[STORE].queues.delete(name):
        raise QueueNotFound(name, message=f"queue {name!r} has no settings")
    return web.Response(status=204)
