"""Database command budgets, counted with PyMongo's command monitoring on a real worker:
three commands on a task's path (insert, claim, complete), and a quiet idle worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from service.clock import DbClock
from service.config import Settings
from service.models import State, TaskType
from service.plugins import load_registry
from service.store import EMPTY_BATCH_PAUSE, TaskStore
from service.worker import Worker, http_session
from tests.conftest import eventually


class CommandLog(monitoring.CommandListener):
    """Every command the client sent, with what it asked and what it got."""

    def __init__(self) -> None:
        self.started_commands: dict[int, tuple[str, dict[str, Any]]] = {}
        self.done: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.recording = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.recording:
            self.started_commands[event.request_id] = (event.command_name, dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        sent = self.started_commands.pop(event.request_id, None)
        if sent is not None:
            self.done.append((sent[0], sent[1], dict(event.reply)))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.started_commands.pop(event.request_id, None)


def classify(name: str, command: dict[str, Any], reply: dict[str, Any]) -> str:
    """Which part of the service a command served."""
    if name == "insert":
        return "insert"
    if name == "findAndModify":
        return "claim" if reply.get("value") else "empty claim"
    if name == "update":
        update = command["updates"][0]["u"]
        if isinstance(update, list):
            return "recovery"
        if update.get("$set", {}).get("state") == State.COMPLETE.value:
            return "complete"
        if "heartbeat_at" in update.get("$currentDate", {}):
            return "heartbeat"
    return name


@pytest.fixture
async def watched(settings: Settings) -> AsyncIterator[tuple[TaskStore, CommandLog]]:
    """A store whose client logs every command."""
    log = CommandLog()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongodb_url, tz_aware=True, event_listeners=[log]
    )
    store = TaskStore(client, database=settings.database, clock=DbClock())
    await store.sync_clock()
    await store.ensure_indexes()
    yield store, log
    await client.close()


async def run_worker(store: TaskStore, settings: Settings) -> tuple[Worker, asyncio.Task[None]]:
    http = http_session()
    quick = dataclasses.replace(
        settings, bar_url="http://127.0.0.1:9/", bar_timeout=1, foo_seconds=0
    )
    worker = Worker(store, quick, registry=load_registry(), http=http, worker_id="budget")

    async def run() -> None:
        async with http:
            await worker.run()

    return worker, asyncio.create_task(run())


async def test_a_task_costs_three_commands_plus_its_share_of_wake_ups(
    watched: tuple[TaskStore, CommandLog], store: TaskStore, settings: Settings
) -> None:
    creator, log = watched
    worker, running = await run_worker(creator, settings)
    await asyncio.sleep(1.5)  # started, stream open, first look done: now idle
    log.recording = True
    began = time.monotonic()
    tasks = 60
    # A trickle: each task arrives into an idle worker, the costly case for wake-ups.
    for _ in range(tasks):
        await creator.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
        await asyncio.sleep(0.05)

    async def all_complete() -> bool:
        return await store.tasks.count_documents({"state": "COMPLETE"}) == tasks

    await eventually(all_complete)
    log.recording = False
    elapsed = time.monotonic() - began
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    assert kinds["insert"] == kinds["claim"] == kinds["complete"] == tasks, kinds
    on_path = 3 * tasks
    # Heartbeat and recovery by the clock; wake-ups: at most one change-stream getMore per
    # task, one safety poll (empty claim and look-up) per poll interval, and the paced
    # empty getMores of a server that answers them early (SecantusDB does).
    s = settings
    periodic = elapsed * (
        1 / s.heartbeat_interval
        + 2 / (s.stale_after / 2)
        + 3 / s.max_poll_interval
        + 1 / EMPTY_BATCH_PAUSE
    )
    others = sum(kinds.values()) - on_path
    print(f"{tasks} tasks in {elapsed:.2f}s: {dict(kinds)}")
    assert others <= tasks + periodic + 5, (kinds, round(elapsed, 2))


async def test_an_idle_worker_sends_under_one_command_a_second(
    watched: tuple[TaskStore, CommandLog], settings: Settings
) -> None:
    store, log = watched
    production_like = dataclasses.replace(
        settings, heartbeat_interval=2.0, stale_after=12.0, max_poll_interval=5.0
    )
    worker, running = await run_worker(store, production_like)
    await asyncio.sleep(1.0)
    log.recording = True
    await asyncio.sleep(10.0)
    log.recording = False
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"idle worker, 10 s: {dict(kinds)}")
    assert sum(kinds.values()) <= 10, kinds


async def test_a_draining_backlog_does_not_read_the_change_stream_per_write(
    watched: tuple[TaskStore, CommandLog], store: TaskStore, settings: Settings
) -> None:
    # A claimer with a backlog claims until empty: announcements meanwhile are useless, and
    # a server that answers a getMore on every write (SecantusDB) would cost one per claim
    # and complete. The stream is read at most once per poll interval while draining.
    tasks = 100
    for _ in range(tasks):
        await store.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    worker_store, log = watched
    never_full = dataclasses.replace(settings, concurrency=tasks, max_poll_interval=5.0)
    log.recording = True
    began = time.monotonic()
    worker, running = await run_worker(worker_store, never_full)

    async def all_complete() -> bool:
        return await store.tasks.count_documents({"state": "COMPLETE"}) == tasks

    await eventually(all_complete)
    log.recording = False
    elapsed = time.monotonic() - began
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"backlog of {tasks} in {elapsed:.2f}s: {dict(kinds)}")
    assert kinds["claim"] == kinds["complete"] == tasks, kinds
    assert kinds["getMore"] <= elapsed / never_full.max_poll_interval + 3, (kinds, elapsed)
