"""Tasks: create (once per Idempotency-Key), list a page, get one (waiting for it to finish
with ?wait=), delete."""

from __future__ import annotations

import functools
import re
from typing import Any

from aiohttp import web
from marshmallow import ValidationError

from service.config import Settings
from service.store.idempotency import IdempotentCreate
from service.web.common import json_object, json_response, single_valued_query, task_response
from service.web.keys import REGISTRY, SETTINGS, STORE, TASK_FEED
from service.web.openapi import operation
from service.web.schemas.tasks import (
    CreateTaskSchema,
    ListQuerySchema,
    TaskPageSchema,
    TaskQuerySchema,
    TaskSchema,
    decode_cursor,
    encode_cursor,
)

page_schema = TaskPageSchema()
task_query_schema = TaskQuerySchema()

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "description": "the same key with the same request within TASK_RUNNER_IDEMPOTENCY_TTL "
    f"answers 200 with the task the first created, and {REPLAYED_HEADER}: true",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}


async def create(request: web.Request, data: dict[str, Any]) -> web.Response:
    """Create the task `data` describes (a POST /tasks body, or what an earlier version's
    path says): 201, or 200 with the first task when its Idempotency-Key is replayed."""
    loaded = CreateTaskSchema(registry=request.app[REGISTRY]).load(data)
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    once = _idempotent(request, settings)
    insert = store.tasks.create if once is None else functools.partial(store.keys.create_once, once)
    task = await insert(
        task_type=loaded["type"].name,
        run_at=loaded["run_at"],
        max_attempts=loaded["max_attempts"] or settings.max_attempts,
        args=loaded["args"],
        priority=loaded["priority"],
        time_limit=loaded["timeout"],
    )
    if once is not None and once.replayed(task):
        response = task_response(task)
        response.headers[REPLAYED_HEADER] = "true"
        return response
    return task_response(task, status=201)


def _idempotent(request: web.Request, settings: Settings) -> IdempotentCreate | None:
    """The request's Idempotency-Key, if it has one: 1 to 255 printable ASCII characters."""
    keys = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not keys:
        return None
    if len(keys) > 1 or not IDEMPOTENCY_KEY.fullmatch(keys[0]):
        raise ValidationError(
            {IDEMPOTENCY_HEADER: ["give one key of 1 to 255 printable ASCII characters"]}
        )
    # The route's pattern: the same key and body by another route is another request.
    resource = request.match_info.route.resource
    route = request.path if resource is None else resource.canonical
    return IdempotentCreate(key=keys[0], route=route, ttl=settings.idempotency_ttl)


@operation(
    "create a task",
    operation_id="createTask",
    responses={201: TaskSchema, 200: TaskSchema},
    errors=(400, 409, 410, 413, 415),
    requestBody={"required": True, "content": {"application/json": {"schema": CreateTaskSchema}}},
    parameters=[IDEMPOTENCY_PARAMETER],
)
async def create_task(request: web.Request) -> web.Response:
    """Create a task: {"type": "foo" (any loaded type), "run_at": ISO 8601 or Unix seconds,
    "args": checked by the type's schema, ...}."""
    return await create(request, await json_object(request))


@operation(
    "list tasks",
    operation_id="listTasks",
    responses={200: TaskPageSchema},
    errors=(400,),
    parameters=[{"in": "query", "schema": ListQuerySchema}],
)
async def list_tasks(request: web.Request) -> web.Response:
    """Tasks ordered by run_at then id (`order=desc`: the latest first), filtered by state
    and/or type, one page at a time; a `next_cursor` goes with the same order."""
    query = ListQuerySchema(registry=request.app[REGISTRY]).load(single_valued_query(request))
    max_page = request.app[SETTINGS].max_page_size
    if query["limit"] > max_page:
        raise ValidationError({"limit": [f"must be between 1 and {max_page}"]})
    after = None if query["cursor"] is None else decode_cursor(query["cursor"])
    page = await request.app[STORE].tasks.page(
        states=() if query["state"] is None else (query["state"],),
        task_type=None if query["type"] is None else query["type"].name,
        limit=query["limit"],
        after=after,
        descending=query["order"] == "desc",
    )
    next_cursor = None if page.after is None else encode_cursor(page.after)
    return json_response(page_schema.dump({"tasks": page.tasks, "next_cursor": next_cursor}))


@operation(
    "one task",
    operation_id="getTask",
    responses={200: TaskSchema},
    errors=(400, 404),
    parameters=[{"in": "query", "schema": TaskQuerySchema}],
)
async def get_task(request: web.Request) -> web.Response:
    """One task, whole; with `wait`, once it is COMPLETE or FAILED or the wait is over."""
    wait = task_query_schema.load(single_valued_query(request))["wait"]
    if wait is None:
        return task_response(await request.app[STORE].tasks.get(request.match_info["id"]))
    timeout = request.app[SETTINGS].request_timeout
    # End the wait, and its last read, before the timeout middleware would answer 503.
    margin = min(1.0, timeout / 4)
    within = min(wait, timeout - margin)

    def left() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    feed = request.app[TASK_FEED]
    found = await feed.wait_for(
        request.match_info["id"], within=within, read_within=margin / 2, left=left
    )
    return task_response(found)


@operation("delete a task", operation_id="deleteTask", responses={204: None}, errors=(404,))
async def delete_task(request: web.Request) -> web.Response:
    """Delete a task; a worker running it stops within one heartbeat interval."""
    await request.app[STORE].tasks.delete(request.match_info["id"])
    return web.Response(status=204)
