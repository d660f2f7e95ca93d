"""The client's calls of the API for clients at scale, against a real API: POST /tasks/batch
(create_many), PATCH /tasks/{id} (update), tags and GET /tasks?tag=, and the bulk actions
POST /tasks/requeue and POST /tasks/delete (requeue_where, delete_where). Each test first
checks that /openapi.json documents what it calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from service.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    ItemError,
    Retry,
    State,
    Task,
    TaskNotFound,
)
from service.store import Store
from tests.helpers import ApiProcess, WorkerProcess, all_tasks, call_api

FUTURE = datetime(2031, 1, 1, 9, 0, tzinfo=UTC)
QUICK = Retry(attempts=3, backoff=0.01, backoff_max=0.05)


@pytest.fixture
def api_process(store: Store, start_api: Callable[..., ApiProcess]) -> ApiProcess:
    return start_api()


@pytest.fixture
def document(api_process: ApiProcess) -> dict[str, Any]:
    status, body = call_api(f"{api_process.url}/openapi.json")
    assert status == 200
    return dict(body)


def needs(document: dict[str, Any], *operations: str) -> None:
    """The API documents each operation ("post /tasks/batch"), or a query parameter of one
    ("get /tasks?tag"), that the test calls."""
    for wanted in operations:
        method, _, target = wanted.partition(" ")
        path, _, parameter = target.partition("?")
        operation = document["paths"].get(path, {}).get(method)
        names = {p["name"] for p in (operation or {}).get("parameters", [])}
        assert operation is not None, f"the API has no {wanted}"
        assert not parameter or parameter in names, f"the API has no {wanted}"


@pytest.fixture
async def client(api_process: ApiProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(api_process.url, retry=QUICK) as async_client:
        yield async_client


async def test_create_many_creates_the_good_items_and_says_why_not_the_others(
    document: dict[str, Any], client: AsyncClient, store: Store
) -> None:
    needs(document, "post /tasks/batch")
    first, refused, third = await client.create_many(
        [
            {"type": "foo", "run_at": FUTURE, "priority": 2},
            {"type": "qux"},
            {"type": "BAR", "max_attempts": 1},
        ]
    )
    assert isinstance(first, Task) and (first.type, first.priority) == ("foo", 2)
    assert first.run_at == FUTURE and first.state is State.NOTSTARTED
    assert isinstance(refused, ItemError) and refused.index == 1
    assert refused.code == "invalid_request" and "type" in refused.details
    assert isinstance(third, Task) and (third.type, third.max_attempts) == ("bar", 1)
    assert sorted(t.id for t in await all_tasks(store)) == sorted([first.id, third.id])
    assert [t.id async for t in client.list(type="foo")] == [first.id]


async def test_update_changes_a_task_that_has_not_started_only(
    document: dict[str, Any], client: AsyncClient, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    needs(document, "patch /tasks/{id}")
    task = await client.create("foo", run_at=FUTURE)
    later = FUTURE + timedelta(hours=1)
    updated = await client.update(task.id, run_at=later, priority=9, args={})
    assert (updated.id, updated.run_at, updated.priority) == (task.id, later, 9)
    assert (await client.get(task.id)).priority == 9
    with pytest.raises(TaskNotFound):
        await client.update(str(ObjectId()), priority=1)
    with pytest.raises(InvalidRequest) as bad:
        await client.update(task.id, priority=11)
    assert "priority" in bad.value.details
    spawn_worker()
    done = await client.wait((await client.create("foo")).id, timeout=30)
    with pytest.raises(Conflict) as started:
        await client.update(done.id, priority=1)
    assert started.value.status == 409
    assert (await client.get(done.id)).priority == 0


async def test_tags_are_kept_filtered_on_and_updated(
    document: dict[str, Any], client: AsyncClient
) -> None:
    needs(document, "get /tasks?tag", "patch /tasks/{id}")
    nightly = await client.create("foo", run_at=FUTURE, tags=["nightly", "eu"])
    eu = await client.create("foo", run_at=FUTURE + timedelta(minutes=1), tags=["eu"])
    plain = await client.create("bar", run_at=FUTURE + timedelta(minutes=2))
    assert set(nightly.tags) == {"nightly", "eu"} and plain.tags == ()
    assert [t.id async for t in client.list(tag="eu", page_size=1)] == [nightly.id, eu.id]
    assert [t.id async for t in client.list(tag="nightly")] == [nightly.id]
    assert set((await client.update(plain.id, tags=["nightly"])).tags) == {"nightly"}
    assert [t.id async for t in client.list(tag="nightly")] == [nightly.id, plain.id]
    assert [t.id async for t in client.list(tag="nightly", type="bar")] == [plain.id]


async def failed_tasks(client: AsyncClient, store: Store, task_type: str, count: int) -> list[str]:
    """`count` tasks of `task_type`, made FAILED in the database (as a worker leaves them)."""
    ids = [(await client.create(task_type, run_at=FUTURE)).id for _ in range(count)]
    now = datetime.now(UTC)
    await store.db.tasks.update_many(
        {"_id": {"$in": [ObjectId(i) for i in ids]}},
        {"$set": {"state": "FAILED", "attempts": 3, "finished_at": now, "error": "boom"}},
    )
    return ids


async def test_requeue_where_and_delete_where_act_on_every_match(
    document: dict[str, Any], client: AsyncClient, store: Store
) -> None:
    needs(document, "post /tasks/requeue", "post /tasks/delete")
    foos = await failed_tasks(client, store, "foo", 7)
    bars = await failed_tasks(client, store, "bar", 3)
    assert await client.requeue_where(type="foo") == 7
    states = {t.id: t.state for t in await all_tasks(store)}
    assert {states[i] for i in foos} == {State.NOTSTARTED}
    assert {states[i] for i in bars} == {State.FAILED}
    assert await client.requeue_where(type="foo") == 0  # none FAILED any more
    assert await client.delete_where(type="bar") == 3
    assert sorted(t.id for t in await all_tasks(store)) == sorted(foos)
    assert await client.delete_where(state="NOTSTARTED", type="foo") == 7
    assert await all_tasks(store) == []


def test_the_sync_client_batches_and_deletes_by_filter(
    document: dict[str, Any], api_process: ApiProcess
) -> None:
    needs(document, "post /tasks/batch", "post /tasks/delete")
    with Client(api_process.url, retry=QUICK) as client:
        results = client.create_many([{"type": "baz", "run_at": FUTURE}] * 3)
        assert all(isinstance(r, Task) for r in results)
        assert len({r.id for r in results if isinstance(r, Task)}) == 3
        assert client.delete_where(type="baz") == 3
        assert list(client.list()) == []
