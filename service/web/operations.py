"""The operator's resources: the worker processes, requeue a FAILED task, recover stale
tasks now, and the queue at a glance (what the dashboard shows).

The handlers load the request, call one function below and dump its result: recovery's
outcome per task and the stats' figures are what `task-runner recover` and `stats` report
too, so those functions can be shared with the CLI without touching the handlers.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.clock import DbClock
from service.models import State, Task
from service.store.claims import Claims
from service.store.figures import Figures
from service.store.tasks import Tasks
from service.web.common import task_response
from service.web.keys import SETTINGS, STORE
from service.web.openapi import also_error, operation
from service.web.schemas.operations import RecoverSchema, StatsSchema, WorkerListSchema
from service.web.schemas.tasks import TaskSchema

worker_list_schema = WorkerListSchema()


@operation("the worker processes, alive or gone", responses={200: WorkerListSchema})
async def list_workers(request: web.Request) -> web.Response:
    """Every registered worker: what it holds, when it was last heard from, and whether it
    is alive (heard from within TASK_RUNNER_STALE_AFTER seconds, on the database clock)."""
    stale_after = request.app[SETTINGS].stale_after
    workers = await request.app[STORE].workers.seen(stale_after)
    return web.json_response(
        worker_list_schema.dump({"stale_after": stale_after, "workers": workers})
    )


@also_error(409, "the task is not FAILED; `details` says which state it is in")
@operation("requeue a FAILED task", responses={200: TaskSchema}, errors=(404,))
async def requeue_task(request: web.Request) -> web.Response:
    """The task back to NOTSTARTED, due now, with its attempts reset (its errors kept)."""
    return task_response(await request.app[STORE].tasks.requeue(request.match_info["id"]))


@operation("recover stale tasks now", responses={200: RecoverSchema})
async def recover(request: web.Request) -> web.Response:
    """What `task-runner recover` does, once: every STARTED task whose worker has been silent
    for TASK_RUNNER_STALE_AFTER goes back to NOTSTARTED, or FAILED when out of attempts."""
    store = request.app[STORE]
    result = await recover_stale(
        claims=store.claims, tasks=store.tasks, stale_after=request.app[SETTINGS].stale_after
    )
    return web.json_response(RecoverSchema().dump(result))


@operation("the queue at a glance", responses={200: StatsSchema})
async def stats(request: web.Request) -> web.Response:
    """Counts by state and type, the due backlog and the oldest due task's lag, stale
    tasks, unreadable documents and the latest failures: what the dashboard shows."""
    store = request.app[STORE]
    body = await queue_stats(
        figures=store.figures, clock=store.clock, stale_after=request.app[SETTINGS].stale_after
    )
    return web.json_response(StatsSchema().dump(body))


# -- what recovery did, and the stats: the answers' content, apart from HTTP ----------------


async def recover_stale(*, claims: Claims, tasks: Tasks, stale_after: float) -> dict[str, Any]:
    """Recover every stale task once; what became of each, as RecoverSchema dumps it."""
    stale = await claims.find_stale(stale_after)
    if stale:
        await claims.recover_stale(stale_after, only=[task.id for task in stale])
    after = await tasks.get_many(task.id for task in stale)
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
    return result


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


async def queue_stats(*, figures: Figures, clock: DbClock, stale_after: float) -> dict[str, Any]:
    """The queue at a glance, as StatsSchema dumps it: counts sorted by state then type."""
    summary = await figures.stats(stale_after)
    now = clock.now()
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
    return {
        "now": now,
        "total": sum(by_state.values()),
        "by_state": by_state,
        "by_type": by_type,
        "counts": counts,
        "due": await figures.count_due(),
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
        "stale_tasks": await figures.stale_sample(stale_after, limit=20),
        "unreadable": summary.unreadable,
        "recent_failures": await figures.latest(State.FAILED, limit=10),
    }


def _text(value: object) -> str | None:
    """A stored state or type as text (a document of another shape may hold anything)."""
    return None if value is None else str(value)
