"""HTTP handlers and the route table: schema.load -> store -> schema.dump."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from marshmallow import ValidationError

from service.config import Settings
from service.errors import DeleteAllDisabled
from service.models import Schedule, State, Task
from service.store.idempotency import IdempotentCreate
from service.store.occurrences import Timing
from service.web.keys import METRICS, OPENAPI, REGISTRY, SETTINGS, STORE, TASK_FEED
from service.web.openapi import DOCS_PAGE, operation, undocumented
from service.web.schemas.fields import parse_number
from service.web.schemas.meta import ErrorSchema, HealthSchema
from service.web.schemas.operations import RecoverSchema, StatsSchema, WorkerListSchema
from service.web.schemas.schedules import (
    CreateScheduleSchema,
    ScheduleListSchema,
    ScheduleSchema,
)
from service.web.schemas.tasks import (
    CreateTaskSchema,
    DeletedSchema,
    ListQuerySchema,
    TaskPageSchema,
    TaskQuerySchema,
    TaskSchema,
    decode_cursor,
    encode_cursor,
)

H = TypeVar("H", bound=Callable[..., Any])

task_schema = TaskSchema()
page_schema = TaskPageSchema()
task_query_schema = TaskQuerySchema()
worker_list_schema = WorkerListSchema()

routes = web.RouteTableDef()
# The earlier version's paths served by a REST route's handler: the docs file them with the
# earlier version's other routes.
EARLIER_ALIASES = frozenset({"/id/{id}"})


def _task_response(task: Task, *, status: int = 200) -> web.Response:
    response = web.json_response(task_schema.dump(task), status=status)
    if status == 201:
        response.headers["Location"] = f"/tasks/{task.id}"
    return response


# No valid request nests deeper than 2; this leaves room and keeps every walk shallow.
MAX_NESTING = 32


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send the body as application/json")
    try:
        raw = await request.read()
    except (web.RequestPayloadError, ConnectionResetError) as exc:
        # A malformed chunk, or a client that went away mid-body: a 400, not a logged 500.
        raise web.HTTPBadRequest(text=f"the request body could not be read: {exc}") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError({"body": ["not valid JSON"]}) from None
    except RecursionError:
        raise ValidationError({"body": [f"nested deeper than {MAX_NESTING} levels"]}) from None
    if not isinstance(body, dict):
        raise ValidationError({"body": ["must be a JSON object"]})
    reject_operators(body, "body")
    return body


def reject_operators(value: Any, where: str) -> None:
    """Refuse anything shaped like a MongoDB operator ("$ne", {"$gt": ...}) anywhere, and
    anything nested deeper than MAX_NESTING (walked with a stack, not recursion).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list) and depth >= MAX_NESTING:
            raise ValidationError({where: [f"nested deeper than {MAX_NESTING} levels"]})
        if isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, list):
            stack.extend((part, depth + 1) for part in item)
        elif isinstance(item, str) and item.startswith("$"):
            raise ValidationError({where: [f"{item[:40]!r}: MongoDB operators are not accepted"]})


def _single_valued_query(request: web.Request) -> dict[str, str]:
    query = request.query
    repeated = sorted({key for key in query if len(query.getall(key)) > 1})
    if repeated:
        raise ValidationError({key: ["give this parameter once"] for key in repeated})
    reject_operators(dict(query), "query")
    return dict(query)


async def _create(request: web.Request, data: dict[str, Any]) -> web.Response:
    loaded = CreateTaskSchema(registry=request.app[REGISTRY]).load(data)
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    once = _idempotent(request, settings)
    create = store.tasks.create if once is None else functools.partial(store.keys.create_once, once)
    task = await create(
        task_type=loaded["type"].name,
        run_at=loaded["run_at"],
        max_attempts=loaded["max_attempts"] or settings.max_attempts,
        args=loaded["args"],
        priority=loaded["priority"],
        time_limit=loaded["timeout"],
    )
    if once is not None and once.replayed(task):
        response = _task_response(task)
        response.headers[REPLAYED_HEADER] = "true"
        return response
    return _task_response(task, status=201)


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


@routes.post("/tasks")
@operation(
    "create a task",
    responses={201: TaskSchema, 200: TaskSchema},
    errors=(400, 409, 410, 413, 415),
    requestBody={"required": True, "content": {"application/json": {"schema": CreateTaskSchema}}},
    parameters=[IDEMPOTENCY_PARAMETER],
)
async def create_task(request: web.Request) -> web.Response:
    """Create a task: {"type": "foo" (any loaded type), "run_at": ISO 8601 or Unix seconds,
    "args": checked by the type's schema, ...}."""
    return await _create(request, await _json_object(request))


@routes.get("/tasks")
@operation(
    "list tasks",
    responses={200: TaskPageSchema},
    errors=(400,),
    parameters=[{"in": "query", "schema": ListQuerySchema}],
)
async def list_tasks(request: web.Request) -> web.Response:
    """Tasks ordered by run_at then id, filtered by state and/or type, one page at a time."""
    query = ListQuerySchema(registry=request.app[REGISTRY]).load(_single_valued_query(request))
    max_page = request.app[SETTINGS].max_page_size
    if query["limit"] > max_page:
        raise ValidationError({"limit": [f"must be between 1 and {max_page}"]})
    after = None if query["cursor"] is None else decode_cursor(query["cursor"])
    page = await request.app[STORE].tasks.page(
        states=() if query["state"] is None else (query["state"],),
        task_type=None if query["type"] is None else query["type"].name,
        limit=query["limit"],
        after=after,
    )
    next_cursor = None if page.after is None else encode_cursor(page.after)
    return web.json_response(page_schema.dump({"tasks": page.tasks, "next_cursor": next_cursor}))


@routes.get("/tasks/{id}")
@routes.get("/id/{id}")
@operation(
    "one task",
    responses={200: TaskSchema},
    errors=(400, 404),
    parameters=[{"in": "query", "schema": TaskQuerySchema}],
)
async def get_task(request: web.Request) -> web.Response:
    """One task, whole; with `wait`, once it is COMPLETE or FAILED or the wait is over."""
    wait = task_query_schema.load(_single_valued_query(request))["wait"]
    if wait is None:
        return _task_response(await request.app[STORE].tasks.get(request.match_info["id"]))
    timeout = request.app[SETTINGS].request_timeout
    # End the wait before the timeout middleware would answer 503 instead.
    within = min(wait, timeout - min(1.0, timeout / 4))

    def left() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    feed = request.app[TASK_FEED]
    return _task_response(await feed.wait_for(request.match_info["id"], within=within, left=left))


@routes.delete("/tasks/{id}")
@routes.delete("/id/{id}")
@operation("delete a task", responses={204: None}, errors=(404,))
async def delete_task(request: web.Request) -> web.Response:
    """Delete a task; a worker running it stops within one heartbeat interval."""
    await request.app[STORE].tasks.delete(request.match_info["id"])
    return web.Response(status=204)


@routes.get("/health")
@operation("is the database answering?", responses={200: HealthSchema})
async def health(request: web.Request) -> web.Response:
    """200 when the database answers, 503 (from the error middleware) when it does not."""
    await request.app[STORE].ping()
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
@operation("Prometheus metrics: the queue and this API's requests", responses={200: None})
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text format (OpenMetrics if the Accept header asks for it). The queue
    figures are cached for TASK_RUNNER_METRICS_CACHE seconds; a database that does not
    answer shows as task_runner_database_up 0, not as an error."""
    body, content_type = await request.app[METRICS].render(
        request.app[STORE].figures, request.headers.get("Accept", "")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


# Answered in the Prometheus text format, not JSON.
metrics.openapi["responses"]["200"]["content"] = {  # type: ignore[union-attr]
    "text/plain": {"schema": {"type": "string"}}
}


@routes.get("/workers")
@operation("the worker processes, alive or gone", responses={200: WorkerListSchema})
async def list_workers(request: web.Request) -> web.Response:
    """Every registered worker: what it holds, when it was last heard from, and whether it
    is alive (heard from within TASK_RUNNER_STALE_AFTER seconds, on the database clock)."""
    stale_after = request.app[SETTINGS].stale_after
    workers = await request.app[STORE].workers.seen(stale_after)
    return web.json_response(
        worker_list_schema.dump({"stale_after": stale_after, "workers": workers})
    )


@routes.get("/taskstate/{state}")
@operation(
    "earlier version: every task in a state",
    responses={200: {"type": "array", "items": TaskSchema}},
    errors=(400,),
    tags=["earlier version"],
)
async def legacy_tasks_in_state(request: web.Request) -> web.Response:
    """Earlier version: every task in a state (STARTED, NOTSTARTED, COMPLETE, FAILED)."""
    state = ListQuerySchema(registry=request.app[REGISTRY]).load(
        {"state": request.match_info["state"]}
    )["state"]
    store = request.app[STORE]
    tasks: list[Task] = []
    after = None
    while True:
        page = await store.tasks.page(states=(state,), limit=1000, after=after)
        tasks.extend(page.tasks)
        # A page that ends where the last one did (sort keys of odd BSON types) ends it too.
        if page.after is None or page.after == after:
            return web.json_response(task_schema.dump(tasks, many=True))
        after = page.after


@routes.post("/{type}/{unix_seconds}")
@operation(
    "earlier version: create a task",
    responses={201: TaskSchema, 200: TaskSchema},
    errors=(400, 409, 410),
    tags=["earlier version"],
    parameters=[IDEMPOTENCY_PARAMETER],
)
async def legacy_create(request: web.Request) -> web.Response:
    """Earlier version: POST /FOO/0 creates a Foo task due at Unix second 0 (that is, now)."""
    seconds = parse_number(request.match_info["unix_seconds"])
    return await _create(request, {"type": request.match_info["type"], "run_at": seconds})


@routes.delete("/")
@operation(
    "earlier version: delete every task (when enabled)",
    responses={200: DeletedSchema},
    errors=(403,),
    tags=["earlier version"],
)
async def legacy_delete_all(request: web.Request) -> web.Response:
    """Earlier version: delete every task. Only where TASK_RUNNER_ALLOW_DELETE_ALL is on."""
    if not request.app[SETTINGS].allow_delete_all:
        raise DeleteAllDisabled(
            "deleting all tasks is disabled; set TASK_RUNNER_ALLOW_DELETE_ALL=true to enable it"
        )
    deleted = await request.app[STORE].tasks.delete_all()
    return web.json_response({"deleted": deleted})


@routes.get("/openapi.json")
@operation("this document", responses={200: {"type": "object"}})
async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API."""
    return web.json_response(request.app[OPENAPI])


@routes.get("/docs")
@undocumented
async def docs(request: web.Request) -> web.Response:
    """A page to read and try the API (Swagger UI)."""
    return web.Response(text=DOCS_PAGE, content_type="text/html")


# -- the operator's actions and the dashboard's summary (issue 11) -----------------------------


def also_error(status: int, description: str) -> Callable[[H], H]:
    """Document one more error answer of an operation (put above @operation)."""

    def attach(handler: H) -> H:
        handler.openapi["responses"][str(status)] = {  # type: ignore[attr-defined]
            "description": description,
            "content": {"application/json": {"schema": ErrorSchema}},
        }
        return handler

    return attach


@routes.post("/tasks/{id}/requeue")
@also_error(409, "the task is not FAILED; `details` says which state it is in")
@operation("requeue a FAILED task", responses={200: TaskSchema}, errors=(404,))
async def requeue_task(request: web.Request) -> web.Response:
    """The task back to NOTSTARTED, due now, with its attempts reset (its errors kept)."""
    return _task_response(await request.app[STORE].tasks.requeue(request.match_info["id"]))


@routes.post("/recover")
@operation("recover stale tasks now", responses={200: RecoverSchema})
async def recover(request: web.Request) -> web.Response:
    """What `task-runner recover` does, once: every STARTED task whose worker has been silent
    for TASK_RUNNER_STALE_AFTER goes back to NOTSTARTED, or FAILED when out of attempts."""
    store = request.app[STORE]
    stale_after = request.app[SETTINGS].stale_after
    stale = await store.claims.find_stale(stale_after)
    if stale:
        await store.claims.recover_stale(stale_after, only=[task.id for task in stale])
    after = await store.tasks.get_many(task.id for task in stale)
    result: dict[str, Any] = {
        "stale_after": stale_after,
        "found": len(stale),
        "requeued": [],
        "failed": [],
        "not_recovered": [],
    }
    for before in stale:
        outcome, reason = _recovery_outcome(before, after.get(before.id))
        if outcome == "not_recovered":
            result[outcome].append({"id": before.id, "reason": reason})
        else:
            result[outcome].append(before.id)
    return web.json_response(RecoverSchema().dump(result))


def _recovery_outcome(before: Task, now: Task | None) -> tuple[str, str]:
    """What recovery did to a stale task, judged from its state now (as `recover` prints)."""
    if now is None:
        return "not_recovered", "deleted meanwhile"
    if now.state == State.STARTED and now.lease == before.lease:
        return "not_recovered", "its worker was heard from again"
    if now.state == State.STARTED:  # recovered, then claimed again at once
        return "requeued", ""
    if now.state == State.FAILED and now.finished_at != before.finished_at:
        return "failed", ""
    if now.state == State.NOTSTARTED:
        return "requeued", ""
    return "not_recovered", f"{now.state} meanwhile"


@routes.get("/stats")
@operation("the queue at a glance", responses={200: StatsSchema})
async def stats(request: web.Request) -> web.Response:
    """Counts by state and type, the due backlog and the oldest due task's lag, stale
    tasks, unreadable documents and the latest failures: what the dashboard shows."""
    store = request.app[STORE]
    stale_after = request.app[SETTINGS].stale_after
    summary = await store.figures.stats(stale_after)
    now = store.clock.now()
    by_state: dict[str, int] = dict.fromkeys(State, 0)
    by_type: dict[str, int] = {}
    counts: list[dict[str, Any]] = []
    for (state, task_type), count in sorted(
        summary.by_state_and_type.items(), key=lambda item: tuple(map(str, item[0]))
    ):
        counts.append({"state": _text(state), "type": _text(task_type), "count": count})
        by_state[str(state)] = by_state.get(str(state), 0) + count
        by_type[str(task_type)] = by_type.get(str(task_type), 0) + count
    oldest = summary.oldest_due
    body = {
        "now": now,
        "total": sum(by_state.values()),
        "by_state": by_state,
        "by_type": by_type,
        "counts": counts,
        "due": await store.figures.count_due(),
        "oldest_due": None
        if oldest is None
        else {
            "id": oldest.id,
            "type": oldest.type,
            "run_at": oldest.run_at,
            "lag_seconds": None
            if oldest.run_at is None
            else round(max(0.0, (now - oldest.run_at).total_seconds()), 3),
        },
        "stale_after": stale_after,
        "stale": summary.stale,
        "stale_tasks": await store.figures.stale_sample(stale_after, limit=20),
        "unreadable": summary.unreadable,
        "recent_failures": await store.figures.latest(State.FAILED, limit=10),
    }
    return web.json_response(StatsSchema().dump(body))


def _text(value: object) -> str | None:
    """A stored state or type as text (a document of another shape may hold anything)."""
    return None if value is None else str(value)


# -- recurring schedules (issue 13) -----------------------------------------------------------

schedule_schema = ScheduleSchema()
NO_SCHEDULE = "no such schedule"


def _schedule_response(schedule: Schedule | None, *, status: int = 200) -> web.Response:
    if schedule is None:
        raise web.HTTPNotFound(text=NO_SCHEDULE)
    response = web.json_response(schedule_schema.dump(schedule), status=status)
    if status == 201:
        response.headers["Location"] = f"/schedules/{schedule.id}"
    return response


@routes.post("/schedules")
@operation(
    "create a recurring schedule",
    responses={201: ScheduleSchema},
    errors=(400, 413, 415),
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": CreateScheduleSchema}},
    },
)
async def create_schedule(request: web.Request) -> web.Response:
    """Create a schedule: a task template ({"type", "args", "priority", "max_attempts",
    "timeout"}, checked as POST /tasks checks them) with "cron" (and "timezone") or "every"."""
    body = await _json_object(request)
    loaded = CreateScheduleSchema(registry=request.app[REGISTRY]).load(body)
    template = {
        "type": loaded["type"].name,
        "args": loaded["args"],
        "priority": loaded["priority"],
        "max_attempts": loaded["max_attempts"] or request.app[SETTINGS].max_attempts,
        "timeout": loaded["timeout"],
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
    return _schedule_response(schedule, status=201)


@routes.get("/schedules")
@operation("list schedules", responses={200: ScheduleListSchema})
async def list_schedules(request: web.Request) -> web.Response:
    """Every schedule (up to TASK_RUNNER_MAX_PAGE_SIZE), oldest first."""
    limit = request.app[SETTINGS].max_page_size
    schedules = await request.app[STORE].schedules.page(limit=limit)
    return web.json_response(ScheduleListSchema().dump({"schedules": schedules}))


@routes.get("/schedules/{id}")
@also_error(404, NO_SCHEDULE)
@operation("one schedule", responses={200: ScheduleSchema})
async def get_schedule(request: web.Request) -> web.Response:
    """One schedule, with its next occurrence."""
    return _schedule_response(await request.app[STORE].schedules.get(request.match_info["id"]))


@routes.delete("/schedules/{id}")
@also_error(404, NO_SCHEDULE)
@operation("delete a schedule", responses={204: None})
async def delete_schedule(request: web.Request) -> web.Response:
    """Delete a schedule: no more occurrences; its tasks made ahead whose occurrence has not
    come yet are deleted with it, those already due or running run as usual."""
    if not await request.app[STORE].schedules.delete(request.match_info["id"]):
        raise web.HTTPNotFound(text=NO_SCHEDULE)
    return web.Response(status=204)


@routes.post("/schedules/{id}/pause")
@also_error(404, NO_SCHEDULE)
@operation("pause a schedule", responses={200: ScheduleSchema})
async def pause_schedule(request: web.Request) -> web.Response:
    """Pause a schedule: it creates nothing until resumed, and its tasks made ahead whose
    occurrence has not come yet are withdrawn (its next_at moves back to the first of them)."""
    store = request.app[STORE]
    return _schedule_response(await store.schedules.pause(request.match_info["id"], paused=True))


@routes.post("/schedules/{id}/resume")
@also_error(404, NO_SCHEDULE)
@operation("resume a schedule", responses={200: ScheduleSchema})
async def resume_schedule(request: web.Request) -> web.Response:
    """Resume a paused schedule; occurrences missed meanwhile follow its missed policy."""
    store = request.app[STORE]
    return _schedule_response(await store.schedules.pause(request.match_info["id"], paused=False))
