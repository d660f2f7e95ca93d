"""Completion callbacks: the pending callback is written with the final state (an outbox on
the task), delivered signed by real workers to a local receiver, retried, taken over by
another worker when its worker is SIGKILLed; trace context kept and passed on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service.config import Settings
from service.localdb import free_port
from service.models import CallbackState, State
from service.store import Store
from service.store.occurrences import Timing
from service.worker import callbacks
from tests.calling import Receiver, calling, verify
from tests.helpers import WorkerProcess, eventually, stuck_task, task_ended, wait_until_started
from tests.test_fleet import scrape_when_up, total

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback opened (the receiver is on it), requests signed."""
    return calling(settings)


async def _worker(spawn_worker: Callable[..., WorkerProcess], **overrides: Any) -> WorkerProcess:
    worker = spawn_worker(**overrides)
    await wait_until_started(worker)
    return worker


async def _create(api: TestClient[Any, Any], body: dict[str, Any], **headers: str) -> str:
    response = await api.post("/tasks", json=body, headers=headers)
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def _callback_settled(api: TestClient[Any, Any], task_id: str) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        shown: dict[str, Any] = await (await api.get(f"/tasks/{task_id}")).json()
        state = (shown.get("callback") or {}).get("state")
        return shown if state in ("DELIVERED", "FAILED") else None

    shown = await eventually(settled, within=60, what=f"task {task_id}'s callback to settle")
    assert shown is not None
    return dict(shown)


def _callback_id(shown: dict[str, Any]) -> str:
    """The webhook-id of the callback of the task's ending `shown` (as GET /tasks/{id})."""
    ended = datetime.fromisoformat(shown["finished_at"].replace("Z", "+00:00"))
    return f"{shown['id']}-callback-{(ended - EPOCH) // timedelta(milliseconds=1)}"


async def test_a_finished_task_is_posted_once_signed_with_its_trace_context(
    api: TestClient[Any, Any],
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    await _worker(spawn_worker)
    body = {"type": "baz", "callback_url": receiver.url + "done"}
    task_id = await _create(api, body, traceparent=TRACEPARENT)
    shown = await _callback_settled(api, task_id)
    assert shown["callback"] == {"state": "DELIVERED", "attempts": 1, "last_error": None}
    assert shown["traceparent"] == TRACEPARENT
    [got] = receiver.received
    assert (got.method, got.path) == ("POST", "/done")
    assert got.webhook_id == _callback_id(shown)
    assert got.headers["traceparent"] == TRACEPARENT
    payload = verify(got)
    # The task as GET /tasks/{id} shows it, at the time of the delivery.
    assert payload["id"] == task_id and payload["state"] == "COMPLETE"
    assert payload["output"] == shown["output"]
    assert payload["callback"]["state"] == "PENDING"


async def test_a_failed_http_task_calls_back_after_retries_of_the_callback(
    api: TestClient[Any, Any],
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    # The task's own request is answered 410; the callback 500 once, then 200.
    def answer(n: int, got: Any) -> tuple[int, dict[str, str]]:
        if got.path == "/job":
            return 410, {}
        return (500, {}) if n == 2 else (200, {})

    receiver.answer = answer
    port = free_port()
    await _worker(spawn_worker, metrics_port=port)
    body = {
        "type": "http",
        "args": {"url": receiver.url + "job"},
        "callback_url": receiver.url + "done",
    }
    task_id = await _create(api, body, traceparent=TRACEPARENT)
    shown = await _callback_settled(api, task_id)
    assert shown["state"] == "FAILED"
    assert shown["callback"]["state"] == "DELIVERED" and shown["callback"]["attempts"] == 2
    assert shown["callback"]["last_error"].startswith("HTTP 500")
    job, first, second = receiver.received
    assert job.headers["traceparent"] == TRACEPARENT and job.webhook_id == task_id
    assert first.webhook_id == second.webhook_id == _callback_id(shown)
    assert verify(second)["state"] == "FAILED"
    samples = await scrape_when_up(port)
    for outcome, count in (("retry", 1), ("delivered", 1), ("failed", 0), ("lease_lost", 0)):
        assert total(samples, "task_runner_worker_callbacks_total", outcome=outcome) == count


async def test_a_callback_never_answered_2xx_ends_failed(
    api: TestClient[Any, Any],
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, got: (503, {})
    await _worker(spawn_worker)
    task_id = await _create(api, {"type": "baz", "callback_url": receiver.url})
    shown = await _callback_settled(api, task_id)
    assert shown["callback"]["state"] == "FAILED"
    assert shown["callback"]["attempts"] == callbacks.MAX_ATTEMPTS
    assert shown["callback"]["last_error"].startswith("HTTP 503")
    assert receiver.by_id() == {_callback_id(shown): callbacks.MAX_ATTEMPTS}


async def test_a_callback_held_by_a_killed_worker_is_delivered_by_another(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    receiver.answer = lambda n, got: None if n == 1 else (200, {})  # hold the first open
    doomed = await _worker(spawn_worker)
    task_id = await _create(api, {"type": "baz", "callback_url": receiver.url})
    await eventually(lambda: len(receiver.received) == 1, within=30, what="the first callback")
    doomed.kill()
    task = await store.tasks.get(task_id)
    assert task.state == State.COMPLETE
    assert task.callback is not None and task.callback.state == CallbackState.PENDING
    await _worker(spawn_worker)
    # Taken again once its lease runs out (the delivery timeout plus a stale threshold).
    shown = await _callback_settled(api, task_id)
    assert shown["callback"]["state"] == "DELIVERED" and shown["callback"]["attempts"] == 2
    assert receiver.by_id() == {_callback_id(shown): 2}
    assert [verify(r)["id"] for r in receiver.received] == [task_id, task_id]


async def test_recovery_failing_a_task_writes_its_pending_callback(
    store: Store, receiver: Receiver
) -> None:
    task_id = await stuck_task(store, max_attempts=1)
    await store.db.tasks.update_one(
        {"_id": (await store.tasks.get(task_id)).key}, {"$set": {"callback_url": receiver.url}}
    )
    assert await store.claims.recover_stale(1.0) == 1
    task = await store.tasks.get(task_id)
    assert task.state == State.FAILED
    assert task.callback is not None and task.callback.state == CallbackState.PENDING
    assert task.callback.attempts == 0 and task.callback.next_at is not None
    # Requeued, it starts afresh: the callback comes again when it ends again.
    requeued = await store.tasks.requeue(task_id)
    assert requeued.callback is None and requeued.callback_url == receiver.url


async def test_a_task_without_a_callback_url_gets_no_callback(
    api: TestClient[Any, Any], store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    await _worker(spawn_worker)
    task_id = await _create(api, {"type": "baz"})
    task = await task_ended(store, task_id)
    assert task.callback is None
    shown = await (await api.get(f"/tasks/{task_id}")).json()
    assert shown["callback"] is None and shown["callback_url"] is None
    assert shown["traceparent"] is None


async def test_a_schedule_copies_its_callback_url_onto_each_occurrence(
    store: Store, receiver: Receiver
) -> None:
    template = {"type": "baz", "max_attempts": 1, "callback_url": receiver.url}
    schedule = await store.schedules.create(template=template, timing=Timing(every=60.0))
    assert schedule.callback_url == receiver.url
    task = await store.schedules.create_occurrence(schedule, store.clock.now())
    assert task is not None and task.callback_url == receiver.url


async def test_a_task_failed_by_recovery_calls_back_through_another_worker(
    api: TestClient[Any, Any],
    store: Store,
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    # The task's own request is held open, its worker killed: on its last attempt, recovery
    # fails it ("worker lost") and writes the callback, which the other worker delivers.
    receiver.answer = lambda n, got: None if got.path == "/job" else (200, {})
    doomed = await _worker(spawn_worker)
    body = {
        "type": "http",
        "max_attempts": 1,
        "args": {"url": receiver.url + "job"},
        "callback_url": receiver.url + "done",
    }
    task_id = await _create(api, body)
    await eventually(lambda: len(receiver.received) == 1, within=30, what="the task's request")
    doomed.kill()
    await _worker(spawn_worker)
    shown = await _callback_settled(api, task_id)
    assert shown["state"] == "FAILED" and shown["error"].startswith("worker lost")
    assert shown["callback"]["state"] == "DELIVERED"
    done = [r for r in receiver.received if r.path == "/done"]
    assert [verify(r)["error"] for r in done] == [shown["error"]]


async def test_a_requeued_task_calls_back_again_under_a_new_webhook_id(
    api: TestClient[Any, Any],
    receiver: Receiver,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    # A receiver deduplicates on webhook-id (as the docs say to): the callback of the task's
    # second ending must not look like a retry of the first's, or it is dropped unread.
    receiver.answer = lambda n, got: (410, {}) if got.path == "/job" and n == 1 else (200, {})
    await _worker(spawn_worker)
    body = {"type": "http", "args": {"url": receiver.url + "job"}, "callback_url": receiver.url}
    task_id = await _create(api, body)
    assert (await _callback_settled(api, task_id))["state"] == "FAILED"
    requeued = await api.post(f"/tasks/{task_id}/requeue")
    assert requeued.status == 200, await requeued.text()

    async def delivered_again() -> bool:
        shown = await (await api.get(f"/tasks/{task_id}")).json()
        return (
            shown["state"] == "COMPLETE" and (shown["callback"] or {}).get("state") == "DELIVERED"
        )

    await eventually(delivered_again, within=60, what="the second ending's callback")
    first, second = [got for got in receiver.received if got.path == "/"]
    assert [verify(first)["state"], verify(second)["state"]] == ["FAILED", "COMPLETE"]
    assert first.webhook_id != second.webhook_id
    assert second.webhook_id == _callback_id(await (await api.get(f"/tasks/{task_id}")).json())
