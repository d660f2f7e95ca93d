"""The HTTP API: REST routes, the earlier version's routes, pagination, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from service.models import State
from service.store import Store
from tests.helpers import listed_ids

Client = TestClient[Any, Any]


async def create(api: Client, **body: Any) -> dict[str, Any]:
    response = await api.post("/tasks", json=body)
    assert response.status == 201, await response.text()
    data: dict[str, Any] = await response.json()
    return data


async def test_create_answers_201_with_id_and_location(api: Client, store: Store) -> None:
    response = await api.post("/tasks", json={"type": "Foo"})
    assert response.status == 201
    body = await response.json()
    assert response.headers["Location"] == f"/tasks/{body['id']}"
    stored = await store.tasks.get(body["id"])
    assert stored.type == "foo"
    assert stored.state is State.NOTSTARTED
    assert stored.run_at is not None
    assert abs((stored.run_at - store.clock.now()).total_seconds()) < 5


async def test_create_with_iso_and_unix_run_at(api: Client, store: Store) -> None:
    when = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    iso = await create(api, type="bar", run_at="2031-05-06T09:08:09+02:00")
    unix = await create(api, type="baz", run_at=when.timestamp())
    assert iso["run_at"] == unix["run_at"] == "2031-05-06T07:08:09.000Z"
    assert (await store.tasks.get(iso["id"])).run_at == when


async def test_get_shows_the_whole_task(api: Client) -> None:
    created = await create(api, type="baz", max_attempts=5)
    response = await api.get(f"/tasks/{created['id']}")
    assert response.status == 200
    task = await response.json()
    assert task == created
    assert task["max_attempts"] == 5
    assert task["state"] == "NOTSTARTED"
    assert task["created_at"].endswith("Z")


async def test_delete_then_404(api: Client, store: Store) -> None:
    created = await create(api, type="foo")
    assert (await api.delete(f"/tasks/{created['id']}")).status == 204
    assert (await api.get(f"/tasks/{created['id']}")).status == 404
    assert (await api.delete(f"/tasks/{created['id']}")).status == 404
    assert await store.db.tasks.count_documents({}) == 0


async def test_unknown_and_malformed_ids_are_json_404(api: Client) -> None:
    for task_id in ("6b05ceaf9af4ef7f5df5957c", "not-an-id"):
        response = await api.get(f"/tasks/{task_id}")
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "task_not_found"


async def test_list_filters_by_state_and_type(api: Client, store: Store) -> None:
    foo = await create(api, type="foo")
    bar = await create(api, type="bar")
    await store.db.tasks.update_one({"_id": store_id(bar)}, {"$set": {"state": "COMPLETE"}})
    ids = await list_ids(api, "state=COMPLETE")
    assert ids == [bar["id"]]
    assert await list_ids(api, "type=FOO") == [foo["id"]]
    assert await list_ids(api, "state=notstarted&type=foo") == [foo["id"]]
    assert await list_ids(api, "state=COMPLETE&type=foo") == []


async def test_list_paginates_in_run_at_then_id_order(api: Client) -> None:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    expected = []
    for i in range(7):
        # Pairs share a run_at, so the id breaks ties.
        created = await create(api, type="baz", run_at=(base + timedelta(hours=i // 2)).isoformat())
        expected.append(created["id"])
    seen, pages = await listed_ids(api, limit="3")
    assert pages == 3
    assert seen == expected


async def test_list_newest_first_paginates_in_the_reverse_order(api: Client, store: Store) -> None:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    expected = []
    for i in range(7):
        created = await create(api, type="baz", run_at=(base + timedelta(hours=i // 2)).isoformat())
        expected.append(created["id"])
    # Odd run_ats written by hand sort before every date: last, newest first.
    await store.db.tasks.insert_one({"type": "baz", "state": "NOTSTARTED", "run_at": "soon"})
    await store.db.tasks.insert_one({"type": "baz", "state": "NOTSTARTED"})
    seen, _ = await listed_ids(api, limit="2", order="desc")
    assert seen[:7] == list(reversed(expected))
    assert len(seen) == 9 and len(set(seen)) == 9
    assert (await api.get("/tasks?order=newest")).status == 400


async def test_list_rejects_bad_filters(api: Client) -> None:
    for query in (
        "state=RUNNING",
        "type=qux",
        "limit=0",
        "limit=1001",
        "cursor=abc",
        "x=1",
        "state=STARTED&state=COMPLETE",
    ):
        response = await api.get(f"/tasks?{query}")
        assert response.status == 400, query
        assert (await response.json())["error"]["code"] == "invalid_request"


async def test_create_rejects_bad_input_and_stores_nothing(api: Client, store: Store) -> None:
    bad_bodies: list[Any] = [
        {"type": "qux"},
        {},
        {"type": "foo", "run_at": "tomorrow"},
        {"type": "foo", "run_at": "2030-01-01T00:00:00"},
        {"type": "foo", "run_at": -1},
        {"type": "foo", "run_at": 1e13},
        {"type": "foo", "run_at": True},
        {"type": "foo", "extra": 1},
        {"type": {"$ne": "x"}},
        [{"type": "foo"}],
    ]
    for body in bad_bodies:
        response = await api.post("/tasks", json=body)
        assert response.status == 400, body
        assert (await response.json())["error"]["code"] == "invalid_request"
    response = await api.post(
        "/tasks", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    response = await api.post("/tasks", data="type=foo")
    assert response.status == 415
    assert await store.db.tasks.count_documents({}) == 0


async def test_health(api: Client) -> None:
    response = await api.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_unknown_route_and_method_are_json(api: Client) -> None:
    response = await api.get("/nowhere")
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["code"] == "not_found"
    assert error["message"] == "no route GET /nowhere; the routes are listed at /docs"
    response = await api.put("/tasks")
    assert response.status == 405
    assert "GET" in response.headers["Allow"]
    error = (await response.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert error["message"].startswith("PUT is not allowed on /tasks; allowed: "), error


async def test_json_answers_end_with_a_newline_and_openapi_has_the_package_version(
    api: Client,
) -> None:
    from service import version

    for path in ("/health", "/tasks", "/nowhere", "/openapi.json"):
        response = await api.get(path)
        assert (await response.read()).endswith(b"}\n"), path
    document = await (await api.get("/openapi.json")).json()
    assert document["info"]["version"] == version() != "1.0.0"


# -- the earlier version's routes ---------------------------------------------------------


async def test_legacy_post_type_and_unix_seconds(api: Client, store: Store) -> None:
    response = await api.post("/FOO/0")
    assert response.status == 201
    body = await response.json()
    task = await store.tasks.get(body["id"])
    assert task.type == "foo"
    # Unix second 0 is long past: the task is due now.
    assert task.run_at is not None and task.run_at <= store.clock.now()
    future = datetime(2030, 1, 1, tzinfo=UTC)
    body = await (await api.post(f"/baz/{int(future.timestamp())}")).json()
    assert (await store.tasks.get(body["id"])).run_at == future
    for path in ("/QUX/0", "/FOO/soon", "/FOO/-5"):
        response = await api.post(path)
        assert response.status == 400, path
    assert await store.db.tasks.count_documents({}) == 2


async def test_legacy_get_and_delete_by_id(api: Client) -> None:
    created = await (await api.post("/Bar/0")).json()
    response = await api.get(f"/id/{created['id']}")
    assert response.status == 200
    assert (await response.json())["id"] == created["id"]
    assert (await api.delete(f"/id/{created['id']}")).status == 204
    assert (await api.get(f"/id/{created['id']}")).status == 404


async def test_legacy_taskstate_lists_every_task_in_a_state(api: Client, store: Store) -> None:
    created = [await create(api, type="baz") for _ in range(3)]
    await store.db.tasks.update_one({"_id": store_id(created[1])}, {"$set": {"state": "STARTED"}})
    notstarted = await (await api.get("/taskstate/NOTSTARTED")).json()
    assert [t["id"] for t in notstarted] == [created[0]["id"], created[2]["id"]]
    started = await (await api.get("/taskstate/STARTED")).json()
    assert [t["id"] for t in started] == [created[1]["id"]]
    assert await (await api.get("/taskstate/COMPLETE")).json() == []
    response = await api.get("/taskstate/DONE")
    assert response.status == 400


async def test_legacy_delete_all_only_when_enabled(
    api: Client, store: Store, aiohttp_client: Any, settings: Any
) -> None:
    for _ in range(3):
        await create(api, type="foo")
    import dataclasses

    from service.web.app import create_app

    locked = await aiohttp_client(create_app(dataclasses.replace(settings, allow_delete_all=False)))
    response = await locked.delete("/")
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "delete_all_disabled"
    assert await store.db.tasks.count_documents({}) == 3
    response = await api.delete("/")
    assert response.status == 200
    assert await response.json() == {"deleted": 3}
    assert await store.db.tasks.count_documents({}) == 0


def store_id(task: dict[str, Any]) -> Any:
    from bson import ObjectId

    return ObjectId(task["id"])


async def list_ids(api: Client, query: str) -> list[str]:
    response = await api.get(f"/tasks?{query}")
    assert response.status == 200, await response.text()
    return [task["id"] for task in (await response.json())["tasks"]]
