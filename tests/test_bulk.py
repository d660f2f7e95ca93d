"""Bulk actions by filter (POST /tasks/requeue, POST /tasks/delete, `task-runner requeue` with
filter flags, `task-runner delete`): what they take and leave, batch by batch, against the
real database and a real worker."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId

from service import ops
from service.cli import bulk as cli_bulk
from service.config import Settings
from service.models import State, TaskFilter
from service.store import Store, new_lease
from service.store.bulk import BulkTasks
from service.web import bulk as web_bulk
from service.web.app import create_app
from tests.helpers import WorkerProcess, eventually, run_cli, settings_env

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]
HOUR = timedelta(hours=1)


async def finished(
    store: Store,
    *,
    state: str = "FAILED",
    task_type: str = "baz",
    tags: list[str] | None = None,
    finished_at: datetime | None = None,
) -> str:
    """A finished task written directly: one attempt used of one, its error kept."""
    now = datetime.now(UTC)
    doc: dict[str, Any] = {
        "_id": ObjectId(),
        "type": task_type,
        "state": state,
        "run_at": now - HOUR,
        "created_at": now - HOUR,
        "started_at": now - HOUR,
        "finished_at": finished_at or now,
        "attempts": 1,
        "max_attempts": 1,
        "lease": "old-lease",
        "worker": "pod-1:7",
        "error": "boom" if state == "FAILED" else None,
        "errors": [{"attempt": 1, "error": "boom", "at": now, "worker": "pod-1:7"}],
    }
    if tags is not None:
        doc["tags"] = tags
    await store.db.tasks.insert_one(doc)
    return str(doc["_id"])


async def started(store: Store, *, tags: list[str]) -> str:
    """A task claimed by a (live) worker, with these tags."""
    created = await store.tasks.create(task_type="foo", run_at=None, max_attempts=3)
    await store.db.tasks.update_one({"_id": created.key}, {"$set": {"tags": tags}})

    async def claimed() -> bool:
        return await store.claims.claim("pod-2:9", lease=new_lease()) is not None

    await eventually(claimed, within=10, what="a claim of the due task")
    assert (await store.tasks.get(created.id)).state is State.STARTED
    return created.id


async def states(store: Store) -> dict[str, str]:
    return {str(doc["_id"]): doc["state"] async for doc in store.db.tasks.find({})}


# -- HTTP -------------------------------------------------------------------------------------


async def test_a_bulk_requeue_runs_the_failed_tasks_of_a_type_again(
    api: Client, store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    failed = [await finished(store) for _ in range(3)]
    failed.append(await finished(store, task_type="BAZ"))  # as a person may have stored it
    other_type = await finished(store, task_type="bar")
    complete = await finished(store, state="COMPLETE")
    response = await api.post("/tasks/requeue", json={"state": "failed", "type": "Baz"})
    assert response.status == 200, await response.text()
    assert await response.json() == {"requeued": 4, "more": False}
    for task_id in failed:
        task = await store.tasks.get(task_id)
        assert (task.state, task.attempts, task.lease, task.worker) == (
            State.NOTSTARTED,
            0,
            None,
            None,
        )
        assert task.finished_at is None and len(task.errors) == 1  # the history stays

    spawn_worker()

    async def all_ran() -> bool:
        found = await states(store)
        return all(found[task_id] == "COMPLETE" for task_id in failed)

    await eventually(all_ran, within=30, what="the requeued tasks run to COMPLETE")
    for task_id in failed:
        task = await store.tasks.get(task_id)
        assert task.output is not None and task.output.startswith("Baz ")
        assert task.attempts == 1
    found = await states(store)
    assert (found[other_type], found[complete]) == ("FAILED", "COMPLETE")


async def test_a_requeue_takes_complete_tasks_only_when_asked(api: Client, store: Store) -> None:
    failed = await finished(store)
    complete = await finished(store, state="COMPLETE")
    response = await api.post("/tasks/requeue", json={"state": "COMPLETE"})
    assert await response.json() == {"requeued": 1, "more": False}
    assert await states(store) == {failed: "FAILED", complete: "NOTSTARTED"}


async def test_a_bulk_delete_by_tag_leaves_the_started_task_alone(
    api: Client, store: Store
) -> None:
    running = await started(store, tags=["nightly"])
    gone = [
        await finished(store, tags=["nightly", "x"]),
        await finished(store, state="COMPLETE", tags=["nightly"]),
    ]
    waiting = await store.tasks.create(
        task_type="baz", run_at=datetime(2999, 1, 1, tzinfo=UTC), max_attempts=1
    )
    await store.db.tasks.update_one({"_id": waiting.key}, {"$set": {"tags": ["nightly"]}})
    kept = await finished(store, tags=["weekly"])
    untagged = await finished(store)
    response = await api.post("/tasks/delete", json={"tag": "nightly"})
    assert response.status == 200, await response.text()
    assert await response.json() == {"deleted": 3, "more": False}
    left = await states(store)
    assert left == {running: "STARTED", kept: "FAILED", untagged: "FAILED"}
    assert not set(gone) & set(left)


async def test_a_bulk_delete_by_state_and_finish_time(api: Client, store: Store) -> None:
    now = datetime.now(UTC)
    old = await finished(store, finished_at=now - 3 * HOUR)
    recent = await finished(store, finished_at=now - HOUR / 2)
    old_complete = await finished(store, state="COMPLETE", finished_at=now - 3 * HOUR)
    cut = (now - HOUR).isoformat()
    body = {"state": "FAILED", "finished_before": cut}
    assert await (await api.post("/tasks/delete", json=body)).json() == {
        "deleted": 1,
        "more": False,
    }
    assert set(await states(store)) == {recent, old_complete}
    window = {"finished_after": (now - 4 * HOUR).timestamp(), "finished_before": cut}
    assert (await (await api.post("/tasks/delete", json=window)).json())["deleted"] == 1
    assert set(await states(store)) == {recent}
    assert old not in await states(store)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tasks/requeue", {}, "filter"),
        ("/tasks/delete", {}, "filter"),
        ("/tasks/requeue", {"state": "NOTSTARTED"}, "state"),
        ("/tasks/requeue", {"state": "STARTED", "type": "baz"}, "state"),
        ("/tasks/delete", {"state": "started"}, "state"),
        ("/tasks/delete", {"state": "DONE"}, "state"),
        ("/tasks/delete", {"typo": "baz"}, "typo"),
        ("/tasks/delete", {"type": None}, "type"),
        ("/tasks/delete", {"type": ""}, "type"),
        ("/tasks/delete", {"tag": {"$ne": "x"}}, "body"),
        ("/tasks/requeue", {"finished_before": "2026-01-01T00:00:00"}, "finished_before"),
        (
            "/tasks/delete",
            {"finished_after": "2026-01-02T00:00:00Z", "finished_before": "2026-01-01T00:00:00Z"},
            "finished_after",
        ),
    ],
)
async def test_a_filter_a_bulk_action_cannot_take_is_400_and_changes_nothing(
    api: Client, store: Store, path: str, body: dict[str, Any], field: str
) -> None:
    before = {await finished(store): "FAILED", await finished(store, state="COMPLETE"): "COMPLETE"}
    response = await api.post(path, json=body)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"], error
    assert await states(store) == before


async def test_bulk_actions_take_json_and_a_token(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, api_tokens=("s3",))))
    failed = await finished(store)
    for path in ("/tasks/requeue", "/tasks/delete"):
        assert (await client.post(path, json={"type": "baz"})).status == 401
        refused = await client.post(path, data="type=baz", headers={"Authorization": "Bearer s3"})
        assert refused.status == 415
    assert await states(store) == {failed: "FAILED"}
    authorised = {"Authorization": "Bearer s3"}
    response = await client.post("/tasks/requeue", json={"type": "baz"}, headers=authorised)
    assert await response.json() == {"requeued": 1, "more": False}


async def test_the_bulk_routes_are_documented_operations(api: Client) -> None:
    document = await (await api.get("/openapi.json")).json()
    requeue = document["paths"]["/tasks/requeue"]["post"]
    delete = document["paths"]["/tasks/delete"]["post"]
    assert (requeue["operationId"], delete["operationId"]) == ("requeueTasks", "deleteTasks")
    body = requeue["requestBody"]["content"]["application/json"]
    assert body["example"] == {"state": "FAILED", "type": "bar"}
    assert {"200", "400", "401", "503"} <= set(delete["responses"])


async def test_a_call_stops_for_time_and_says_more(
    settings: Settings, store: Store, aiohttp_client: MakeClient, monkeypatch: Any
) -> None:
    monkeypatch.setattr(ops, "BATCH_SIZE", 2)
    monkeypatch.setattr(web_bulk, "BUDGET", 0)  # no time for a second batch
    client = await aiohttp_client(create_app(settings))
    for _ in range(5):
        await finished(store, tags=["x"])
    answers = []
    more = True
    while more:
        body = await (await client.post("/tasks/requeue", json={"tag": "x"})).json()
        answers.append(body)
        more = body["more"]
    assert answers == [
        {"requeued": 2, "more": True},
        {"requeued": 2, "more": True},
        {"requeued": 1, "more": False},
    ]
    assert set((await states(store)).values()) == {"NOTSTARTED"}
    deleted = []
    while True:
        body = await (await client.post("/tasks/delete", json={"tag": "x"})).json()
        deleted.append(body["deleted"])
        if not body["more"]:
            break
    assert deleted == [2, 2, 1]
    assert await states(store) == {}


# -- service.ops and the store ----------------------------------------------------------------


async def test_batches_go_on_while_there_is_time(store: Store) -> None:
    for _ in range(5):
        await finished(store)
    everything_failed = TaskFilter(state=State.FAILED)
    one = await ops.requeue_matching(store, everything_failed, within=0, batch_size=2)
    assert one == ops.Bulk(2, more=True)
    rest = await ops.requeue_matching(store, everything_failed, within=60, batch_size=2)
    assert rest == ops.Bulk(3, more=False)
    # A full last batch cannot know it was the last: the next call finds nothing.
    for _ in range(2):
        await finished(store)
    assert await ops.delete_matching(
        store, TaskFilter(type="baz"), within=0, batch_size=2
    ) == ops.Bulk(2, more=True)
    assert await ops.delete_matching(
        store, TaskFilter(type="baz"), within=0, batch_size=2
    ) == ops.Bulk(2, more=True)


async def test_each_write_checks_the_filter_again(store: Store, monkeypatch: Any) -> None:
    """A task read as matching but claimed (or requeued) before the write is left as it is now."""
    running = await started(store, tags=["x"])
    failed = await finished(store, tags=["x"])
    read = BulkTasks._ids

    async def with_the_running_task(self: BulkTasks, query: dict[str, Any], limit: int) -> Any:
        return [*await read(self, query, limit), ObjectId(running)]

    monkeypatch.setattr(BulkTasks, "_ids", with_the_running_task)
    requeued = await ops.requeue_matching(store, TaskFilter(tag="x"), within=1)
    assert requeued.count == 1
    deleted = await ops.delete_matching(store, TaskFilter(tag="x"), within=1)
    assert deleted.count == 1
    assert await states(store) == {running: "STARTED"}
    assert failed not in await states(store)


async def test_without_the_indexes_a_batch_reads_all_the_same(store: Store) -> None:
    """An ops command may meet a database no API or worker has made the indexes in."""
    failed = await finished(store, tags=["x"])
    await store.db.tasks.drop_indexes()
    assert await ops.requeue_matching(store, TaskFilter(tag="x"), within=1) == ops.Bulk(1, False)
    assert await ops.delete_matching(store, TaskFilter(type="baz"), within=1) == ops.Bulk(1, False)
    assert failed not in await states(store)


async def test_the_store_refuses_states_a_bulk_action_never_takes(store: Store) -> None:
    with pytest.raises(ValueError, match="STARTED"):
        await store.bulk.delete_batch(TaskFilter(tag="x"), states={State.STARTED}, limit=1)
    with pytest.raises(ValueError, match="finished"):
        await store.bulk.requeue_batch(TaskFilter(tag="x"), states={State.NOTSTARTED}, limit=1)


# -- the command line ---------------------------------------------------------------------------


async def task_runner(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, settings_env(settings), *args)


async def test_requeue_and_delete_by_filter_from_the_command_line(
    settings: Settings, store: Store
) -> None:
    baz = [await finished(store), await finished(store, tags=["x"])]
    bar = await finished(store, task_type="bar", tags=["x"])
    result = await task_runner(settings, "requeue", "--state", "failed", "--type", "baz")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "requeued 2 task(s) (state=FAILED type=baz): NOTSTARTED, due now, attempts reset"
    ]
    assert await states(store) == {baz[0]: "NOTSTARTED", baz[1]: "NOTSTARTED", bar: "FAILED"}

    running = await started(store, tags=["x"])
    result = await task_runner(settings, "delete", "--tag", "x")
    assert result.returncode == 0, result.stderr
    assert "deleted 2 task(s) (tag=x); STARTED tasks are left alone" in result.stdout
    assert await states(store) == {baz[0]: "NOTSTARTED", running: "STARTED"}

    # The one-task form is unchanged.
    one = await finished(store)
    result = await task_runner(settings, "requeue", one)
    assert result.returncode == 0, result.stderr
    assert f"{one} requeued" in result.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["delete"], "delete: the filter: give at least one of state, type, tag"),
        (["delete", "--state", "STARTED"], "delete: --state: a bulk delete never takes"),
        (["requeue"], "requeue: give a task id, or filter flags"),
        (["requeue", str(ObjectId()), "--type", "baz"], "give a task id or filter flags, not both"),
        (["requeue", "--state", "notstarted"], "requeue: --state: a requeue takes FAILED"),
        (["requeue", "--state", "DONE"], "argument --state: 'DONE': choose from"),
        (["delete", "--finished-before", "2026-01-01"], "needs a UTC offset"),
        (
            ["delete", "--finished-after", "1767312000", "--finished-before", "2026-01-01T00:00Z"],
            "--finished-after: must be before finished_before",
        ),
    ],
)
async def test_the_command_line_refuses_a_filter_it_cannot_take(
    settings: Settings, store: Store, args: list[str], said: str
) -> None:
    before = {await finished(store): "FAILED"}
    result = await task_runner(settings, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert await states(store) == before


async def test_the_command_goes_on_until_nothing_is_left(
    settings: Settings, store: Store, monkeypatch: Any, capsys: Any
) -> None:
    monkeypatch.setattr(ops, "BATCH_SIZE", 2)
    monkeypatch.setattr(cli_bulk, "ROUND_SECONDS", 0)  # one batch per round
    for _ in range(5):
        await finished(store, tags=["x"])
    flags = {"state": None, "type": None, "finished_before": None, "finished_after": None}
    args = argparse.Namespace(tag="x", **flags)
    assert await cli_bulk.requeue_matching(store, settings, args) == 0
    assert capsys.readouterr().out.splitlines() == [
        "requeued 2 task(s) so far; going on",
        "requeued 4 task(s) so far; going on",
        "requeued 5 task(s) (tag=x): NOTSTARTED, due now, attempts reset",
    ]
    assert await cli_bulk.delete_matching(store, settings, args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "deleted 5 task(s) (tag=x); STARTED tasks are left alone"
    )
    assert await states(store) == {}
