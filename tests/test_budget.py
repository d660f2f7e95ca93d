"""Database command budgets, counted with PyMongo's command monitoring on a real worker:
at most three commands on a task's path (insert, claim, its share of a result write), and a
quiet idle worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient

from service.clock import DbClock
from service.config import Settings
from service.models import State, TaskType
from service.plugins import load_registry
from service.store import Store
from service.store.occurrences import Timing
from service.store.streams import EMPTY_BATCH_PAUSE
from service.worker.process import http_session
from service.worker.worker import Worker
from tests.helpers import CommandLog, eventually


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


async def run_worker(store: Store, settings: Settings) -> tuple[Worker, asyncio.Task[None]]:
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
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    creator, log = watched
    worker, running = await run_worker(creator, settings)
    await asyncio.sleep(1.5)  # started, stream open, first look done: now idle
    log.recording = True
    began = time.monotonic()
    tasks = 60
    # A trickle: each task arrives into an idle worker, the costly case for wake-ups.
    for _ in range(tasks):
        await creator.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
        await asyncio.sleep(0.05)

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == tasks

    await eventually(all_complete)
    log.recording = False
    elapsed = time.monotonic() - began
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    assert kinds["insert"] == kinds["claim"] == tasks, kinds
    # Each task's result written once, alone or with others that came at the same pace
    # (service/worker/results.py): at most one command per task.
    written = [len(entry[1]["updates"]) for entry in log.done if classify(*entry) == "complete"]
    assert sum(written) == tasks and len(written) <= tasks, written
    on_path = 2 * tasks + len(written)
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


async def test_an_idle_worker_keeps_each_round_on_its_budget(settings: Settings) -> None:
    # Every feature on, at the default intervals: a type limit, a schedule not due for a
    # day, retention; every command of the worker's clients (its own, the claim client and
    # the lease keeper's, which shares its listeners) over 40 s, long enough for each round
    # (recovery at a stale threshold, the registry at half of one, the malformed scan's
    # first look) to come at least once. scripts/idle_cost.py breaks it down by round.
    log = CommandLog()
    url = settings.mongodb_url
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, tz_aware=True, event_listeners=[log]
    )
    claim_client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, tz_aware=True, event_listeners=[log], retryWrites=False
    )
    store = Store(client, database=settings.database, clock=DbClock(), claim_client=claim_client)
    await store.sync_clock()
    await store.ensure_indexes()
    await store.workers.ensure_indexes()
    await store.schedules.create(
        template={"type": "baz", "max_attempts": 1}, timing=Timing(every=86_400.0)
    )
    defaults = Settings()
    production_like = dataclasses.replace(
        settings,
        heartbeat_interval=defaults.heartbeat_interval,
        stale_after=defaults.stale_after,
        max_poll_interval=defaults.max_poll_interval,
        schedule_interval=defaults.schedule_interval,
        retention=defaults.retention,
        type_limits=("baz=2",),
    )
    assert production_like.limits and production_like.retention > 0
    seconds = 40.0  # recovery first looks a stale threshold (12 s) after its first ping
    try:
        worker, running = await run_worker(store, production_like)
        await asyncio.sleep(1.0)
        log.recording = True
        await asyncio.sleep(seconds)
        log.recording = False
        worker.stop()
        await running
    finally:
        await client.drop_database(settings.database)
        await claim_client.close()
        await client.close()
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"idle worker, every feature on, {seconds:g} s: {dict(kinds)}")
    assert kinds["recovery"] >= 1 and kinds["update"] >= 1, kinds  # recovery, registry
    # The schedule round reads once per TASK_RUNNER_SCHEDULE_INTERVAL (15 s); every other
    # round together stays under 0.8 a second, and the whole under one a second.
    schedule_reads = sum(
        1 for name, command, _ in log.done if name == "find" and command["find"] == "schedules"
    )
    assert schedule_reads <= seconds / defaults.schedule_interval + 1, schedule_reads
    assert sum(kinds.values()) - schedule_reads < 0.8 * seconds, kinds
    assert sum(kinds.values()) < seconds, kinds


async def test_a_draining_backlog_does_not_read_the_change_stream_per_write(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    # A claimer with a backlog claims until empty: announcements meanwhile are useless, and
    # a server that answers a getMore on every write (SecantusDB) would cost one per claim
    # and complete. The stream is read at most once per poll interval while draining.
    tasks = 100
    for _ in range(tasks):
        await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    worker_store, log = watched
    never_full = dataclasses.replace(settings, concurrency=tasks, max_poll_interval=5.0)
    log.recording = True
    began = time.monotonic()
    worker, running = await run_worker(worker_store, never_full)

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == tasks

    await eventually(all_complete)
    log.recording = False
    elapsed = time.monotonic() - began
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"backlog of {tasks} in {elapsed:.2f}s: {dict(kinds)}")
    # Results finished together go out in one bulk_write: fewer commands, one update each.
    completes = [c["updates"] for n, c, r in log.done if classify(n, c, r) == "complete"]
    assert kinds["claim"] == sum(len(updates) for updates in completes) == tasks, kinds
    assert kinds["complete"] < tasks, kinds
    assert kinds["getMore"] <= elapsed / never_full.max_poll_interval + 3, (kinds, elapsed)


def look_ups(log: CommandLog) -> int:
    """The wake-ups' look-ups of the earliest waiting task among the logged commands."""
    return sum(
        1
        for name, command, _ in log.done
        if name == "find"
        and command.get("find") == "tasks"
        and command.get("filter", {}).get("state") == State.NOTSTARTED.value
    )


async def test_an_empty_claim_the_stream_explains_costs_no_look_up(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    # The worker learns of a task from the stream; someone else then takes it (here: it is
    # deleted), so the claim at its run_at comes back empty. Everything waiting was either
    # announced or found by the last look-up, whose answer still holds: asking the
    # database again what is next would be a wasted command.
    worker_store, log = watched
    no_safety_poll = dataclasses.replace(settings, max_poll_interval=30.0)
    worker, running = await run_worker(worker_store, no_safety_poll)
    await asyncio.sleep(1.5)  # started, stream open, first look done: now idle
    log.recording = True
    run_at = store.clock.now() + timedelta(seconds=1.5)
    task = await store.tasks.create(task_type=TaskType.BAZ, run_at=run_at, max_attempts=1)

    async def announced() -> bool:
        return task.id in worker.wakeups._known

    await eventually(announced)
    await store.tasks.delete(task.id)
    await asyncio.sleep((run_at - store.clock.now()).total_seconds() + 0.5)
    log.recording = False
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"announced then taken: {dict(kinds)}")
    assert kinds["empty claim"] == 1, kinds
    assert look_ups(log) == 0, kinds


async def test_tasks_created_ahead_in_bulk_are_read_a_batch_per_get_more(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    # Each insert of a task due later would otherwise cost every listening worker one
    # getMore of its own; after a batch of only such tasks the stream waits GATHER.
    worker_store, log = watched
    no_safety_poll = dataclasses.replace(settings, max_poll_interval=30.0)
    worker, running = await run_worker(worker_store, no_safety_poll)
    await asyncio.sleep(1.5)
    log.recording = True
    tasks = 100
    later = store.clock.now() + timedelta(seconds=60)
    created = [
        await store.tasks.create(task_type=TaskType.BAZ, run_at=later, max_attempts=1)
        for _ in range(tasks)
    ]

    async def all_announced() -> bool:
        return all(task.id in worker.wakeups._known for task in created)

    await eventually(all_announced)
    log.recording = False
    worker.stop()
    await running
    kinds = Counter(classify(*entry) for entry in log.done)
    print(f"{tasks} tasks created ahead: {dict(kinds)}")
    assert kinds["getMore"] <= tasks // 3, kinds
    assert kinds["empty claim"] == 0 and look_ups(log) == 0, kinds


async def test_the_look_up_names_types_only_when_the_claim_does(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    # Equalities and one range keep SecantusDB on the index: no type while every waiting
    # task is of a type this worker runs; once it met another type, as its claim does.
    worker_store, log = watched
    log.recording = True
    worker, running = await run_worker(worker_store, settings)
    await asyncio.sleep(1.5)
    first = [c for n, c, _ in log.done if n == "find" and c.get("find") == "tasks"]
    await store.db.tasks.insert_one(
        {
            "_id": ObjectId(),
            "state": "NOTSTARTED",
            "type": "qux",
            "run_at": store.clock.now(),
            "attempts": 0,
            "max_attempts": 1,
        }
    )

    async def named() -> bool:
        return not worker.claimer.claims_any_type()

    await eventually(named)
    log.done.clear()
    await asyncio.sleep(settings.max_poll_interval * 2)  # a safety poll and its look-up
    log.recording = False
    worker.stop()
    await running
    later = [c for n, c, _ in log.done if n == "find" and c.get("find") == "tasks"]
    assert first and later
    assert all("type" not in c["filter"] for c in first), first
    assert all("type" in c["filter"] for c in later), later


async def test_short_tasks_cost_no_heartbeat_nor_registry_write_and_a_long_one_stays_fresh(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    # A lease claimed (or refreshed) less than a quarter interval ago is left out of the
    # heartbeat: a burst of short tasks costs none, while a long task's heartbeat_at never
    # gets older than 1.25 intervals (the stale threshold is at least 3).
    worker_store, log = watched
    interval = 2.0  # the default: a short task done within half a second
    timed = dataclasses.replace(
        settings,
        heartbeat_interval=interval,
        stale_after=8.0,
        foo_seconds=5.0,
        bar_url="http://127.0.0.1:9/",
    )
    http = http_session()
    worker = Worker(worker_store, timed, registry=load_registry(), http=http, worker_id="beats")

    async def run() -> None:
        async with http:
            await worker.run()

    running = asyncio.create_task(run())
    await asyncio.sleep(1.0)
    log.recording = True
    long = await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=1)
    short = [
        await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
        for _ in range(150)
    ]
    oldest = 0.0
    while (task := await store.tasks.get(long.id)).state is not State.COMPLETE:
        if task.state is State.STARTED and task.heartbeat_at is not None:
            age = (store.clock.now() - task.heartbeat_at).total_seconds()
            oldest = max(oldest, age)
        await asyncio.sleep(0.05)
    log.recording = False
    worker.stop()
    await running
    beats = [c for n, c, r in log.done if classify(n, c, r) == "heartbeat"]
    leases = {lease for c in beats for lease in c["updates"][0]["q"]["lease"]["$in"]}
    print(f"heartbeats: {len(beats)}, oldest heartbeat_at seen {oldest:.2f}s")
    assert leases == {task.lease}, leases  # never one of the short tasks
    # The registry lists only what was held for a quarter interval: the long task, never a
    # short one (whose comings and goings would cost a registry write every round).
    listed = [
        c["updates"][0]["u"]["$set"]["tasks"]
        for n, c, _ in log.done
        if n == "update" and c["update"] == "workers"
    ]
    assert [long.id] in listed and all(held in ([], [long.id]) for held in listed), listed
    assert await store.db.tasks.count_documents({"state": "COMPLETE"}) == 1 + len(short)
    assert 2 <= len(beats) <= 4, len(beats)  # the long task, refreshed while it ran
    assert oldest <= 1.25 * interval + 0.5, oldest
