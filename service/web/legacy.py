"""The earlier version's routes, kept for its clients: every task in a state, create by
type and Unix seconds in the path, delete all. Its GET and DELETE /id/{id} are served by
the tasks' own handlers (see service.web.routes)."""

from __future__ import annotations

from aiohttp import web

from service.errors import DeleteAllDisabled
from service.models import Task
from service.task_view import TaskSchema
from service.web.common import json_response, task_schema
from service.web.keys import REGISTRY, SETTINGS, STORE
from service.web.openapi import operation
from service.web.schemas.fields import parse_number
from service.web.schemas.tasks import DeletedSchema, ListQuerySchema
from service.web.tasks import IDEMPOTENCY_PARAMETER, create


@operation(
    "earlier version: every task in a state",
    operation_id="legacyListTasksInState",
    responses={200: {"type": "array", "items": TaskSchema}},
    errors=(400,),
    tags=["earlier version"],
)
async def legacy_tasks_in_state(request: web.Request) -> web.Response:
    """Earlier version: every task in a state (STARTED, NOTSTARTED, COMPLETE, FAILED)."""
    state = ListQuerySchema(registry=request.app[REGISTRY]).load(
        {"state": request.match_info["state"]}
    )["state"]
    tasks = request.app[STORE].tasks
    found: list[Task] = []
    after = None
    while True:
        page = await tasks.page(states=(state,), limit=1000, after=after)
        found.extend(page.tasks)
        # A page that ends where the last one did (sort keys of odd BSON types) ends it too.
        if page.after is None or page.after == after:
            return json_response(task_schema.dump(found, many=True))
        after = page.after


@operation(
    "earlier version: create a task",
    operation_id="legacyCreateTask",
    responses={201: TaskSchema, 200: TaskSchema},
    errors=(400, 409, 410),
    tags=["earlier version"],
    parameters=[IDEMPOTENCY_PARAMETER],
)
async def legacy_create(request: web.Request) -> web.Response:
    """Earlier version: POST /FOO/0 creates a Foo task due at Unix second 0 (that is, now)."""
    seconds = parse_number(request.match_info["unix_seconds"])
    return await create(request, {"type": request.match_info["type"], "run_at": seconds})


@operation(
    "earlier version: delete every task (when enabled)",
    operation_id="legacyDeleteAll",
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
    return json_response({"deleted": deleted})
