"""POST /tasks/batch: one result per item in order, the valid items stored with one
insert_many (keyed ones on the Idempotency-Key path), a bad item is that item's error, a bad
batch stores nothing, a database failure part-way names the items stored; and the service's
own paths, never a task type's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient

import service.store.base
from service.config import Settings
from service.errors import BatchInterrupted
from service.localdb import free_port
from service.plugins import RESERVED_NAMES, task_type
from service.store import Store, open_client
from service.store.base import NewTask
from service.web.app import create_app
from service.worker.metrics import CommandCounter

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]


async def batch(api: Client, items: Any, *, status: int = 200) -> Any:
    response = await api.post("/tasks/batch", json={"tasks": items})
    assert response.status == status, await response.text()
    return await response.json()


def assert_item_error(result: dict[str, Any], code: str, field: str | None = None) -> None:
    assert set(result) == {"error"}, result
    assert set(result["error"]) == {"code", "message", "details"}
    assert result["error"]["code"] == code, result
    if field is not None:
        assert field in result["error"]["details"], result


async def test_a_thousand_items_with_three_bad_ones_store_the_997_good_ones_in_order(
    settings: Settings, store: Store, aiohttp_client: MakeClient, monkeypatch: Any
) -> None:
    commands = CommandCounter(export=False, collection="tasks")

    def counted(*args: Any, event_listeners: Any = (), **kwargs: Any) -> Any:
        return AsyncMongoClient(*args, event_listeners=[*event_listeners, commands], **kwargs)

    monkeypatch.setattr(service.store.base, "AsyncMongoClient", counted)
    api = await aiohttp_client(create_app(settings))
    items: list[Any] = [
        {"type": ("foo", "BAR", "baz")[i % 3], "priority": i % 5, "tags": [f"item-{i}"]}
        for i in range(1000)
    ]
    bad: dict[int, tuple[dict[str, Any], str]] = {17: ({"type": "qux"}, "type")}
    bad[500] = ({"type": "foo", "run_at": "soon"}, "run_at")
    bad[999] = ({"type": "foo", "urgency": 1}, "urgency")
    for index, (item, _) in bad.items():
        items[index] = item
    commands.reset()
    results = (await batch(api, items))["results"]
    assert commands.counts["insert"] == 1, commands.counts  # one insert_many
    assert len(results) == 1000
    for index, result in enumerate(results):
        if index in bad:
            assert_item_error(result, "invalid_request", bad[index][1])
            continue
        assert result["tags"] == [f"item-{index}"], (index, result)
        assert result["type"] == ("foo", "bar", "baz")[index % 3]
        assert (result["state"], result["priority"]) == ("NOTSTARTED", index % 5)
    stored = {doc["_id"] async for doc in store.db.tasks.find({}, {"_id": 1})}
    assert {str(i) for i in stored} == {r["id"] for r in results if "id" in r}
    assert len(stored) == 997
    # Each as GET /tasks/{id} shows it.
    shown = await api.get(f"/tasks/{results[0]['id']}")
    assert await shown.json() == results[0]


async def test_too_many_none_or_a_body_of_another_shape_is_400_and_stores_nothing(
    api: Client, store: Store
) -> None:
    foo = {"type": "foo"}
    bodies: list[dict[str, Any]] = [
        {"tasks": [foo] * 1001},
        {"tasks": []},
        {"tasks": foo},
        {"tasks": None},
        {"items": [foo]},
        {"tasks": [foo], "extra": 1},
        {},
        {"tasks": [{"type": "$where"}]},  # an operator anywhere: the whole request
    ]
    for body in bodies:
        response = await api.post("/tasks/batch", json=body)
        assert response.status == 400, (body, await response.text())
        error = (await response.json())["error"]
        assert error["code"] == "invalid_request"
        assert error["details"], body
    for raw in ("[]", '"x"', "{bad json"):
        headers = {"Content-Type": "application/json"}
        response = await api.post("/tasks/batch", data=raw, headers=headers)
        assert response.status == 400, raw
    response = await api.post("/tasks/batch", data="tasks=1")
    assert response.status == 415
    assert await store.db.tasks.count_documents({}) == 0
    # 1,000 items is not too many.
    assert len((await batch(api, [foo] * 1000))["results"]) == 1000


async def test_an_item_of_another_shape_is_that_items_error(api: Client, store: Store) -> None:
    results = (await batch(api, [5, {"type": "foo"}, ["foo"], None, "foo"]))["results"]
    for index in (0, 2, 3, 4):
        assert_item_error(results[index], "invalid_request", "_schema")
    assert results[1]["type"] == "foo"
    assert await store.db.tasks.count_documents({}) == 1


async def test_a_batch_body_may_be_larger_than_a_single_create(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    small = dataclasses.replace(settings, max_body_bytes=2048)
    api = await aiohttp_client(create_app(small))
    items = [{"type": "foo", "tags": ["x" * 50, f"{i:050}"]} for i in range(200)]  # ~27 KB
    assert len((await batch(api, items))["results"]) == 200
    assert await store.db.tasks.count_documents({}) == 200
    response = await api.post("/tasks/batch", json={"tasks": items * 2})  # over 16 x 2 KB
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert await store.db.tasks.count_documents({}) == 200


async def test_keyed_items_replay_and_conflict_as_the_header_does(
    api: Client, store: Store
) -> None:
    first = (await batch(api, [{"type": "foo", "idempotency_key": "order-1"}, {"type": "bar"}]))[
        "results"
    ]
    assert first[0]["type"] == "foo" and first[1]["type"] == "bar"
    again = (
        await batch(
            api,
            [
                {"type": "FOO", "idempotency_key": "order-1"},  # the same request: replayed
                {"type": "baz", "idempotency_key": "order-1"},  # another one: a conflict
                {"type": "foo", "idempotency_key": "order-2"},
                {"type": "foo", "idempotency_key": ""},
            ],
        )
    )["results"]
    assert again[0] == first[0]
    assert_item_error(again[1], "idempotency_key_reused", "key")
    assert again[2]["id"] not in (first[0]["id"], first[1]["id"])
    assert_item_error(again[3], "invalid_request", "idempotency_key")
    assert await store.db.tasks.count_documents({}) == 3
    # A keyed item is the same request as POST /tasks with that body and key.
    response = await api.post(
        "/tasks", json={"type": "foo"}, headers={"Idempotency-Key": "order-2"}
    )
    assert response.status == 200 and response.headers["Idempotent-Replayed"] == "true"
    assert (await response.json())["id"] == again[2]["id"]
    # A key whose task was deleted since: that item's 410 error.
    assert (await api.delete(f"/tasks/{again[2]['id']}")).status == 204
    gone = (await batch(api, [{"type": "foo", "idempotency_key": "order-2"}]))["results"]
    assert_item_error(gone[0], "task_deleted", "id")


async def test_a_database_refusing_some_items_is_a_503_naming_those_stored(
    api: Client, store: Store
) -> None:
    # A unique index the test adds: priority 9 is taken, so the database refuses the items
    # asking for it (a BulkWriteError) and stores the others.
    await store.db.tasks.create_index(
        "priority", name="one_at_9", unique=True, partialFilterExpression={"priority": 9}
    )
    await store.tasks.create(task_type="foo", run_at=None, max_attempts=1, priority=9)
    items = [{"type": "foo", "priority": 9 if i in (1, 3) else 0} for i in range(5)]
    items.append({"type": "qux"})  # refused at the edge: its own error, as always
    items.append({"type": "foo", "idempotency_key": "never-tried"})
    response = await api.post("/tasks/batch", json={"tasks": items})
    assert response.status == 503, await response.text()
    assert response.headers["Retry-After"] == "1"
    error = (await response.json())["error"]
    assert error["code"] == "batch_interrupted"
    assert error["details"] == {"stored": [0, 2, 4], "unknown": []}
    assert await store.db.tasks.count_documents({"priority": 0}) == 3
    assert await store.db.idempotency_keys.count_documents({}) == 0


async def test_a_database_that_is_away_is_a_503_saying_nothing_was_stored(
    settings: Settings, aiohttp_client: MakeClient
) -> None:
    away = dataclasses.replace(
        settings, mongodb_url=f"mongodb://127.0.0.1:{free_port()}/", db_timeout=0.3
    )
    api = await aiohttp_client(create_app(away))
    response = await api.post("/tasks/batch", json={"tasks": [{"type": "foo"}] * 3})
    assert response.status == 503, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "batch_interrupted"
    # No server could be selected, so nothing was sent: nothing stored, nothing in doubt.
    assert error["details"] == {"stored": [], "unknown": []}


class LosingProxy:
    """A TCP proxy to the database that passes everything on except the reply to an insert:
    it closes the client's connection instead, so the insert lands and its reply is lost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.lost = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return (
            f"mongodb://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/?directConnection=true"
        )

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        inserting = asyncio.Event()

        async def up() -> None:
            while data := await reader.read(65536):
                if b"\x02insert\x00" in data:  # the command's first element: insert: "tasks"
                    inserting.set()
                up_writer.write(data)
                await up_writer.drain()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if inserting.is_set():  # the insert's reply: lost
                    self.lost += 1
                    return
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.wait(
                [asyncio.create_task(up()), asyncio.create_task(down())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            writer.close()
            up_writer.close()


async def test_an_insert_whose_reply_is_lost_leaves_every_item_in_doubt(
    settings: Settings, store: Store
) -> None:
    assert settings.mongodb_url is not None
    port = int(settings.mongodb_url.rsplit(":", 1)[1].split("/")[0])
    async with LosingProxy(port) as url:
        client = open_client(url, timeout=2.0, appname="tests")
        try:
            cut_off = Store(client, database=settings.database, clock=store.clock)
            new = [
                NewTask(task_type="foo", run_at=None, max_attempts=1, tags=[str(i)]) for i in (0, 1)
            ]
            with pytest.raises(BatchInterrupted) as raised:
                await cut_off.tasks.create_many(new)
        finally:
            await client.close()
    assert (raised.value.stored, raised.value.unknown) == ([], [0, 1])
    # Rightly in doubt: the insert did land.
    assert await store.db.tasks.count_documents({}) == 2


# -- the service's own paths -------------------------------------------------------------------


async def test_new_paths_are_never_read_as_the_earlier_versions_type_route(
    api: Client, store: Store
) -> None:
    # POST /tasks/batch is the batch, not a task of type "tasks" due at "batch".
    assert (await batch(api, [{"type": "foo"}]))["results"][0]["type"] == "foo"
    # A type can never be named like a path of the service's own.
    for name in ("tasks", "schedules", "queues", "events"):
        with pytest.raises(ValueError, match="reserved"):
            task_type(name)
    # Every literal first path segment the API serves is reserved.
    assert api.app is not None
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = str(info.get("path") or info.get("formatter") or info.get("prefix"))
        first = path.strip("/").split("/")[0].split(".")[0]
        if first and not first.startswith("{"):
            assert first in RESERVED_NAMES, path
    # The earlier version's route still creates (and its unknown types are still 400).
    assert (await api.post("/FOO/0")).status == 201
    assert (await api.post("/tasks/0")).status == 400
    assert await store.db.tasks.count_documents({}) == 2
