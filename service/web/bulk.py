"""Bulk actions on the tasks a filter matches: requeue them, delete them.

The work is service.ops's, which `task-runner requeue` and `task-runner delete` call too; it
goes a bounded batch at a time and stops starting batches at half the request timeout, so
a call answers what it did and `"more": true` when matches may be left: the client calls
again with the same filter until `more` is false.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from service import ops
from service.models import TaskFilter
from service.web.common import json_object, json_response
from service.web.keys import SETTINGS, STORE
from service.web.openapi import operation
from service.web.schemas.bulk import (
    FILTER_EXAMPLE,
    BulkDeletedSchema,
    BulkRequeuedSchema,
    TaskFilterSchema,
)

logger = logging.getLogger(__name__)

filter_schema = TaskFilterSchema()
REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": TaskFilterSchema, "example": FILTER_EXAMPLE}},
}


async def _filter(request: web.Request) -> TaskFilter:
    loaded: TaskFilter = filter_schema.load(await json_object(request))
    return loaded


# The share of TASK_RUNNER_REQUEST_TIMEOUT a call may go on starting batches: the batch under
# way when it ends still finishes well before the timeout would answer 503.
BUDGET = 0.5


def _within(request: web.Request) -> float:
    return request.app[SETTINGS].request_timeout * BUDGET


@operation(
    "requeue the tasks a filter matches",
    responses={200: BulkRequeuedSchema},
    errors=(400, 413, 415),
    requestBody=REQUEST_BODY,
    operationId="requeueTasks",
)
async def requeue_tasks(request: web.Request) -> web.Response:
    """Every FAILED task the filter matches (COMPLETE ones instead when its `state` is
    COMPLETE) back to NOTSTARTED, due now, attempts reset, errors kept. `more`: call again."""
    task_filter = await _filter(request)
    done = await ops.requeue_matching(request.app[STORE], task_filter, within=_within(request))
    _log("requeued", task_filter, done)
    return json_response(BulkRequeuedSchema().dump({"requeued": done.count, "more": done.more}))


@operation(
    "delete the tasks a filter matches",
    responses={200: BulkDeletedSchema},
    errors=(400, 413, 415),
    requestBody=REQUEST_BODY,
    operationId="deleteTasks",
)
async def delete_tasks(request: web.Request) -> web.Response:
    """Delete every task the filter matches, except STARTED ones (a running task is deleted
    by its id). `more`: call again."""
    task_filter = await _filter(request)
    done = await ops.delete_matching(request.app[STORE], task_filter, within=_within(request))
    _log("deleted", task_filter, done)
    return json_response(BulkDeletedSchema().dump({"deleted": done.count, "more": done.more}))


def _log(what: str, task_filter: TaskFilter, done: ops.Bulk) -> None:
    given: dict[str, Any] = {
        name: value for name, value in vars(task_filter).items() if value is not None
    }
    logger.info("bulk: %s %d task(s) matching %s; more: %s", what, done.count, given, done.more)
