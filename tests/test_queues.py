"""Queues over the API and in the store: the task's `queue`, settings set and read at run
time, errors, the claim's filter that leaves paused and limited queues out, the token bucket.
Workers under queue settings, as real processes: tests/test_queue_workers.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from service.config import Settings
from service.models import TaskType
from service.store import Store, new_lease
from service.web.app import create_app

Client = TestClient[Any, Any]


async def put(api: Client, name: str, body: Any) -> tuple[int, dict[str, Any]]:
    response = await api.put(f"/queues/{name}", json=body)
    return response.status, await response.json()


# -- the task's queue ------------------------------------------------------------------


async def test_a_task_is_in_the_default_queue_unless_given_one(api: Client, store: Store) -> None:
    plain = await (await api.post("/tasks", json={"type": "foo"})).json()
    mailed = await (await api.post("/tasks", json={"type": "foo", "queue": "mail.v2"})).json()
    assert plain["queue"] == "default" and mailed["queue"] == "mail.v2"
    assert (await store.tasks.get(mailed["id"])).queue == "mail.v2"
    # A document written before queues existed is in the default queue.
    old = await store.db.tasks.insert_one(
        {"type": "foo", "state": "NOTSTARTED", "run_at": store.clock.now(), "max_attempts": 1}
    )
    listed = await (await api.get("/tasks", params={"queue": "default"})).json()
    assert {t["id"] for t in listed["tasks"]} == {plain["id"], str(old.inserted_id)}
    listed = await (await api.get("/tasks", params={"queue": "mail.v2"})).json()
    assert [t["id"] for t in listed["tasks"]] == [mailed["id"]]
    batch = await api.post("/tasks/batch", json={"tasks": [{"type": "baz", "queue": "b"}]})
    assert (await batch.json())["results"][0]["queue"] == "b"
    keyed = await api.post(
        "/tasks", json={"type": "baz", "queue": "k"}, headers={"Idempotency-Key": "one"}
    )
    assert (await keyed.json())["queue"] == "k"


async def test_a_queue_name_outside_the_rule_is_refused(api: Client) -> None:
    for bad in ("", "has space", "x" * 65, "é", 5, None):
        response = await api.post("/tasks", json={"type": "foo", "queue": bad})
        assert response.status == 400, bad
        assert "queue" in (await response.json())["error"]["details"]
    response = await api.get("/tasks", params={"queue": "a/b"})
    assert response.status == 400


async def test_a_dot_segment_is_no_queue_name(api: Client) -> None:
    # "." and ".." are path segments a browser (the dashboard's buttons) and the clients
    # resolve away, even percent-encoded: such a queue could not be paused from them.
    for bad in (".", ".."):
        response = await api.post("/tasks", json={"type": "foo", "queue": bad})
        assert response.status == 400, bad
        assert "queue" in (await response.json())["error"]["details"]
        response = await api.get("/tasks", params={"queue": bad})
        assert response.status == 400, bad
    # (PUT /queues/%2E%2E cannot even be sent from here: aiohttp's client resolves it to /.)
    for fine in ("...", ".a", "a..b"):
        response = await api.post("/tasks", json={"type": "foo", "queue": fine})
        assert response.status == 201, fine


async def test_a_schedule_template_carries_the_queue(api: Client, store: Store) -> None:
    body = {"type": "baz", "every": 60, "queue": "nightly"}
    schedule = await (await api.post("/schedules", json=body)).json()
    assert schedule["queue"] == "nightly"
    stored = await store.schedules.get(schedule["id"])
    assert stored is not None
    task = await store.schedules.create_occurrence(stored, store.clock.now())
    assert task is not None and task.queue == "nightly"


# -- settings over the API ---------------------------------------------------------------


async def test_put_sets_settings_and_get_answers_them_with_counts(api: Client) -> None:
    for _ in range(2):
        await api.post("/tasks", json={"type": "foo", "queue": "mail"})
    status, queue = await put(api, "mail", {"rate": 2.5, "concurrency": 3})
    assert status == 200, queue
    assert queue == {
        "name": "mail",
        "rate": 2.5,
        "burst": 1,
        "concurrency": 3,
        "paused": False,
        "counts": {"NOTSTARTED": 2, "STARTED": 0, "COMPLETE": 0, "FAILED": 0},
    }
    # Only what is given changes; null clears a setting.
    status, queue = await put(api, "mail", {"burst": 4, "concurrency": None})
    assert (queue["rate"], queue["burst"], queue["concurrency"]) == (2.5, 4, None)
    assert await (await api.get("/queues/mail")).json() == queue
    paused = await (await api.post("/queues/mail/pause")).json()
    assert paused["paused"] is True and paused["rate"] == 2.5
    resumed = await (await api.post("/queues/mail/resume")).json()
    assert resumed["paused"] is False
    # The list: queues with settings, and queues with tasks only.
    await api.post("/tasks", json={"type": "foo"})
    await put(api, "empty", {"paused": True})
    listed = await (await api.get("/queues")).json()
    assert [q["name"] for q in listed["queues"]] == ["default", "empty", "mail"]
    default = listed["queues"][0]
    assert default["rate"] is None and default["counts"]["NOTSTARTED"] == 1


async def test_bad_settings_are_refused_with_the_error_shape(api: Client) -> None:
    bodies: list[Any] = [
        {},
        {"rate": 0},
        {"rate": -1},
        {"rate": "fast"},
        {"burst": 0},
        {"burst": 1.5},
        {"concurrency": 0},
        {"concurrency": True},
        {"paused": "yes"},
        {"paused": None},
        {"rate": 1, "speed": 2},
        [],
    ]
    for body in bodies:
        status, answer = await put(api, "mail", body)
        assert status == 400, body
        assert set(answer["error"]) == {"code", "message", "details"}, answer
        assert answer["error"]["code"] == "invalid_request"
    status, answer = await put(api, "no%20space", {"rate": 1})
    assert status == 400 and "name" in answer["error"]["details"]
    # Nothing was stored by the refusals.
    assert (await api.get("/queues/mail")).status == 404


async def test_settings_take_json_numbers_and_booleans_only(api: Client) -> None:
    # Not a number as a string, nor 1 or 0 as a boolean (1 == True in Python).
    for body in ({"rate": "5"}, {"rate": "1e3"}, {"paused": 1}, {"paused": 0}, {"paused": 1.0}):
        status, answer = await put(api, "mail", body)
        assert status == 400, (body, answer)
        assert list(answer["error"]["details"]) == list(body), answer
    assert (await api.get("/queues/mail")).status == 404


async def test_an_unknown_queue_is_404(api: Client) -> None:
    response = await api.get("/queues/nothing")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "queue_not_found"
    assert (await api.get("/queues")).status == 200


async def test_queue_writes_need_the_token(
    settings: Settings,
    store: Store,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, api_tokens=("s3",))))
    assert (await client.put("/queues/q", json={"rate": 1})).status == 401
    assert (await client.post("/queues/q/pause")).status == 401
    assert (await client.post("/queues/q/resume")).status == 401
    auth = {"Authorization": "Bearer s3"}
    assert (await client.post("/queues/q/pause", headers=auth)).status == 200
    assert (await client.get("/queues/q")).status == 200
    assert (await client.delete("/queues/q")).status == 401
    assert (await store.queues.get("q")) is not None  # the refused delete changed nothing
    assert (await client.delete("/queues/q", headers=auth)).status == 204


async def test_deleting_a_queues_settings_keeps_its_tasks(api: Client, store: Store) -> None:
    await put(api, "mail", {"rate": 2, "concurrency": 1, "paused": True})
    await api.post("/tasks", json={"type": "foo", "queue": "mail"})
    # A slots document no task holds goes with the settings; one with a holder stays.
    await store.slots.take("queue:mail", limit=1, lease=new_lease(), worker_id="w")
    held = await store.slots.holders("queue:mail")
    response = await api.delete("/queues/mail")
    assert response.status == 204 and await response.read() == b""
    assert await store.queues.get("mail") is None
    assert await store.slots.holders("queue:mail") == held
    # The queue is still there with its task, without settings.
    queue = await (await api.get("/queues/mail")).json()
    assert (queue["rate"], queue["concurrency"], queue["paused"]) == (None, None, False)
    assert queue["counts"]["NOTSTARTED"] == 1
    # No settings left: 404 with the error shape, as GET /queues/{name}.
    response = await api.delete("/queues/mail")
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["code"] == "queue_not_found" and error["details"] == {"name": "mail"}
    assert set(error) == {"code", "message", "details"}
    assert (await api.delete("/queues/nothing")).status == 404
    assert (await api.delete("/queues/no%20space")).status == 400
    # Without holders, the slots document goes too.
    await put(api, "idle", {"concurrency": 2})
    lease = new_lease()
    await store.slots.take("queue:idle", limit=2, lease=lease, worker_id="w")
    await store.slots.free("queue:idle", lease)
    assert (await api.delete("/queues/idle")).status == 204
    assert await store.db.limits.find_one({"_id": "queue:idle"}) is None
    # The other queues' settings are untouched.
    await put(api, "kept", {"rate": 1})
    await put(api, "gone", {"rate": 1})
    assert (await api.delete("/queues/gone")).status == 204
    assert [q.name for q in await store.queues.all()] == ["kept"]


# -- the claim's filter and the token bucket ---------------------------------------------


async def test_the_claim_leaves_out_excluded_queues_and_a_queue_claim_takes_only_its_own(
    store: Store,
) -> None:
    old = await store.db.tasks.insert_one(
        {"type": "foo", "state": "NOTSTARTED", "run_at": store.clock.now(), "max_attempts": 1}
    )
    mail = await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=1, queue="m")
    await asyncio.sleep(0.01)
    claim = store.claims.claim
    # The default queue left out: a document without `queue` too.
    assert await claim("w", lease=new_lease(), exclude=["default", "m"]) is None
    got = await claim("w", lease=new_lease(), exclude=["default"])
    assert got is not None and got.id == mail.id
    got = await claim("w", lease=new_lease(), queue="default", exclude=["default"])
    assert got is not None and got.id == str(old.inserted_id)


async def test_the_bucket_gives_burst_then_rate_and_a_paused_queue_none(store: Store) -> None:
    await store.queues.put("q", {"rate": 4.0, "burst": 2})
    takes = [await store.queues.take("q") for _ in range(3)]
    assert [took and took[0] for took in takes] == [True, True, False], takes
    assert takes[0] is not None and takes[0][1] == 0.0  # a token left
    empty = takes[2]
    assert empty is not None and 0 < empty[1] <= 0.25, takes
    await asyncio.sleep(empty[1] + 0.05)
    took = await store.queues.take("q")
    assert took is not None and took[0] and took[1] > 0.15, took
    # A token given back is there for the next take, up to the burst.
    await store.queues.give_back("q")
    took = await store.queues.take("q")
    assert took is not None and took[0]
    await store.queues.put("q", {"paused": True})
    assert await store.queues.take("q") is None
    await store.queues.put("q", {"paused": False, "rate": None})
    assert await store.queues.take("q") is None
    assert await store.queues.take("never-set") is None


async def test_concurrent_takers_never_take_more_than_the_bucket_holds(store: Store) -> None:
    await store.queues.put("q", {"rate": 0.01, "burst": 3})
    takes = await asyncio.gather(*(store.queues.take("q") for _ in range(20)))
    assert sum(1 for took in takes if took and took[0]) == 3, takes


async def test_counts_and_settings_read_any_stored_shape(store: Store) -> None:
    await store.db.queues.insert_many(
        [
            {"_id": "odd", "rate": "fast", "burst": -2, "concurrency": 1.5, "paused": "yes"},
            {"_id": "fine", "rate": 2, "burst": 3, "concurrency": 4, "paused": True},
            {"_id": 5, "rate": 1},
        ]
    )
    await store.db.tasks.insert_one({"type": "foo", "state": 7, "queue": ["x"]})
    odd, fine = sorted(await store.queues.all(), key=lambda q: q.name != "odd")
    assert (odd.rate, odd.burst, odd.concurrency, odd.paused) == (None, 1, None, False)
    assert (fine.rate, fine.burst, fine.concurrency, fine.paused) == (2.0, 3, 4, True)
    counts = await store.queues.counts()
    assert counts == {"['x']": {"7": 1}}, counts


async def test_a_bucket_of_another_shape_is_taken_from_as_a_new_one(store: Store) -> None:
    await store.db.queues.insert_one(
        {"_id": "odd", "rate": 2, "burst": "x", "tokens": "y", "refilled_ms": [1]}
    )
    took = await store.queues.take("odd")
    assert took is not None and took[0], took  # a full bucket of the default burst, 1
    took = await store.queues.take("odd")
    assert took is not None and not took[0] and 0 < took[1] <= 0.5, took
    await store.queues.give_back("odd")
    took = await store.queues.take("odd")
    assert took is not None and took[0], took


async def test_a_burst_of_another_shape_holds_one_token_as_the_api_says(store: Store) -> None:
    # An infinite or fractional burst (written by hand) reads as no burst (1) on the API;
    # the bucket must hold 1 too, not fill without bound over a quiet spell.
    for name, burst in (("inf", float("inf")), ("half", 2.5), ("nan", float("nan"))):
        await store.db.queues.insert_one(
            {"_id": name, "rate": 1000.0, "burst": burst, "tokens": 0.0, "refilled_ms": 0}
        )
        settings = await store.queues.get(name)
        assert settings is not None and settings.burst == 1
        took = [await store.queues.take(name) for _ in range(3)]
        assert [t[0] for t in took if t is not None][:1] == [True], (name, took)
        doc = await store.db.queues.find_one({"_id": name})
        assert doc is not None and doc["tokens"] <= 1, (name, doc)
