"""The http type: safe destinations (at create and at send), signatures every request
verifies with the Standard Webhooks reference library, and the answer deciding (real worker
processes against a local receiver, loopback opened by TASK_RUNNER_HTTP_ALLOW_NETWORKS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service import webhooks
from service.config import Settings
from service.localdb import free_port
from service.models import State
from service.store import Store
from tests.calling import Receiver, calling, verify
from tests.helpers import WorkerProcess, eventually, task_ended, wait_until_started


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback opened (the receiver is on it), requests signed."""
    return calling(settings)


async def _create(api: TestClient[Any, Any], url: str, **fields: Any) -> str:
    args = {"url": url, "body": {"order": 42}, **fields.pop("args", {})}
    response = await api.post("/tasks", json={"type": "http", "args": args, **fields})
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def _worker(spawn_worker: Callable[..., WorkerProcess], **overrides: Any) -> WorkerProcess:
    worker = spawn_worker(**overrides)
    await wait_until_started(worker)
    return worker


async def test_2xx_completes_after_one_signed_request(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    await _worker(spawn_worker)
    task_id = await _create(api, receiver.url + "jobs/42", args={"headers": {"X-Team": "acme"}})
    task = await task_ended(store, task_id)
    assert task.state == State.COMPLETE
    assert task.output == "200\nanswer 1"
    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert (got.method, got.path, got.body) == ("POST", "/jobs/42", b'{"order":42}')
    assert got.headers["x-team"] == "acme"
    assert got.headers["content-type"] == "application/json"
    assert got.webhook_id == task_id
    assert verify(got) == {"order": 42}


async def test_5xx_is_retried_to_success_with_one_webhook_id(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, r: (503 if n == 1 else 500 if n == 2 else 200, {})
    await _worker(spawn_worker)
    task_id = await _create(api, receiver.url, max_attempts=5)
    task = await task_ended(store, task_id)
    assert task.state == State.COMPLETE and task.attempts == 3
    assert [e.error.split("\n")[0] for e in task.errors] == ["HTTP 503", "HTTP 500"]
    assert receiver.by_id() == {task_id: 3}
    for got in receiver.received:
        verify(got)


async def test_410_and_a_redirect_fail_after_one_request(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    redirect = {"Location": receiver.url + "elsewhere"}
    receiver.answer = lambda n, r: (410, {}) if r.path == "/gone" else (302, redirect)
    await _worker(spawn_worker)
    gone = await _create(api, receiver.url + "gone", max_attempts=5)
    moved = await _create(api, receiver.url + "moved", max_attempts=5)
    for task_id, status in ((gone, 410), (moved, 302)):
        task = await task_ended(store, task_id)
        assert task.state == State.FAILED and task.attempts == 1
        assert task.error is not None and task.error.startswith(f"HTTP {status}")
    assert sorted(r.path for r in receiver.received) == ["/gone", "/moved"]


async def test_429_with_retry_after_waits_for_it(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, r: (429, {"Retry-After": "3"}) if n == 1 else (200, {})
    await _worker(spawn_worker)
    task_id = await _create(api, receiver.url, max_attempts=2)
    task = await task_ended(store, task_id)
    assert task.state == State.COMPLETE and task.attempts == 2
    first, second = receiver.received
    # The settings' backoff is at most 0.5 s: only the Retry-After explains the wait.
    assert second.at - first.at >= 3.0
    verify(first), verify(second)


async def test_a_worker_killed_mid_request_is_followed_by_the_same_webhook_id(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, r: None if n == 1 else (200, {})  # hold the first open
    doomed = await _worker(spawn_worker)
    task_id = await _create(api, receiver.url)
    await eventually(lambda: len(receiver.received) == 1, within=30, what="the first request")
    doomed.kill()
    await _worker(spawn_worker)
    task = await task_ended(store, task_id)
    assert task.state == State.COMPLETE and task.attempts == 2
    assert receiver.by_id() == {task_id: 2}
    assert [verify(r) for r in receiver.received] == [{"order": 42}] * 2
    assert task.errors[0].error.startswith("worker lost")


async def test_200_tasks_on_two_workers_are_each_delivered_once(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    for _ in range(2):
        await _worker(spawn_worker, concurrency=8)
    item = {"type": "http", "args": {"url": receiver.url, "body": {"n": 1}}}
    body = {"tasks": [item] * 200}
    response = await api.post("/tasks/batch", json=body)
    ids = [item["id"] for item in (await response.json())["results"]]

    async def done() -> bool:
        return await store.db.tasks.count_documents({"state": State.COMPLETE.value}) == 200

    await eventually(done, within=150, what="200 http tasks complete")
    assert receiver.by_id() == dict.fromkeys(ids, 1)
    for got in receiver.received:
        verify(got)
    tasks = await store.tasks.get_many(ids)
    assert len({task.worker for task in tasks.values()}) == 2


async def test_a_worker_with_default_rules_sends_nothing_to_loopback(
    store: Store, receiver: Receiver, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    await _worker(spawn_worker, http_allow_networks=None)
    # Stored by hand: the API would have refused it.
    task = await store.tasks.create(
        task_type="http", run_at=None, max_attempts=3, args={"url": receiver.url}
    )
    ended = await task_ended(store, task.id)
    assert ended.state == State.FAILED and ended.attempts == 1
    assert ended.error is not None and "loopback" in ended.error
    assert receiver.received == []


async def test_text_bodies_gets_names_and_requests_that_get_no_answer(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, got: None if got.path == "/slow" else (204, {})
    await _worker(spawn_worker)
    by_name = f"http://localhost:{receiver.port}/text"  # resolved, checked, then connected to
    text = await _create(api, by_name, args={"method": "PUT", "body": "hello, wörld"})
    query = await _create(api, receiver.url + "q?x=1", args={"method": "GET", "body": None})
    nobody = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    refused = await _create(api, nobody, max_attempts=2)
    slow = await _create(api, receiver.url + "slow", max_attempts=2, timeout=1)
    for task_id in (text, query):
        task = await task_ended(store, task_id)
        assert task.state == State.COMPLETE and task.output == "204", task
    for task_id, error in ((refused, "ClientConnectorError"), (slow, "timed out after 1 s")):
        task = await task_ended(store, task_id)
        assert task.state == State.FAILED and task.attempts == 2, task
        assert [e.error.startswith(error) for e in task.errors] == [True, True], task.errors
    received = {r.path: r for r in receiver.received}
    assert received["/text"].method == "PUT"
    assert received["/text"].headers["content-type"] == "text/plain; charset=utf-8"
    assert received["/text"].headers["host"] == f"localhost:{receiver.port}"
    assert verify(received["/text"]) == "hello, wörld".encode()
    assert received["/q"].method == "GET" and verify(received["/q"]) == b""
    assert [r.path for r in receiver.received].count("/slow") == 2
    for got in receiver.received:
        verify(got)


async def test_a_malformed_answer_leaves_a_bounded_error(
    api: TestClient[Any, Any], store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # aiohttp's parse errors quote what the service sent (here 100 kB of it): the error kept
    # per attempt (and logged) must stay near the documented 1,024 bytes of an answer.
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"x" * 100_000 + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await _worker(spawn_worker)
        task_id = await _create(api, f"http://127.0.0.1:{port}/", max_attempts=2)
        task = await task_ended(store, task_id)
    finally:
        server.close()
    assert task.state == State.FAILED and len(task.errors) == 2, task
    for entry in task.errors:
        assert entry.error.startswith("ClientResponseError"), entry.error[:200]
        assert len(entry.error) <= webhooks.MAX_SNIPPET + 100, len(entry.error)
