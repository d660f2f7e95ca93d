"""The operator's resources: the worker processes, requeue a FAILED task, recover stale
tasks now, and the queue at a glance (what the dashboard shows).

Recovery and the counts come from service.ops, which `task-runner recover` and `stats`
call too: the handlers only read the request and dump the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from service import ops
from service.models import State, Task
from service.task_view import TaskSchema
from service.web.common import json_response, task_response
from service.web.keys import SETTINGS, STORE
from service.web.openapi import also_error, operation
from service.web.schemas.operations import RecoverSchema, StatsSchema, WorkerListSchema

worker_list_schema = WorkerListSchema()


@operation(
    "the worker processes, alive or gone",
    operation_id="listWorkers",
    responses={200: WorkerListSchema},
)
async def list_workers(request: web.Request) -> web.Response:
    """Every registered worker: what it holds, when it was last heard from, and whether it
    is alive (heard from within TASK_RUNNER_STALE_AFTER seconds, on the database clock)."""
    stale_after = request.app[SETTINGS].stale_after
    workers = await request.app[STORE].workers.seen(stale_after)
    return json_response(worker_list_schema.dump({"stale_after": stale_after, "workers": workers}))


@also_error(409, "the task is not FAILED; `details` says which state it is in")
@operation(
    "requeue a FAILED task",
    operation_id="requeueTask",
    responses={200: TaskSchema},
    errors=(404,),
)
async def requeue_task(request: web.Request) -> web.Response:
    """The task back to NOTSTARTED, due now, with its attempts reset (its errors kept)."""
    return task_response(await ops.requeue(request.app[STORE], request.match_info["id"]))


@operation(
    "recover stale tasks now", operation_id="recoverStaleTasks", responses={200: RecoverSchema}
)
async def recover(request: web.Request) -> web.Response:
    """What `task-runner recover` does, once: every STARTED task whose worker has been silent
    for TASK_RUNNER_STALE_AFTER goes back to NOTSTARTED, or FAILED when out of attempts."""
    result = await ops.recover(request.app[STORE], stale_after=request.app[SETTINGS].stale_after)
    return json_response(RecoverSchema().dump(result))


@operation("the queue at a glance", operation_id="getStats", responses={200: StatsSchema})
async def stats(request: web.Request) -> web.Response:
    """Counts by state and type, the due backlog and the oldest due task's lag, stale
    tasks, unreadable documents and the latest failures: what the dashboard shows."""
    store, stale_after = request.app[STORE], request.app[SETTINGS].stale_after
    summary = await ops.stats(store, stale_after)
    now = store.clock.now()
    oldest = summary.oldest_due
    body = {
        "now": now,
        "total": summary.total,
        "by_state": summary.by_state,
        "by_type": summary.by_type,
        "counts": summary.counts,
        "due": await store.figures.count_due(),
        "oldest_due": None if oldest is None else _oldest(oldest, now),
        "stale_after": stale_after,
        "stale": summary.stale,
        "stale_tasks": await store.figures.stale_sample(stale_after, limit=20),
        "unreadable": summary.unreadable,
        "unusable_schedules": summary.unusable_schedules,
        "recent_failures": await store.figures.latest(State.FAILED, limit=10),
    }
    return json_response(StatsSchema().dump(body))


def _oldest(task: Task, now: datetime) -> dict[str, Any]:
    lag = None if task.run_at is None else max(0.0, (now - task.run_at).total_seconds())
    return {
        "id": task.id,
        "type": task.type,
        "run_at": task.run_at,
        "lag_seconds": None if lag is None else round(lag, 3),
    }
