"""PATCH /tasks/{id}: a waiting task's run_at, priority, args (checked by its type's schema)
and tags change in one conditional update; a claimed or finished task never does (409); a
run_at moved earlier wakes the workers as a new task does, and the task starts on time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId
from marshmallow import Schema, fields

from service.config import Settings
from service.models import Task
from service.plugins import Registry, TaskContext, load_registry, task_type
from service.store import Store, new_lease
from service.web.app import create_app
from tests.helpers import WorkerProcess, eventually, wait_until_started

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]


class RenameArgs(Schema):
    name = fields.String(required=True)


@task_type("rename", args=RenameArgs)
async def rename(ctx: TaskContext, args: dict[str, Any]) -> str:
    return str(args["name"])


async def create(api: Client, **body: Any) -> dict[str, Any]:
    response = await api.post("/tasks", json=body)
    assert response.status == 201, await response.text()
    task: dict[str, Any] = await response.json()
    return task


async def patch(api: Client, task_id: str, body: Any, *, status: int = 200) -> dict[str, Any]:
    response = await api.patch(f"/tasks/{task_id}", json=body)
    assert response.status == status, (body, await response.text())
    answer: dict[str, Any] = await response.json()
    return answer


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_a_waiting_tasks_fields_change(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    registry = Registry([*load_registry(entry_points=False), rename.task_type])  # type: ignore[attr-defined]
    api = await aiohttp_client(create_app(settings, registry=registry))
    task = await create(api, type="rename", args={"name": "a"}, run_at="2031-01-01T00:00:00Z")
    later = store.clock.now() + timedelta(days=30)
    changed = await patch(
        api,
        task["id"],
        {"run_at": later.isoformat(), "priority": 5, "args": {"name": "b"}, "tags": ["x", "y"]},
    )
    assert changed["run_at"] == iso(later)
    assert (changed["priority"], changed["args"], changed["tags"]) == (5, {"name": "b"}, ["x", "y"])
    assert changed["state"] == "NOTSTARTED"
    untouched = {"created_at", "max_attempts", "attempts", "type", "id"}
    assert {k: changed[k] for k in untouched} == {k: task[k] for k in untouched}
    assert await (await api.get(f"/tasks/{task['id']}")).json() == changed
    # One field at a time; a past run_at means now, as on create; no tags removes them.
    now = store.clock.now()
    moved = await patch(api, task["id"], {"run_at": 0})
    assert (
        now - timedelta(seconds=1)
        < datetime.fromisoformat(moved["run_at"])
        < now + timedelta(seconds=5)
    )
    assert (moved["priority"], moved["tags"]) == (5, ["x", "y"])
    assert (await patch(api, task["id"], {"tags": []}))["tags"] == []
    stored = await store.db.tasks.find_one({"_id": ObjectId(task["id"])})
    assert stored is not None and "tags" not in stored
    # args are checked by the task's own type's schema.
    refused = await patch(api, task["id"], {"args": {"name": 5}}, status=400)
    assert "args" in refused["error"]["details"]
    refused = await patch(api, task["id"], {"args": {}}, status=400)
    assert "args" in refused["error"]["details"]
    foo = await create(api, type="foo")
    refused = await patch(api, foo["id"], {"args": {"name": "b"}}, status=400)
    assert "args" in refused["error"]["details"]
    assert (await patch(api, foo["id"], {"args": {}}))["args"] is None


async def test_bad_changes_are_400_and_change_nothing(api: Client, store: Store) -> None:
    task = await create(api, type="foo", run_at="2031-01-01T00:00:00Z", tags=["a"])
    for body, field in (
        ({}, "body"),
        ({"max_attempts": 3}, "max_attempts"),
        ({"state": "COMPLETE"}, "state"),
        ({"type": "bar"}, "type"),
        ({"timeout": 5}, "timeout"),
        ({"priority": 11}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"run_at": None}, "run_at"),
        ({"run_at": "tomorrow"}, "run_at"),
        ({"tags": ["a", "a"]}, "tags"),
        ({"tags": None}, "tags"),
        ({"priority": 1, "lease": "x"}, "lease"),
    ):
        error = (await patch(api, task["id"], body, status=400))["error"]
        assert error["code"] == "invalid_request" and field in error["details"], (body, error)
    headers = {"Content-Type": "application/json"}
    for raw in ("[]", "{bad", '{"priority": {"$gt": 0}}'):
        response = await api.patch(f"/tasks/{task['id']}", data=raw, headers=headers)
        assert response.status == 400, raw
    assert (await api.patch(f"/tasks/{task['id']}", data="priority=1")).status == 415
    assert await (await api.get(f"/tasks/{task['id']}")).json() == task


async def test_a_missing_task_is_404(api: Client) -> None:
    for task_id in (str(ObjectId()), "not-an-id"):
        error = (await patch(api, task_id, {"priority": 1}, status=404))["error"]
        assert error["code"] == "task_not_found" and error["details"] == {"id": task_id}


async def test_a_task_a_worker_has_claimed_is_never_changed(api: Client, store: Store) -> None:
    task = await create(api, type="foo")

    async def claimed() -> Task | None:
        return await store.claims.claim("w:1", lease=new_lease())

    held = await eventually(claimed, within=10, what="a claim of the due task")
    assert held is not None and held.id == task["id"]
    error = (await patch(api, task["id"], {"priority": 3, "tags": ["late"]}, status=409))["error"]
    assert error["code"] == "task_not_waiting"
    assert error["details"] == {"id": task["id"], "state": "STARTED"}
    stored = await store.tasks.get(task["id"])
    assert (stored.priority, stored.tags, stored.lease) == (0, (), held.lease)
    # Finished, it cannot change either.
    assert await store.claims.complete(held, "done")
    error = (await patch(api, task["id"], {"run_at": 0}, status=409))["error"]
    assert error["details"] == {"id": task["id"], "state": "COMPLETE"}


async def test_a_moved_run_at_is_announced_to_the_workers(api: Client, store: Store) -> None:
    task = await create(api, type="foo", run_at="2031-01-01T00:00:00Z")
    opened = asyncio.Event()
    seen: list[tuple[Any, datetime | None]] = []

    async def listen() -> None:
        announced = store.watch.announcements(types=["foo"], max_await=0.5, on_open=opened.set)
        async for wakeup in announced:
            seen.append((wakeup.id, wakeup.run_at))

    listener = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await opened.wait()
        await patch(api, task["id"], {"priority": 2})  # not a wake-up: due as it was
        soon = store.clock.now() + timedelta(seconds=30)
        await patch(api, task["id"], {"run_at": soon.isoformat()})
        await eventually(lambda: seen, within=10, what="the moved task announced")
        await asyncio.sleep(0.5)  # nothing else comes
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    assert seen == [(ObjectId(task["id"]), (await store.tasks.get(task["id"])).run_at)]


async def test_tasks_moved_earlier_or_later_start_on_time_with_a_real_worker(
    api: Client, store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # A long safety poll: only the change stream's announcement can start the moved task
    # on time (it was known to be due a minute on, so the worker sleeps until its poll).
    worker = spawn_worker(max_poll_interval=30.0)
    await wait_until_started(worker)
    await asyncio.sleep(1.0)  # first look done, stream open: idle
    now = store.clock.now()
    earlier = await create(api, type="baz", run_at=(now + timedelta(seconds=60)).isoformat())
    later = await create(api, type="baz", run_at=(now + timedelta(seconds=2)).isoformat())
    await asyncio.sleep(0.5)
    await patch(api, earlier["id"], {"run_at": (now + timedelta(seconds=2.5)).isoformat()})
    await patch(api, later["id"], {"run_at": (now + timedelta(seconds=4)).isoformat()})

    async def both_complete() -> bool:
        assert worker.alive(), worker.stderr()
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == 2

    await eventually(both_complete, within=20)
    for task_id in (earlier["id"], later["id"]):
        doc = await store.db.tasks.find_one({"_id": ObjectId(task_id)})
        assert doc is not None
        lag = (doc["started_at"] - doc["run_at"]).total_seconds()
        assert 0 <= lag < 0.5, (task_id, lag, worker.stderr())
