"""The client's parts that need no API: every error code the docs list has its exception,
the backoff stays within its bounds, answers of odd shapes read without an exception, and
the calls of the endpoints other branches add (batch, update, bulk actions) against a stub
of their contract (tests/test_client_at_scale.py runs them against the real API).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.client import (
    ApiError,
    AsyncClient,
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    NotFound,
    Retry,
    ServiceUnavailable,
    State,
    Task,
    TaskDeleted,
    TaskNotFound,
    UnexpectedResponse,
)
from service.client.errors import BY_CODE, error_from_answer
from service.client.records import ItemError, Schedule, Stats, Worker, parse_time
from service.web.middlewares import HTTP_CODES

HTTP_API = Path(__file__).parent.parent / "docs" / "http-api.md"


def documented_codes() -> dict[str, int]:
    """Each error code of docs/http-api.md's Errors section, with its status."""
    section = HTTP_API.read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    return {code: int(status) for code, status in re.findall(r"`([a-z_]+)` \((\d{3})", section)}


def test_every_documented_code_has_its_own_exception() -> None:
    codes = documented_codes()
    assert len(codes) >= 15 and codes["task_not_found"] == 404
    for code, status in {**codes, **{v: k for k, v in HTTP_CODES.items()}}.items():
        error = error_from_answer(status, {"error": {"code": code, "message": "m"}}, "")
        assert type(error) is BY_CODE[code], code
        assert (error.code, error.status, error.message, error.details) == (code, status, "m", {})
    deleted = error_from_answer(
        410, {"error": {"code": "task_deleted", "details": {"id": "x"}}}, ""
    )
    assert isinstance(deleted, TaskDeleted) and isinstance(deleted, Conflict)
    assert deleted.details == {"id": "x"} and deleted.message == "task_deleted"
    unavailable = error_from_answer(503, {"error": {"code": "database_unavailable"}}, "")
    assert isinstance(unavailable, DatabaseUnavailable)


def test_an_unknown_code_or_shape_is_classed_by_its_status() -> None:
    newer = error_from_answer(404, {"error": {"code": "worker_not_found", "message": "m"}}, "")
    assert type(newer) is NotFound and newer.code == "worker_not_found"
    plain = error_from_answer(400, None, "Bad Request: invalid HTTP method\n")
    assert type(plain) is InvalidRequest and plain.code == "http_400"
    assert plain.message == "Bad Request: invalid HTTP method"
    gateway = error_from_answer(502, None, "<html>bad gateway</html>")
    assert isinstance(gateway, ServiceUnavailable) and gateway.status == 502
    teapot = error_from_answer(418, {"error": "short and stout"}, "")
    assert type(teapot) is ApiError and teapot.code == "http_418"
    assert str(TaskNotFound("task_not_found", "no task", None, 404)) == (
        "task_not_found (404): no task"
    )


def test_the_backoff_doubles_up_to_its_cap_and_heeds_retry_after() -> None:
    retry = Retry(attempts=8, backoff=0.5, backoff_max=3.0)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (7, 3.0)):
        for _ in range(50):
            assert ceiling / 2 <= retry.delay(failures) <= ceiling
    assert retry.delay(1, retry_after=2.0) == 2.0
    assert retry.delay(1, retry_after=60.0) == 3.0  # capped too
    with pytest.raises(ValueError):
        Retry(attempts=0)


def test_times_are_aware_and_utc() -> None:
    assert parse_time("2026-01-31T12:00:00.000Z") == datetime(2026, 1, 31, 12, tzinfo=UTC)
    plus_two = parse_time("2026-01-31T14:00:00+02:00")
    assert plus_two == datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert plus_two is not None and plus_two.utcoffset() == timedelta(0)
    assert parse_time("2026-01-31T12:00:00") == datetime(2026, 1, 31, 12, tzinfo=UTC)
    for junk in ("next tuesday", 1769860800, None, ["2026"]):
        assert parse_time(junk) is None


def test_a_task_of_any_shape_reads_without_an_exception() -> None:
    task = Task.from_json(
        {
            "id": "6b05d02efdc32c6022fda395",
            "type": "foo",
            "state": "COMPLETE",
            "run_at": "2026-11-24T17:58:06.941Z",
            "attempts": 1,
            "errors": [{"attempt": 1, "error": "boom", "at": None}, "junk"],
            "tags": ["a", 3, "b"],
            "newer_field": {"x": 1},
        }
    )
    assert task.state is State.COMPLETE and task.done
    assert task.run_at == datetime(2026, 11, 24, 17, 58, 6, 941000, tzinfo=UTC)
    assert [e.error for e in task.errors] == ["boom"] and task.tags == ("a", "b")
    assert task.raw["newer_field"] == {"x": 1}
    odd = Task.from_json(
        {
            "id": "x",
            "state": "PAUSED",
            "attempts": "one",
            "priority": True,
            "args": [1],
            "timeout": "nan",
            "problems": ["state 'PAUSED' is not one of ..."],
        }
    )
    assert (odd.state, odd.done, odd.attempts, odd.priority) == ("PAUSED", False, 0, 0)
    assert (odd.type, odd.args, odd.timeout, odd.run_at) == ("", None, None, None)
    assert odd.problems == ("state 'PAUSED' is not one of ...",)
    not_tasks: list[object] = [[], "task", {"type": "foo"}, {"id": 7}]
    for not_a_task in not_tasks:
        with pytest.raises(UnexpectedResponse):
            Task.from_json(not_a_task)


def test_schedules_workers_stats_and_item_errors_read_defensively() -> None:
    schedule = Schedule.from_json({"id": "s", "every": 60, "paused": "yes", "next_at": 5})
    assert (schedule.every, schedule.paused, schedule.next_at, schedule.timezone) == (
        60.0,
        False,
        None,
        "UTC",
    )
    worker = Worker.from_json({"id": "h:1", "alive": True, "tasks": ["a"], "pid": 1.5})
    assert worker.alive and worker.tasks == ("a",) and worker.pid is None
    stats = Stats.from_json(
        {
            "total": 2,
            "by_state": {"COMPLETE": 2, "odd": "x"},
            "oldest_due": {"id": "t", "lag_seconds": 1.5},
            "recent_failures": [{"id": "f", "state": "FAILED"}],
        }
    )
    assert stats.by_state == {"COMPLETE": 2} and stats.oldest_due_id == "t"
    assert stats.oldest_due_lag == 1.5 and [t.id for t in stats.recent_failures] == ["f"]
    assert Stats.from_json({}).total == 0
    refused = ItemError.from_json(3, {"error": {"code": "invalid_request", "details": {"a": 1}}})
    assert (refused.index, refused.code, refused.details) == (3, "invalid_request", {"a": 1})


# -- the calls of endpoints other branches add, against a stub of their contract ---------------

TASK = {"id": "6b05d02efdc32c6022fda395", "type": "foo", "state": "NOTSTARTED"}


@pytest.fixture
async def stub(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> AsyncIterator[tuple[AsyncClient, list[tuple[str, str, Any]]]]:
    """An AsyncClient on a stub of POST /tasks/batch, PATCH /tasks/{id} and the bulk
    actions, and what the stub received (method, path, body)."""
    received: list[tuple[str, str, Any]] = []
    rounds = {"/tasks/requeue": [(2, True), (1, False)], "/tasks/delete": [(3, True), (0, True)]}

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        received.append((request.method, request.path, body))
        if request.path == "/tasks/batch":
            refused = {"error": {"code": "invalid_request", "message": "m", "details": {}}}
            return web.json_response({"results": [TASK, refused, {"task": TASK}]})
        if request.method == "PATCH":
            return web.json_response({**TASK, **body})
        counted = "requeued" if request.path == "/tasks/requeue" else "deleted"
        done, more = rounds[request.path].pop(0)
        return web.json_response({counted: done, "more": more})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    async with AsyncClient(str(server.make_url("")), retry=Retry(attempts=1)) as client:
        yield client, received


async def test_a_batch_answers_a_task_or_an_error_per_item(
    stub: tuple[AsyncClient, list[tuple[str, str, Any]]],
) -> None:
    client, received = stub
    when = datetime(2031, 1, 1, tzinfo=UTC)
    results = await client.create_many([{"type": "foo", "run_at": when}, {"type": "qux"}, {}])
    assert [type(r) for r in results] == [Task, ItemError, Task]
    assert isinstance(results[1], ItemError) and results[1].index == 1
    assert received == [
        (
            "POST",
            "/tasks/batch",
            {"tasks": [{"type": "foo", "run_at": when.isoformat()}, {"type": "qux"}, {}]},
        )
    ]


async def test_update_sends_what_is_given_and_the_bulk_actions_loop_while_more(
    stub: tuple[AsyncClient, list[tuple[str, str, Any]]],
) -> None:
    client, received = stub
    task = await client.update(TASK["id"], priority=5, tags=("a", "b"))
    assert task.priority == 5 and task.tags == ("a", "b")
    with pytest.raises(TypeError):
        await client.update(TASK["id"], tags="urgent")  # not sent as ["u", "r", ...]
    assert await client.requeue_where(type="foo", state=State.FAILED) == 3
    assert await client.delete_where(tag="old") == 3  # a round that did nothing ends it
    assert received == [
        ("PATCH", f"/tasks/{TASK['id']}", {"priority": 5, "tags": ["a", "b"]}),
        ("POST", "/tasks/requeue", {"type": "foo", "state": "FAILED"}),
        ("POST", "/tasks/requeue", {"type": "foo", "state": "FAILED"}),
        ("POST", "/tasks/delete", {"tag": "old"}),
        ("POST", "/tasks/delete", {"tag": "old"}),
    ]
