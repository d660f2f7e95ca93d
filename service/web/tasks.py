"""Tasks: create (once per Idempotency-Key), create a batch, list a page, get one (waiting
for it to finish with ?wait=), change a waiting one, delete."""

from __future__ import annotations

import functools
import re
from typing import Any

from aiohttp import web
from marshmallow import ValidationError

from service import tracing
from service.config import Settings
from service.errors import (
    BatchInterrupted,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    IdempotentTaskGone,
)
from service.store import Store
from service.store.base import NewTask
from service.store.idempotency import IdempotentCreate
from service.task_view import TaskSchema
from service.web.common import (
    json_object,
    json_response,
    single_valued_query,
    task_response,
    task_schema,
)
from service.web.keys import REGISTRY, SETTINGS, STORE, TASK_FEED
from service.web.middlewares import refusal
from service.web.openapi import also_error, operation
from service.web.schemas.meta import ErrorSchema
from service.web.schemas.tasks import (
    IDEMPOTENCY_KEY,
    IDEMPOTENCY_KEY_RULE,
    MAX_BATCH,
    BatchBodySchema,
    BatchItemSchema,
    CreateTaskSchema,
    ListQuerySchema,
    TaskPageSchema,
    TaskQuerySchema,
    UpdateTaskSchema,
    decode_cursor,
    encode_cursor,
)

page_schema = TaskPageSchema()
task_query_schema = TaskQuerySchema()
update_schema = UpdateTaskSchema()
batch_body_schema = BatchBodySchema()

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "description": "the same key with the same request within TASK_RUNNER_IDEMPOTENCY_TTL "
    f"answers 200 with the task the first created, and {REPLAYED_HEADER}: true",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}

TRACEPARENT_PARAMETER = {
    "in": "header",
    "name": "traceparent",
    "required": False,
    "description": "W3C Trace Context: kept with the task (its `traceparent`) and sent on its "
    "http requests and callback",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"},
}


async def create(request: web.Request, data: dict[str, Any]) -> web.Response:
    """Create the task `data` describes (a POST /tasks body, or what an earlier version's
    path says): 201, or 200 with the first task when its Idempotency-Key is replayed."""
    loaded = CreateTaskSchema(registry=request.app[REGISTRY]).load(data)
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    once = _idempotent(request, settings)
    insert = store.tasks.create if once is None else functools.partial(store.keys.create_once, once)
    attributes = {"task_runner.task.type": loaded["type"].name}
    with tracing.span(
        "task-runner create", traceparent=traceparent(request), kind="SERVER", attributes=attributes
    ) as context:
        task = await insert(**_new_task(loaded, settings, traceparent=context).fields())
    if once is not None and once.replayed(task):
        response = task_response(task)
        response.headers[REPLAYED_HEADER] = "true"
        return response
    return task_response(task, status=201)


def _new_task(loaded: dict[str, Any], settings: Settings, *, traceparent: str | None) -> NewTask:
    """The task a create's (or a batch item's) loaded body describes."""
    return NewTask(
        task_type=loaded["type"].name,
        run_at=loaded["run_at"],
        max_attempts=loaded["max_attempts"] or settings.max_attempts,
        args=loaded["args"],
        priority=loaded["priority"],
        time_limit=loaded["timeout"],
        tags=loaded["tags"] or (),
        queue=loaded["queue"],
        callback_url=loaded["callback_url"],
        traceparent=traceparent,
    )


# W3C Trace Context, version 00 (and later versions read as 00 would): version, trace id,
# parent id, flags; all-zero ids and version ff are invalid.
TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


def traceparent(request: web.Request) -> str | None:
    """The request's `traceparent` header, if it is one valid W3C trace context (an invalid
    one is ignored, as the specification says)."""
    values = request.headers.getall("traceparent", [])
    if len(values) != 1:
        return None
    value = values[0].strip()
    if value[:2] == "00" and len(value) != 55:
        return None
    return value[:55] if TRACEPARENT.match(value) else None


def _idempotent(request: web.Request, settings: Settings) -> IdempotentCreate | None:
    """The request's Idempotency-Key, if it has one: 1 to 255 printable ASCII characters."""
    keys = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not keys:
        return None
    if len(keys) > 1 or not IDEMPOTENCY_KEY.fullmatch(keys[0]):
        raise ValidationError({IDEMPOTENCY_HEADER: [IDEMPOTENCY_KEY_RULE]})
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
    parameters=[IDEMPOTENCY_PARAMETER, TRACEPARENT_PARAMETER],
)
async def create_task(request: web.Request) -> web.Response:
    """Create a task: {"type": "foo" (any loaded type), "run_at": ISO 8601 or Unix seconds,
    "args": checked by the type's schema, ...}."""
    return await create(request, await json_object(request))


# The route a keyed batch item counts as (see Idempotency-Key): the same key with the same
# task is the same request by POST /tasks/batch or by POST /tasks.
KEYED_ITEM_ROUTE = "/tasks"
BATCH_BODY = {
    "type": "object",
    "required": ["tasks"],
    "additionalProperties": False,
    "properties": {
        "tasks": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": BatchItemSchema}
    },
}
BATCH_RESULTS = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "results": {
            "type": "array",
            "description": "one per item, in order: the task, or the item's error",
            "items": {"oneOf": [TaskSchema, ErrorSchema]},
        }
    },
}


@also_error(
    503,
    "the database did not answer in time; or the batch stopped part-way (batch_interrupted: "
    "details.stored lists the items stored, details.unknown those that may have been)",
)
@operation(
    "create tasks in a batch",
    responses={200: BATCH_RESULTS},
    errors=(400, 413, 415),
    requestBody={"required": True, "content": {"application/json": {"schema": BATCH_BODY}}},
    operationId="createTasks",
)
async def create_tasks(request: web.Request) -> web.Response:
    """One result per item, in order: the task created (or replayed), or the item's error.

    The body is {"tasks": [item, ...]}, 1 to 1,000 items, each what POST /tasks takes and an
    optional idempotency_key."""
    settings = request.app[SETTINGS]
    larger = request.clone(client_max_size=settings.max_batch_body_bytes)
    items = batch_body_schema.load(await json_object(larger))["tasks"]
    results: list[dict[str, Any]] = [{} for _ in items]
    plain: list[tuple[int, NewTask]] = []
    keyed: list[tuple[int, str, NewTask]] = []
    schema = BatchItemSchema(registry=request.app[REGISTRY])
    attributes = {"task_runner.batch.size": len(items)}
    with tracing.span(
        "task-runner create batch",
        traceparent=traceparent(request),
        kind="SERVER",
        attributes=attributes,
    ) as context:
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ValidationError({"_schema": ["each item must be a JSON object"]})
                loaded = schema.load(item)
            except ValidationError as exc:
                results[index] = _refused(exc)
                continue
            new = _new_task(loaded, settings, traceparent=context)
            if loaded["idempotency_key"] is None:
                plain.append((index, new))
            else:
                keyed.append((index, loaded["idempotency_key"], new))
        await _store_batch(request.app[STORE], settings, plain=plain, keyed=keyed, results=results)
    return json_response({"results": results})


async def _store_batch(
    store: Store,
    settings: Settings,
    *,
    plain: list[tuple[int, NewTask]],
    keyed: list[tuple[int, str, NewTask]],
    results: list[dict[str, Any]],
) -> None:
    """Store a batch's valid items, filling in their results: those without a key with one
    insert_many, then each keyed one on the Idempotency-Key path. A database failure raises
    BatchInterrupted with the item indexes stored (and those that may have been)."""
    positions = [index for index, _ in plain]
    try:
        created = await store.tasks.create_many([new for _, new in plain])
    except BatchInterrupted as exc:
        raise exc.at(positions) from exc
    for index, task in zip(positions, created, strict=True):
        results[index] = task_schema.dump(task)
    stored = list(positions)
    for index, key, new in keyed:
        once = IdempotentCreate(key=key, route=KEYED_ITEM_ROUTE, ttl=settings.idempotency_ttl)
        try:
            task = await store.keys.create_once(once, **new.fields())
        except (IdempotencyKeyReused, IdempotentTaskGone) as exc:
            results[index] = _refused(exc)
            continue
        except DatabaseUnavailable as exc:
            raise BatchInterrupted(stored=sorted(stored), unknown=[index], reason=str(exc)) from exc
        results[index] = task_schema.dump(task)
        stored.append(index)


def _refused(exc: Exception) -> dict[str, Any]:
    """An item's error, in the shape an error answer has."""
    found = refusal(exc)
    assert found is not None, exc
    return found.body()


@operation(
    "list tasks",
    operation_id="listTasks",
    responses={200: TaskPageSchema},
    errors=(400,),
    parameters=[{"in": "query", "schema": ListQuerySchema}],
)
async def list_tasks(request: web.Request) -> web.Response:
    """Tasks ordered by run_at then id (`order=desc`: the latest first), filtered by state,
    type, tag and/or queue, one page at a time; a `next_cursor` goes with the same order."""
    query = ListQuerySchema(registry=request.app[REGISTRY]).load(single_valued_query(request))
    max_page = request.app[SETTINGS].max_page_size
    if query["limit"] > max_page:
        raise ValidationError({"limit": [f"must be between 1 and {max_page}"]})
    after = None if query["cursor"] is None else decode_cursor(query["cursor"])
    page = await request.app[STORE].tasks.page(
        states=() if query["state"] is None else (query["state"],),
        task_type=None if query["type"] is None else query["type"].name,
        tag=query["tag"],
        queue=query["queue"],
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


@also_error(409, "the task is not waiting (task_not_waiting): a worker has claimed it, or it ended")
@operation(
    "change a waiting task",
    responses={200: TaskSchema},
    errors=(400, 404, 413, 415),
    requestBody={"required": True, "content": {"application/json": {"schema": UpdateTaskSchema}}},
    operationId="updateTask",
)
async def update_task(request: web.Request) -> web.Response:
    """The task as changed: only a waiting (NOTSTARTED) task changes.

    Any of run_at, priority, args (checked by the task's type's schema) and tags, in one
    conditional update that never changes a task a worker has claimed."""
    changes = update_schema.load(await json_object(request))
    store = request.app[STORE]
    task_id = request.match_info["id"]
    if "args" in changes:
        task = await store.tasks.get(task_id)
        definition = request.app[REGISTRY].get(task.type)
        if definition is None:
            raise ValidationError(
                {"args": [f"type {task.type!r} is not loaded here: its args cannot be checked"]}
            )
        try:
            changes["args"] = definition.accept_args(changes["args"])
        except ValidationError as exc:
            raise ValidationError({"args": exc.messages}) from None
    return task_response(await store.tasks.update_waiting(task_id, changes=changes))


@operation("delete a task", operation_id="deleteTask", responses={204: None}, errors=(404,))
async def delete_task(request: web.Request) -> web.Response:
    """Delete a task; a worker running it stops within one heartbeat interval."""
    await request.app[STORE].tasks.delete(request.match_info["id"])
    return web.Response(status=204)
