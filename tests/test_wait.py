"""GET /tasks/{id}?wait=SECONDS: an answer as soon as the task is COMPLETE or FAILED, from one
watch per API process (a change stream, or one poll for every waited task where there is none),
with real worker processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId
from hypothesis import given
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from pymongo import AsyncMongoClient, MongoClient

import service.store.base
from service.config import Settings
from service.models import Task
from service.store import Store
from service.web.app import create_app
from service.web.feed import TaskFeed
from service.web.keys import OPENAPI, STORE, TASK_FEED
from service.worker.metrics import CommandCounter
from tests.helpers import LiveApi, StubHttpServer, WorkerProcess, eventually, wait_until_started
from tests.test_api_fuzz import DIGITS_TEXT, FUZZ, resolve
from tests.test_ui import failed_task

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]
MODES = pytest.mark.parametrize("change_streams", [True, False], ids=["change-stream", "polling"])
LATER = "2999-01-01T00:00:00Z"


async def timed_get(client: Client, path: str) -> tuple[int, dict[str, Any], float]:
    """Status, JSON body and seconds taken."""
    started = time.monotonic()
    response = await client.get(path)
    body = await response.json()
    return response.status, body, time.monotonic() - started


async def create(client: Client, **body: Any) -> str:
    response = await client.post("/tasks", json=body)
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def waiting_task(store: Store) -> str:
    """A NOTSTARTED task due far in the future: nothing will change it."""
    now = datetime.now(UTC)
    doc = {
        "_id": ObjectId(),
        "type": "foo",
        "state": "NOTSTARTED",
        "run_at": now + timedelta(days=365),
        "created_at": now,
        "attempts": 0,
        "max_attempts": 3,
    }
    await store.db.tasks.insert_one(doc)
    return str(doc["_id"])


@pytest.fixture
def modes(settings: Settings, aiohttp_client: MakeClient) -> Callable[[bool], Awaitable[Client]]:
    """An API client whose feed uses a change stream or polls."""

    async def make(change_streams: bool, **overrides: Any) -> Client:
        return await aiohttp_client(
            create_app(dataclasses.replace(settings, change_streams=change_streams, **overrides))
        )

    return make


def feed_of(client: Client) -> TaskFeed:
    assert client.app is not None
    feed: TaskFeed = client.app[TASK_FEED]
    return feed


# -- with a real worker ----------------------------------------------------------------------


@MODES
async def test_a_wait_answers_as_soon_as_the_task_completes_or_fails(
    modes: Callable[..., Awaitable[Client]],
    store: Store,
    spawn_worker: Callable[..., WorkerProcess],
    http_stub: StubHttpServer,
    change_streams: bool,
) -> None:
    http_stub.drop_first = 1_000  # every Bar fails: the connection closes unanswered
    worker = spawn_worker(foo_seconds=1.0, bar_url=http_stub.url)
    await wait_until_started(worker)
    client = await modes(change_streams)
    foo = await create(client, type="foo")
    bar = await create(client, type="bar", max_attempts=1)
    (status, done, seconds), (bar_status, failed, bar_seconds) = await asyncio.gather(
        timed_get(client, f"/tasks/{foo}?wait=10"), timed_get(client, f"/tasks/{bar}?wait=10")
    )
    assert status == 200, done
    assert (done["state"], done["output"]) == ("COMPLETE", f"Foo {foo}")
    # It waited for the run (a Foo sleeps a second) and answered soon after it ended.
    assert 0.9 < seconds < 4, seconds
    assert f"Foo {foo}" in worker.stdout_lines()
    assert bar_status == 200, failed
    assert failed["state"] == "FAILED" and failed["error"], failed
    assert bar_seconds < 4, bar_seconds
    # The earlier version's route waits the same way; a finished task answers at once.
    status, again, seconds = await timed_get(client, f"/id/{foo}?wait=10")
    assert (status, again["state"], again["output"]) == (200, "COMPLETE", f"Foo {foo}")
    assert seconds < 0.5
    assert feed_of(client).waiters == 0


async def test_a_failed_task_answers_at_once(api: Client, store: Store) -> None:
    task_id = await failed_task(store)
    status, body, seconds = await timed_get(api, f"/tasks/{task_id}?wait=10")
    assert (status, body["state"], body["error"]) == (200, "FAILED", "HTTP 418")
    assert seconds < 0.5, seconds


# -- the end of a wait -----------------------------------------------------------------------


@MODES
async def test_a_wait_that_times_out_answers_the_current_state(
    modes: Callable[..., Awaitable[Client]], store: Store, change_streams: bool
) -> None:
    client = await modes(change_streams)
    task_id = await create(client, type="foo", run_at=LATER)
    status, body, seconds = await timed_get(client, f"/tasks/{task_id}?wait=1.5")
    assert (status, body["id"], body["state"]) == (200, task_id, "NOTSTARTED")
    assert 1.5 <= seconds < 2.5, seconds
    # "Current": what the task is at the end of the wait, not what it was at its start.
    waiting = asyncio.create_task(timed_get(client, f"/tasks/{task_id}?wait=1"))
    await eventually(lambda: feed_of(client).waiters == 1, within=5, what="one waiter")
    await store.db.tasks.update_one({"_id": ObjectId(task_id)}, {"$set": {"worker": "someone"}})
    status, body, seconds = await waiting
    assert (status, body["state"], body["worker"]) == (200, "NOTSTARTED", "someone")


@MODES
async def test_a_task_deleted_during_the_wait_is_404(
    modes: Callable[..., Awaitable[Client]], store: Store, change_streams: bool
) -> None:
    client = await modes(change_streams)
    task_id = await create(client, type="foo", run_at=LATER)
    waiting = asyncio.create_task(client.get(f"/tasks/{task_id}?wait=20"))
    await eventually(lambda: feed_of(client).waiters == 1, within=5, what="one waiter")
    started = time.monotonic()
    assert (await client.delete(f"/tasks/{task_id}")).status == 204
    response = await waiting
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "task_not_found"
    assert time.monotonic() - started < 2
    missing = await client.get(f"/tasks/{ObjectId()}?wait=20")  # at once, opening nothing
    assert missing.status == 404


async def test_a_wait_ends_before_the_request_timeout(
    modes: Callable[..., Awaitable[Client]], store: Store
) -> None:
    client = await modes(True, request_timeout=2.0)
    task_id = await waiting_task(store)
    status, body, seconds = await timed_get(client, f"/tasks/{task_id}?wait=60")
    assert (status, body["state"]) == (200, "NOTSTARTED"), body
    assert 1.4 < seconds < 2.0, seconds  # cut to the timeout minus a quarter of it


async def test_a_client_that_leaves_leaves_nothing_behind(api: Client, store: Store) -> None:
    feed = feed_of(api)
    feed.linger = 0.0
    task_id = await waiting_task(store)
    leaving = asyncio.create_task(api.get(f"/tasks/{task_id}?wait=30"))
    await eventually(
        lambda: feed.waiters == 1 and feed.watching, within=5, what="one waiter, the watch open"
    )
    leaving.cancel()
    started = time.monotonic()
    await eventually(lambda: feed.waiters == 0, within=5, what="no waiter")
    assert time.monotonic() - started < 2  # noticed within a check, not at the wait's end
    await eventually(lambda: not feed.watching, within=5, what="the watch closed too")
    assert not any(t.get_name().startswith("task-feed") for t in asyncio.all_tasks())


async def test_shutdown_ends_every_wait(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(settings))
    task_id = await waiting_task(store)
    waiting = asyncio.create_task(timed_get(client, f"/tasks/{task_id}?wait=30"))
    await eventually(lambda: feed_of(client).waiters == 1, within=5, what="one waiter")
    started = time.monotonic()
    await client.server.close()  # on_shutdown closes the feed, then the handlers finish
    assert time.monotonic() - started < 5
    status, body, _ = await waiting
    assert (status, body["state"]) == (200, "NOTSTARTED")
    assert not feed_of(client).watching


# -- race-free: a change between the read and the watch ---------------------------------------


# Polling with the watch already open needs no case of its own: each poll reads the current
# state, and the tests above see a completion within one.
@pytest.mark.parametrize(
    ("change_streams", "already_watching"),
    [(True, True), (True, False), (False, False)],
    ids=["change-stream-open", "change-stream-opening", "polling-opening"],
)
async def test_a_completion_just_after_the_first_read_is_not_missed(
    store: Store, change_streams: bool, already_watching: bool, monkeypatch: Any
) -> None:
    # No poll comes within the test: only the stream, or the read when the watch opens.
    feed = TaskFeed(
        watch=store.watch,
        tasks=store.tasks,
        change_streams=change_streams,
        wait_poll_interval=30.0,
    )
    task_id = await waiting_task(store)
    if already_watching:
        with feed.subscribe() as queue:
            assert await asyncio.wait_for(queue.get(), 10) == {"op": "open"}
    real_get = store.tasks.get

    async def read_then_complete(wanted: str) -> Task:
        task = await real_get(wanted)  # NOTSTARTED
        await store.db.tasks.update_one(
            {"_id": ObjectId(task_id)}, {"$set": {"state": "COMPLETE", "output": "done"}}
        )
        monkeypatch.setattr(store.tasks, "get", real_get)
        return task

    monkeypatch.setattr(store.tasks, "get", read_then_complete)
    try:
        started = time.monotonic()
        task = await feed.wait_for(task_id, within=20)
        # Seen by the stream, or by the read that follows the watcher's opening: never by the
        # 30-second poll or the end of the wait.
        assert (task.state, task.output) == ("COMPLETE", "done")
        assert time.monotonic() - started < 5
    finally:
        await feed.close()


async def test_polling_reads_a_new_waiters_task_within_the_wait_interval(
    store: Store,
) -> None:
    # The watch already polls (for the dashboard, every 30 s here): a waiter who joins does not
    # wait for that poll, but for one read within `wait_poll_interval`.
    feed = TaskFeed(
        watch=store.watch,
        tasks=store.tasks,
        change_streams=False,
        poll_interval=30.0,
        wait_poll_interval=0.3,
    )
    task_id = await waiting_task(store)
    try:
        with feed.subscribe() as queue:
            assert await asyncio.wait_for(queue.get(), 10) == {"op": "open"}
        waiting = asyncio.create_task(feed.wait_for(task_id, within=20))
        await eventually(lambda: feed.waiters == 1, within=5, what="one waiter")
        await store.db.tasks.update_one({"_id": ObjectId(task_id)}, {"$set": {"state": "FAILED"}})
        started = time.monotonic()
        assert (await waiting).state == "FAILED"
        assert time.monotonic() - started < 1.5
    finally:
        await feed.close()


# -- the cost: one watch for every waiter ------------------------------------------------------


@MODES
async def test_many_waiters_cost_a_bounded_number_of_commands(
    modes: Callable[..., Awaitable[Client]],
    store: Store,
    change_streams: bool,
    monkeypatch: Any,
) -> None:
    commands = CommandCounter(export=False)  # every command the app's client sends

    def counted(*args: Any, event_listeners: Any = (), **kwargs: Any) -> Any:
        # Beside the listeners the app itself passes, if any.
        return AsyncMongoClient(*args, event_listeners=[*event_listeners, commands], **kwargs)

    monkeypatch.setattr(service.store.base, "AsyncMongoClient", counted)
    client = await modes(change_streams)
    feed = feed_of(client)
    wait = 3.0
    costs = {}
    for waiters in (5, 50):
        ids = [await waiting_task(store) for _ in range(waiters)]
        commands.reset()
        started = time.monotonic()
        answers = await asyncio.gather(*(timed_get(client, f"/tasks/{i}?wait={wait}") for i in ids))
        elapsed = time.monotonic() - started
        assert all(status == 200 and body["state"] == "NOTSTARTED" for status, body, _ in answers)
        assert all(wait <= seconds < wait + 1.5 for _, _, seconds in answers)
        # Each request reads its task when it starts; everything else is shared: the reads
        # at the ends of the waits (made together), and the one watch: a getMore a second,
        # or one read of every waited task per poll interval (0.5 s), plus opening it.
        shared = commands.total - waiters
        costs[waiters] = (commands.total, shared, sorted(commands.counts))
        bound = elapsed / min(feed.max_await, feed.wait_poll_interval) + 12
        assert 0 <= shared <= bound, (waiters, commands.counts)
    print(f"\n{'change stream' if change_streams else 'polling'}: {costs}")
    # What one poll per waiter and interval would cost: 50 waiters for 3 s at 0.5 s = 300 reads.
    assert costs[50][0] < 50 * wait / feed.wait_poll_interval / 2
    assert costs[50][1] <= costs[5][1] + 4  # the shared part does not grow with the waiters


# -- the parameter ----------------------------------------------------------------------------


async def test_bad_wait_values_are_400(api: Client, store: Store) -> None:
    task_id = await failed_task(store)
    for value in (
        "0",
        "0.0",
        "-1",
        "60.5",
        "61",
        "1e1",
        ".5",
        "1.",
        " 5",
        "5 ",
        "abc",
        "",
        "nan",
        "inf",
        "\u0661",  # ARABIC-INDIC DIGIT ONE
        "1_0",
        "1.2.3",
        "9" * 400,
        "0x10",
    ):
        response = await api.get(f"/tasks/{task_id}", params={"wait": value})
        assert response.status == 400, value
        body = await response.json()
        assert body["error"]["code"] == "invalid_request" and "wait" in body["error"]["details"]
    for query in ("wait=1&wait=2", "wiat=1", "wait[$gt]=1"):
        assert (await api.get(f"/tasks/{task_id}?{query}")).status == 400, query
    for value in ("60", "60.0", "0.5", "10", "007"):
        response = await api.get(f"/tasks/{task_id}", params={"wait": value})
        assert response.status == 200, value


async def test_the_wait_parameter_is_documented(api: Client) -> None:
    document = await (await api.get("/openapi.json")).json()
    for path in ("/tasks/{id}", "/id/{id}"):
        operation = document["paths"][path]["get"]
        [wait] = [p for p in operation["parameters"] if p["name"] == "wait"]
        assert wait["in"] == "query" and not wait.get("required", False)
        schema = wait["schema"]
        assert (schema["type"], schema["minimum"], schema["maximum"]) == ("number", 0, 60)
        assert schema["exclusiveMinimum"] is True
        assert "TASK_RUNNER_REQUEST_TIMEOUT" in wait["description"]
        assert {"200", "400", "404"} <= set(operation["responses"])


WAIT_VALUE = DIGITS_TEXT | st.sampled_from(["0", "0.1", "1", "60", "60.0", "60.01", "61"])
SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


@pytest.fixture
def live_wait(settings: Settings) -> Iterator[tuple[LiveApi, str]]:
    """A live API and a COMPLETE task (so that valid waits answer at once)."""
    with LiveApi(settings) as api:
        client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_url)
        task_id = ObjectId()
        now = datetime.now(UTC)
        client[settings.database]["tasks"].insert_one(
            {
                "_id": task_id,
                "type": "foo",
                "state": "COMPLETE",
                "run_at": now,
                "created_at": now,
                "finished_at": now,
                "attempts": 1,
                "max_attempts": 3,
                "output": f"Foo {task_id}",
            }
        )
        yield api, str(task_id)
        client.drop_database(settings.database)
        client.close()


def test_fuzzed_waits_answer_within_the_document(live_wait: tuple[LiveApi, str]) -> None:
    api, task_id = live_wait
    document = api.app[OPENAPI]
    responses = document["paths"]["/tasks/{id}"]["get"]["responses"]

    @FUZZ
    @given(value=WAIT_VALUE, exists=st.booleans())
    def one(value: str, exists: bool) -> None:
        path = f"/tasks/{task_id if exists else ObjectId()}"
        request = {
            "method": "GET",
            "path": path,
            "query": [("wait", value)],
            "body": None,
            "content_type": None,
        }
        status, _, raw = api.send(request)
        valid = bool(SECONDS.fullmatch(value)) and 0 < float(value) <= 60
        assert status == (400 if not valid else 200 if exists else 404), (value, status, raw)
        schema = resolve(responses[str(status)]["content"]["application/json"]["schema"], document)
        OAS30Validator(schema).validate(json.loads(raw))

    one()


async def test_six_hundred_waits_ending_together_all_answer_200(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    # The waits' own reads, at their start and at their end, must fit in the request
    # timeout (30 s), however many end at once.
    client = await aiohttp_client(create_app(settings))
    tasks = [await waiting_task(store) for _ in range(50)]

    async def wait(session: aiohttp.ClientSession, task_id: str) -> tuple[int, Any]:
        async with session.get(client.make_url(f"/tasks/{task_id}?wait=10")) as response:
            return response.status, await response.json()

    # A connection per request (the test client's session holds at most 100 at once).
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.gather(*(wait(session, tasks[i % 50]) for i in range(600)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 600, {s: statuses.count(s) for s in set(statuses)}
    assert {body["id"] for _, body in answers} == set(tasks)
    assert all(body["state"] == "NOTSTARTED" for _, body in answers)


async def test_a_wait_on_a_slow_database_ends_in_time_with_its_reads_counted(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    # Every read takes 0.7 s: the first read, the wait (3 s: the 4 s timeout less its
    # margin) and the last read must still end before the timeout answers 503.
    client = await aiohttp_client(create_app(dataclasses.replace(settings, request_timeout=4.0)))
    app_store: Store = client.app[STORE]
    tasks = app_store.tasks
    get, get_many = tasks.get, tasks.get_many

    async def slow_get(task_id: str) -> Task:
        await asyncio.sleep(0.7)
        return await get(task_id)

    async def slow_get_many(task_ids: Any) -> dict[str, Task]:
        await asyncio.sleep(0.7)
        return await get_many(task_ids)

    tasks.get, tasks.get_many = slow_get, slow_get_many  # type: ignore[method-assign]
    task_ids = [await waiting_task(store) for _ in range(5)]
    started = time.monotonic()
    answers = await asyncio.gather(*(timed_get(client, f"/tasks/{i}?wait=10") for i in task_ids))
    assert [status for status, _, _ in answers] == [200] * 5, answers
    assert all(body["state"] == "NOTSTARTED" for _, body, _ in answers)
    assert time.monotonic() - started < 4.0
