"""Idempotency-Key on POST /tasks and the earlier version's create route: one task per key
and request, even across API processes at the same moment; 409 for another request; keys
expire; a create interrupted between its two writes is completed by the retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId

from service.config import Settings
from service.models import TaskType
from service.store import Store
from service.store.base import new_task_document
from service.store.idempotency import IdempotentCreate, request_hash
from service.web.app import create_app
from tests.helpers import ApiProcess

Client = TestClient[Any, Any]
BODY = {"type": "foo", "run_at": "2030-01-01T00:00:00Z", "priority": 3}


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def test_the_same_key_and_request_give_the_first_task(api: Client, store: Store) -> None:
    first = await api.post("/tasks", json=BODY, headers=keyed("order-1"))
    assert first.status == 201, await first.text()
    assert "Idempotent-Replayed" not in first.headers
    created = await first.json()
    again = await api.post("/tasks", json=BODY, headers=keyed("order-1"))
    assert again.status == 200, await again.text()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == created["id"]
    # The same request written otherwise (another letter case, Unix seconds) is the same.
    same = {"type": "FOO", "run_at": 1893456000, "priority": 3}
    third = await api.post("/tasks", json=same, headers=keyed("order-1"))
    assert third.status == 200 and (await third.json())["id"] == created["id"]
    assert await store.db.tasks.count_documents({}) == 1
    # Without a key, or with another, each request is a task of its own.
    assert (await api.post("/tasks", json=BODY)).status == 201
    assert (await api.post("/tasks", json=BODY, headers=keyed("order-2"))).status == 201
    assert await store.db.tasks.count_documents({}) == 3


async def test_the_same_key_with_another_request_is_a_conflict(api: Client, store: Store) -> None:
    assert (await api.post("/tasks", json=BODY, headers=keyed("k"))).status == 201
    for other in (
        {**BODY, "priority": 4},
        {**BODY, "type": "baz"},
        {**BODY, "run_at": "2030-01-01T00:00:01Z"},
        {**BODY, "max_attempts": 7},
    ):
        response = await api.post("/tasks", json=other, headers=keyed("k"))
        assert response.status == 409, other
        body = await response.json()
        assert body["error"]["code"] == "idempotency_key_reused"
        assert body["error"]["details"] == {"key": "k"}
    # The earlier version's route is another request too.
    response = await api.post("/FOO/1893456000", headers=keyed("k"))
    assert response.status == 409
    assert await store.db.tasks.count_documents({}) == 1


async def test_the_earlier_versions_route_takes_the_key(api: Client, store: Store) -> None:
    first = await api.post("/FOO/0", headers=keyed("legacy"))
    assert first.status == 201
    again = await api.post("/foo/0", headers=keyed("legacy"))
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == (await first.json())["id"]
    assert await store.db.tasks.count_documents({}) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_a_malformed_key_is_refused(api: Client, store: Store, key: str) -> None:
    response = await api.post("/tasks", json=BODY, headers=keyed(key))
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "invalid_request"
    assert "Idempotency-Key" in body["error"]["details"]
    assert await store.db.tasks.count_documents({}) == 0


async def test_a_key_expires_after_the_setting(
    settings: Settings,
    store: Store,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    ttl = 0.5
    api = await aiohttp_client(create_app(dataclasses.replace(settings, idempotency_ttl=ttl)))
    first = await (await api.post("/tasks", json=BODY, headers=keyed("brief"))).json()
    began = time.monotonic()
    replay = await api.post("/tasks", json=BODY, headers=keyed("brief"))
    assert replay.status == 200 and time.monotonic() - began < ttl
    await asyncio.sleep(ttl)  # the key's lifetime is what is tested: let it pass
    # Expired: the key creates again (with another body too), whether or not the server's
    # TTL monitor has deleted the record yet.
    second = await api.post("/tasks", json={**BODY, "priority": 9}, headers=keyed("brief"))
    assert second.status == 201, await second.text()
    assert (await second.json())["id"] != first["id"]
    third = await api.post("/tasks", json={**BODY, "priority": 9}, headers=keyed("brief"))
    assert third.status == 200
    assert (await third.json())["id"] == (await second.json())["id"]
    assert await store.db.tasks.count_documents({}) == 2
    assert await store.db.idempotency_keys.count_documents({}) == 1
    indexes = await store.db.idempotency_keys.index_information()
    assert indexes["expired"]["expireAfterSeconds"] == 0


async def _interrupted_create(store: Store, key: str) -> IdempotentCreate:
    """What a process that stopped between its two writes leaves: the key's record, written
    as create_once writes it, and no task. For POST /tasks {"type": "foo"}."""
    once = IdempotentCreate(key=key, route="/tasks", ttl=3600)
    fields: dict[str, Any] = {
        "task_type": "foo",
        "run_at": None,
        "max_attempts": Settings().max_attempts,
        "args": None,
        "priority": 0,
        "time_limit": None,
    }
    now = store.clock.now()
    await store.db.idempotency_keys.insert_one(
        {
            "_id": key,
            "request": request_hash(once.route, fields),
            "task": new_task_document(store.clock, once.task_id, **fields),
            "created_at": now,
            "expires_at": now + timedelta(seconds=once.ttl),
        }
    )
    return once


async def test_a_create_interrupted_between_its_writes_is_completed_by_the_retry(
    api: Client, store: Store
) -> None:
    once = await _interrupted_create(store, "crashed")
    assert await store.db.tasks.count_documents({}) == 0
    response = await api.post("/tasks", json={"type": "foo"}, headers=keyed("crashed"))
    assert response.status == 200, await response.text()
    assert response.headers["Idempotent-Replayed"] == "true"
    assert (await response.json())["id"] == str(once.task_id)
    assert await store.db.tasks.count_documents({}) == 1
    record = await store.db.idempotency_keys.find_one({"_id": "crashed"})
    assert record is not None and record["inserted"] is True
    # The retry of the retry: the same task, still one document.
    response = await api.post("/tasks", json={"type": "foo"}, headers=keyed("crashed"))
    assert (await response.json())["id"] == str(once.task_id)
    assert await store.db.tasks.count_documents({}) == 1


async def test_a_first_request_slower_than_its_retry_still_makes_one_task(
    store: Store,
) -> None:
    # The first request wrote its record and paused; the retry inserts the record's task;
    # then the first goes on to insert the same document: one task, the same for both.
    once = await _interrupted_create(store, "slow")
    retry = IdempotentCreate(key="slow", route="/tasks", ttl=3600)
    replayed = await store.keys.create_once(
        retry,
        task_type="foo",
        run_at=None,
        max_attempts=Settings().max_attempts,
        priority=0,
    )
    assert retry.replayed(replayed) and replayed.id == str(once.task_id)
    record = await store.db.idempotency_keys.find_one({"_id": "slow"})
    assert record is not None
    first = await store.keys._insert_keyed("slow", record["task"])
    assert first.id == replayed.id
    assert await store.db.tasks.count_documents({}) == 1


async def test_a_key_whose_task_was_deleted_does_not_create_it_again(
    api: Client, store: Store
) -> None:
    created = await (await api.post("/tasks", json=BODY, headers=keyed("gone"))).json()
    assert (await api.delete(f"/tasks/{created['id']}")).status == 204
    response = await api.post("/tasks", json=BODY, headers=keyed("gone"))
    assert response.status == 410
    body = await response.json()
    assert body["error"]["code"] == "task_deleted"
    assert body["error"]["details"] == {"id": created["id"], "key": "gone"}
    assert await store.db.tasks.count_documents({}) == 0


# -- two real `task-runner api` processes ------------------------------------------------


@pytest.fixture
def two_apis(store: Store, start_api: Callable[..., ApiProcess]) -> list[ApiProcess]:
    servers = [start_api(ready=False) for _ in range(2)]
    for server in servers:
        server.wait_ready()
    return servers


async def test_two_api_processes_racing_one_key_make_one_task(
    two_apis: list[ApiProcess], store: Store
) -> None:
    keys, per_key = [f"race-{n}" for n in range(4)], 16
    async with aiohttp.ClientSession() as http:

        async def post(n: int, key: str) -> tuple[int, str, str]:
            url = two_apis[n % 2].url
            async with http.post(f"{url}/tasks", json=BODY, headers=keyed(key)) as response:
                body = await response.json()
                assert response.status in (200, 201), body
                return response.status, key, body["id"]

        answers = await asyncio.gather(*(post(n, key) for n in range(per_key) for key in keys))
    for key in keys:
        mine = [(status, task_id) for status, k, task_id in answers if k == key]
        assert len({task_id for _, task_id in mine}) == 1, mine
        assert Counter(status for status, _ in mine) == {201: 1, 200: per_key - 1}, mine
    assert await store.db.tasks.count_documents({}) == len(keys)
    ids = {ObjectId(task_id) for _, _, task_id in answers}
    assert await store.db.tasks.count_documents({"_id": {"$in": list(ids)}}) == len(keys)
    assert await store.db.idempotency_keys.count_documents({}) == len(keys)
    assert await store.db.tasks.count_documents({"type": TaskType.FOO.value}) == len(keys)
