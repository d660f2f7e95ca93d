"""The Python client (service.client) against real `task-runner api` processes: a task
created, waited for and run by a real worker; lists followed page after page; errors as
their exceptions; and retries through a proxy that loses the first answer, with one
Idempotency-Key across them and one task in the end. The async client and the sync one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

from service.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidRequest,
    QueueNotFound,
    Retry,
    ScheduleNotFound,
    State,
    Task,
    TaskNotFound,
    TaskNotRequeueable,
    Unauthorized,
    WaitTimeout,
)
from service.localdb import free_port
from service.store import Store
from tests.helpers import ApiProcess, WorkerProcess, all_tasks

QUICK = Retry(attempts=3, backoff=0.01, backoff_max=0.05)
FUTURE = datetime(2031, 1, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def api_process(store: Store, start_api: Callable[..., ApiProcess]) -> ApiProcess:
    """A real API on the test's database (the store drops it afterwards)."""
    return start_api()


@pytest.fixture
async def client(api_process: ApiProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(api_process.url, retry=QUICK) as async_client:
        yield async_client


class FlakyProxy:
    """An HTTP proxy in front of a real API that fails the first `fail` requests: "drop"
    forwards each to the API, which acts on it, then closes the client's connection without
    an answer; "503" answers 503 database_unavailable without forwarding. It records every
    request (method, path, Idempotency-Key) and what the API answered to each it forwarded
    (status, Idempotent-Replayed)."""

    def __init__(self, target: str, *, fail: int, how: str) -> None:
        self.target = target
        self.fail = fail
        self.how = how
        self.requests: list[tuple[str, str, str | None]] = []
        self.answers: list[tuple[int, str | None]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)

    async def __aenter__(self) -> FlakyProxy:
        self.session = aiohttp.ClientSession()
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path, request.headers.get("Idempotency-Key")))
        failing = len(self.requests) <= self.fail
        if failing and self.how == "503":
            error = {"code": "database_unavailable", "message": "stub", "details": {}}
            return web.json_response({"error": error}, status=503)
        names = ("Content-Type", "Idempotency-Key", "Authorization")
        headers = {name: request.headers[name] for name in names if name in request.headers}
        async with self.session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as answer:
            raw = await answer.read()
            self.answers.append((answer.status, answer.headers.get("Idempotent-Replayed")))
            content_type = answer.headers.get("Content-Type")
        if failing:
            assert request.transport is not None
            request.transport.abort()  # the API acted; its answer never reaches the client
            return web.Response()
        return web.Response(
            status=answer.status,
            body=raw,
            headers={"Content-Type": content_type or "application/json"},
        )


async def test_a_task_created_is_run_by_a_worker_and_waited_for(
    client: AsyncClient, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    spawn_worker()
    task = await client.create("foo", max_attempts=2, priority=3)
    assert (task.type, task.state, task.priority, task.max_attempts) == ("foo", "NOTSTARTED", 3, 2)
    assert task.created_at is not None and task.created_at.tzinfo is not None
    done = await client.wait(task.id, timeout=30)
    assert done.state is State.COMPLETE and done.done
    assert done.output == f"Foo {task.id}"
    assert done.attempts == 1 and done.worker is not None and done.errors == ()
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at == task.created_at <= done.started_at <= done.finished_at
    assert await client.get(task.id) == done


async def test_a_wait_that_runs_out_raises_with_the_task_as_it_is(client: AsyncClient) -> None:
    task = await client.create("foo", run_at=FUTURE)
    assert task.run_at == FUTURE
    with pytest.raises(WaitTimeout) as caught:
        await client.wait(task.id, timeout=0.3)
    assert caught.value.task.id == task.id and caught.value.task.state is State.NOTSTARTED
    assert isinstance(caught.value, TimeoutError)
    await client.delete(task.id)
    with pytest.raises(TaskNotFound):
        await client.wait(task.id, timeout=5)


async def test_a_long_wait_is_asked_for_in_turns_the_api_allows(
    store: Store,
    start_api: Callable[..., ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    api = start_api(request_timeout=2.0)  # the API cuts each wait to 1.5 s
    spawn_worker()
    async with (
        FlakyProxy(api.url, fail=0, how="drop") as proxy,
        AsyncClient(proxy.url, retry=QUICK) as client,
    ):
        task = await client.create("foo", run_at=datetime.now(UTC) + timedelta(seconds=4))
        done = await client.wait(task.id, timeout=30)
    assert done.state is State.COMPLETE
    waits = [path for method, path, _ in proxy.requests if method == "GET"]
    assert len(waits) >= 3 and set(waits) == {f"/tasks/{task.id}"}


async def make_listing(client: AsyncClient) -> tuple[list[str], list[str]]:
    """Five foo and three bar tasks due a minute apart, all in the future: their ids."""
    foos: list[str] = []
    bars: list[str] = []
    for minute in range(8):
        task_type = "bar" if minute % 3 == 1 else "foo"
        task = await client.create(task_type, run_at=FUTURE + timedelta(minutes=minute))
        (bars if task_type == "bar" else foos).append(task.id)
    return foos, bars


async def test_list_follows_every_page_by_state_and_type(client: AsyncClient) -> None:
    foos, bars = await make_listing(client)
    assert [t.id async for t in client.list(type="foo", page_size=2)] == foos
    assert [t.id async for t in client.list(type="BAR", page_size=2, order="desc")] == bars[::-1]
    notstarted = [t async for t in client.list(state=State.NOTSTARTED, page_size=3)]
    assert len(notstarted) == 8 and all(t.state is State.NOTSTARTED for t in notstarted)
    assert [t.id async for t in client.list(state="complete")] == []
    first = await client.page(type="foo", page_size=4)
    assert [t.id for t in first.tasks] == foos[:4] and first.next_cursor is not None
    rest = await client.page(type="foo", page_size=4, cursor=first.next_cursor)
    assert [t.id for t in rest.tasks] == foos[4:] and rest.next_cursor is None


async def test_errors_are_raised_as_the_codes_exceptions(client: AsyncClient) -> None:
    missing = "0" * 24
    with pytest.raises(TaskNotFound) as not_found:
        await client.get(missing)
    assert (not_found.value.status, not_found.value.code) == (404, "task_not_found")
    assert not_found.value.details == {"id": missing}
    with pytest.raises(TaskNotFound):
        await client.get("not/an id")  # quoted: one path segment, not another route
    with pytest.raises(InvalidRequest) as bad:
        await client.create("qux", priority=11)
    assert bad.value.code == "invalid_request" and set(bad.value.details) == {"type", "priority"}
    with pytest.raises(InvalidRequest) as naive:
        await client.create("foo", run_at=datetime(2030, 1, 1))
    assert "run_at" in naive.value.details
    # Passed through as given: the API refuses a queue name outside its rule (and an
    # unknown field, or a loopback callback).
    with pytest.raises(InvalidRequest) as unknown:
        await client.create("foo", queue="not a name", callback_url="http://127.0.0.1:9/done")
    assert set(unknown.value.details) == {"queue", "callback_url"}
    task = await client.create("foo", run_at=FUTURE)
    with pytest.raises(TaskNotRequeueable) as not_failed:
        await client.requeue(task.id)
    assert not_failed.value.details["state"] == "NOTSTARTED"
    with pytest.raises(ScheduleNotFound):
        await client.pause_schedule(missing)
    assert [t.id async for t in client.list()] == [task.id]


async def test_a_guarded_api_wants_the_token(
    store: Store, start_api: Callable[..., ApiProcess]
) -> None:
    api = start_api(api_tokens=("s3cret",), auth_reads=True)
    async with AsyncClient(api.url, retry=QUICK) as anonymous:
        with pytest.raises(Unauthorized) as refused:
            await anonymous.create("foo")
        assert refused.value.status == 401
        with pytest.raises(Unauthorized):
            await anonymous.stats()
    async with AsyncClient(api.url, token="wrong", retry=QUICK) as wrong:
        with pytest.raises(Unauthorized):
            await wrong.get("0" * 24)
    async with AsyncClient(api.url, token="s3cret", retry=QUICK) as client:
        task = await client.create("foo", run_at=FUTURE)
        assert (await client.get(task.id)).id == task.id
        assert (await client.stats()).by_state.get("NOTSTARTED") == 1
    assert len(await all_tasks(store)) == 1


async def test_schedules_stats_and_workers(
    client: AsyncClient, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    schedule = await client.create_schedule("foo", every=3600, start_at=FUTURE, priority=2)
    assert (schedule.type, schedule.every, schedule.priority) == ("foo", 3600.0, 2)
    assert schedule.next_at == FUTURE and not schedule.paused
    assert (await client.pause_schedule(schedule.id)).paused
    assert not (await client.resume_schedule(schedule.id)).paused
    assert [s.id for s in await client.list_schedules()] == [schedule.id]
    assert await client.get_schedule(schedule.id) == await client.get_schedule(schedule.id)
    await client.delete_schedule(schedule.id)
    with pytest.raises(ScheduleNotFound):
        await client.get_schedule(schedule.id)
    worker = spawn_worker()
    done = await client.wait((await client.create("foo")).id, timeout=30)
    stats = await client.stats()
    assert stats.total == stats.by_state["COMPLETE"] == stats.by_type["foo"] == 1
    assert stats.now is not None and stats.due == 0
    [seen] = await client.workers()
    assert seen.id == worker.worker_id and seen.alive and done.worker == seen.id


# -- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["drop", "503"])
async def test_a_create_retried_makes_one_task(
    how: str, api_process: ApiProcess, store: Store
) -> None:
    async with (
        FlakyProxy(api_process.url, fail=1, how=how) as proxy,
        AsyncClient(proxy.url, retry=QUICK) as client,
    ):
        task = await client.create("foo", run_at=FUTURE, args={})
    [(_, _, key), (_, _, again)] = [r for r in proxy.requests if r[:2] == ("POST", "/tasks")]
    assert key is not None and again == key
    if how == "drop":  # the first created the task; the retry got it back, created nothing
        assert proxy.answers == [(201, None), (200, "true")]
    else:
        assert proxy.answers == [(201, None)]
    assert [t.id for t in await all_tasks(store)] == [task.id]


async def test_what_cannot_be_repeated_is_not_and_a_repeated_delete_is_done(
    api_process: ApiProcess, store: Store
) -> None:
    async with AsyncClient(api_process.url) as direct:
        task = await direct.create("foo", run_at=FUTURE)
    async with (
        FlakyProxy(api_process.url, fail=1, how="drop") as proxy,
        AsyncClient(proxy.url, retry=QUICK) as client,
    ):
        # A schedule has no Idempotency-Key: sent once, its answer lost, not sent again.
        with pytest.raises(ConnectionFailed):
            await client.create_schedule("foo", every=60, start_at=FUTURE)
        assert len(await client.list_schedules()) == 1
        proxy.fail = len(proxy.requests) + 1
        # The first DELETE deleted it; the retry's 404 means done, not TaskNotFound.
        await client.delete(task.id)
    assert [status for status, _ in proxy.answers[-2:]] == [204, 404]
    assert await all_tasks(store) == []


async def test_an_api_that_does_not_listen_is_connection_failed() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retry=QUICK) as client:
        with pytest.raises(ConnectionFailed) as caught:
            await client.get("0" * 24)
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


# -- the sync client ---------------------------------------------------------------------------


def test_the_sync_client_creates_waits_lists_and_raises(
    api_process: ApiProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    spawn_worker()
    with Client(api_process.url, retry=QUICK) as client:
        task = client.create("foo")
        done = client.wait(task.id, timeout=30)
        assert done.state is State.COMPLETE and done.output == f"Foo {task.id}"
        later = [client.create("bar", run_at=FUTURE + timedelta(seconds=s)) for s in range(5)]
        listed = list(client.list(state="NOTSTARTED", type="bar", page_size=2))
        assert [t.id for t in listed] == [t.id for t in later]
        assert all(isinstance(t, Task) and t.run_at is not None for t in listed)
        assert [t.id for t in client.list(order="desc")][-1] == task.id
        with pytest.raises(TaskNotFound):
            client.get("0" * 24)
        with pytest.raises(InvalidRequest) as bad:
            client.create("foo", max_attempts=0)
        assert "max_attempts" in bad.value.details
        client.delete(later[0].id)
        assert len(list(client.list())) == 5
    with pytest.raises(RuntimeError):
        client.get(task.id)  # closed


async def test_the_sync_client_retries_a_create_once(api_process: ApiProcess, store: Store) -> None:
    async with FlakyProxy(api_process.url, fail=1, how="drop") as proxy:
        client = Client(proxy.url, retry=QUICK)
        try:
            task = await asyncio.to_thread(client.create, "foo", run_at=FUTURE)
        finally:
            await asyncio.to_thread(client.close)
    keys = {key for method, _, key in proxy.requests if method == "POST"}
    assert len(proxy.requests) == 2 and len(keys) == 1 and None not in keys
    assert proxy.answers == [(201, None), (200, "true")]
    assert [t.id for t in await all_tasks(store)] == [task.id]


def test_a_sync_client_left_open_is_closed_when_collected(api_process: ApiProcess) -> None:
    client = Client(api_process.url)
    assert client.list_schedules() == []  # its session is open now
    thread = client._loop.thread
    del client
    thread.join(10)
    assert not thread.is_alive()


async def test_queues_are_set_read_paused_and_resumed(client: AsyncClient) -> None:
    task = await client.create("foo", queue="mail", run_at=FUTURE)
    assert task.queue == "mail"
    assert [t.id async for t in client.list(queue="mail")] == [task.id]
    with pytest.raises(QueueNotFound):
        await client.get_queue("nothing")
    queue = await client.put_queue("mail", {"rate": 2.5, "concurrency": 3})
    assert (queue.name, queue.rate, queue.burst, queue.concurrency) == ("mail", 2.5, 1, 3)
    assert queue.counts["NOTSTARTED"] == 1 and not queue.paused
    assert (await client.pause_queue("mail")).paused
    assert not (await client.resume_queue("mail")).paused
    cleared = await client.put_queue("mail", {"rate": None})
    assert cleared.rate is None and cleared.concurrency == 3
    assert [q.name for q in await client.list_queues()] == ["mail"]
    with pytest.raises(InvalidRequest) as bad:
        await client.put_queue("mail", {"rate": 0})
    assert "rate" in bad.value.details
    schedule = await client.create_schedule("baz", every=3600, queue="mail")
    assert schedule.queue == "mail"
    await client.delete_queue("mail")  # its settings go, its task stays
    kept = await client.get_queue("mail")
    assert (kept.rate, kept.concurrency, kept.counts["NOTSTARTED"]) == (None, None, 1)
    with pytest.raises(QueueNotFound):
        await client.delete_queue("mail")


def test_the_sync_client_deletes_a_queues_settings(api_process: ApiProcess) -> None:
    with Client(api_process.url, retry=QUICK) as client:
        client.put_queue("mail", {"paused": True})
        client.delete_queue("mail")
        with pytest.raises(QueueNotFound):
            client.get_queue("mail")
        with pytest.raises(QueueNotFound):
            client.delete_queue("mail")
