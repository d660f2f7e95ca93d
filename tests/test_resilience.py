"""Exactly once through crashes, freezes, stops, deletes and skewed clocks, with real
worker processes killed, stopped and signalled for real.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from bson import ObjectId

from service.models import State, Task, TaskType
from service.store import Store
from service.store.claims import WORKER_LOST
from tests.helpers import (
    COMPLETED,
    StubHttpServer,
    WorkerProcess,
    all_tasks,
    completions,
    eventually,
    wait_until_started,
)

Spawn = Callable[..., WorkerProcess]


async def create_many(store: Store, types: list[TaskType], *, max_attempts: int = 3) -> list[Task]:
    return [
        await store.tasks.create(task_type=t, run_at=None, max_attempts=max_attempts) for t in types
    ]


async def wait_for_state(store: Store, task_id: str, state: State, *, within: float = 30) -> Task:
    async def reached() -> bool:
        return (await store.tasks.get(task_id)).state is state

    await eventually(reached, within=within)
    return await store.tasks.get(task_id)


async def test_kill_9_two_of_four_workers_mid_run(store: Store, spawn_worker: Spawn) -> None:
    # All due before any worker starts, so the run is still going when the kill comes.
    created = await create_many(store, [TaskType.FOO, TaskType.BAZ] * 150)
    workers = [spawn_worker(concurrency=5, foo_seconds=1.0) for _ in range(4)]
    victims = workers[:2]

    async def victims_busy() -> bool:
        # Each victim holds a task. (Not "many at once": how many tasks a worker holds
        # depends on how fast the server answers claims, and the local one is slow.)
        holders = await store.db.tasks.distinct(
            "worker", {"state": "STARTED", "worker": {"$in": [v.worker_id for v in victims]}}
        )
        return len(holders) == len(victims)

    await eventually(victims_busy)
    for victim in victims:
        victim.kill()
    killed_at = store.clock.now()
    held = {
        t.id: t
        for t in await all_tasks(store)
        if t.state is State.STARTED and t.worker in {v.worker_id for v in victims}
    }
    assert held

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == len(created)

    await eventually(all_complete, within=120)
    tasks = {t.id: t for t in await all_tasks(store)}
    survivors = workers[2:]
    victim_ids = {v.worker_id for v in victims}
    survivor_ids = {s.worker_id for s in survivors}
    rerun_held = 0
    for task_id, before in held.items():
        after = tasks[task_id]
        if after.worker in victim_ids:
            # Its result write was still in flight when the process died, and landed.
            assert after.attempts == 1 and after.errors == ()
            continue
        # Re-run elsewhere, once the killed worker's heartbeat went stale.
        rerun_held += 1
        assert after.worker in survivor_ids
        assert after.attempts == 2, (after.errors, before)
        assert [e.error for e in after.errors] == [WORKER_LOST]
        assert before.heartbeat_at is not None and after.started_at is not None
        # Recovered (the server stamps the time) only once the last heartbeat was older
        # than the stale threshold. (Not started_at: the server stamps a claim's $$NOW as
        # the command arrives, and a claim queued behind the recovery can predate it.)
        [lost] = after.errors
        assert lost.at is not None
        assert lost.at >= before.heartbeat_at + timedelta(seconds=2.0)
        assert after.started_at >= killed_at
    assert rerun_held >= len(held) - 2, (rerun_held, len(held))
    # No task was written COMPLETE twice. (A killed worker may have written one and died
    # before logging it, so the survivors' logs are matched against the database.)
    assert max(completions(workers).values()) == 1
    assert set(completions(survivors)) == {t.id for t in tasks.values() if t.worker in survivor_ids}
    # Re-run tasks are those the killed workers held (a claim still in flight when the
    # process died may add one to those seen above), and each ran again only once.
    rerun = {t.id: t for t in tasks.values() if t.attempts != 1}
    assert {i for i in held if tasks[i].worker not in victim_ids} <= set(rerun)
    for task in rerun.values():
        assert task.attempts == 2
        assert [(e.error, e.worker in victim_ids) for e in task.errors] == [(WORKER_LOST, True)]


async def test_frozen_worker_late_result_is_rejected(store: Store, spawn_worker: Spawn) -> None:
    frozen = spawn_worker(concurrency=1, foo_seconds=3.0)
    await wait_until_started(frozen)
    task = (await create_many(store, [TaskType.FOO]))[0]
    claimed = await wait_for_state(store, task.id, State.STARTED)
    assert claimed.worker == frozen.worker_id
    frozen.signal(signal.SIGSTOP)
    rescuer = spawn_worker(concurrency=1, foo_seconds=0.1)
    done = await wait_for_state(store, task.id, State.COMPLETE, within=30)
    assert done.worker == rescuer.worker_id
    assert done.attempts == 2
    frozen.signal(signal.SIGCONT)

    async def frozen_gave_up() -> bool:
        return "lease lost" in frozen.stderr()

    await eventually(frozen_gave_up, within=10)
    after = await store.tasks.get(task.id)
    assert after.worker == rescuer.worker_id
    assert after.finished_at == done.finished_at
    assert completions([frozen, rescuer]) == Counter({task.id: 1})
    assert COMPLETED.search(frozen.stderr()) is None


async def test_sigterm_drains_then_releases_without_losing_an_attempt(
    store: Store, spawn_worker: Spawn
) -> None:
    leaving = spawn_worker(concurrency=4, foo_seconds=30.0, shutdown_grace=0.5)
    await wait_until_started(leaving)
    tasks = await create_many(store, [TaskType.FOO] * 3)
    for task in tasks:
        await wait_for_state(store, task.id, State.STARTED)
    started = time.monotonic()
    leaving.signal(signal.SIGTERM)
    assert leaving.wait() == 0
    assert time.monotonic() - started < 10
    for task in tasks:
        released = await store.tasks.get(task.id)
        assert released.state is State.NOTSTARTED
        assert released.attempts == 0
        assert released.worker is None
    successor = spawn_worker(concurrency=4, foo_seconds=0.1)
    for task in tasks:
        done = await wait_for_state(store, task.id, State.COMPLETE)
        assert done.attempts == 1
        assert done.worker == successor.worker_id
    assert leaving.stdout_lines() == []


async def test_sigterm_lets_short_tasks_finish(store: Store, spawn_worker: Spawn) -> None:
    worker = spawn_worker(concurrency=4, foo_seconds=1.5, shutdown_grace=20)
    await wait_until_started(worker)
    tasks = await create_many(store, [TaskType.FOO] * 2)
    for task in tasks:
        await wait_for_state(store, task.id, State.STARTED)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    for task in tasks:
        assert (await store.tasks.get(task.id)).state is State.COMPLETE
    assert sorted(worker.stdout_lines()) == sorted(f"Foo {t.id}" for t in tasks)


async def test_deleting_a_running_task_stops_it_within_a_heartbeat(
    store: Store, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(concurrency=2, foo_seconds=30.0)
    await wait_until_started(worker)
    task = (await create_many(store, [TaskType.FOO]))[0]
    await wait_for_state(store, task.id, State.STARTED)
    await store.tasks.delete(task.id)
    deleted_at = time.monotonic()

    async def stopped() -> bool:
        return f"task {task.id} lease lost" in worker.stderr()

    await eventually(stopped, within=5)
    # Heartbeat interval 0.5 s in tests; allow for a loaded machine.
    assert time.monotonic() - deleted_at < 3
    await asyncio.sleep(0.6)
    assert await store.db.tasks.count_documents({"_id": ObjectId(task.id)}) == 0
    assert worker.stdout_lines() == []
    assert worker.alive()


async def test_skewed_clocks_neither_start_early_nor_recover_live_tasks(
    store: Store, spawn_worker: Spawn
) -> None:
    # Busy with one long task, so the due task below must go to a skewed worker.
    honest = spawn_worker(concurrency=1, foo_seconds=8.0)
    await wait_until_started(honest)
    live = (await create_many(store, [TaskType.FOO]))[0]
    await wait_for_state(store, live.id, State.STARTED)
    ahead = spawn_worker(concurrency=2, clock_skew=600)
    behind = spawn_worker(concurrency=2, clock_skew=-600)
    for worker in (ahead, behind):
        await wait_until_started(worker)
    future = await store.tasks.create(
        task_type=TaskType.BAZ, run_at=store.clock.now() + timedelta(minutes=5), max_attempts=1
    )
    due = (await create_many(store, [TaskType.BAZ]))[0]
    # The slow clock's worker must still take due work on time.
    assert (await wait_for_state(store, due.id, State.COMPLETE, within=5)).worker in {
        ahead.worker_id,
        behind.worker_id,
    }
    done = await wait_for_state(store, live.id, State.COMPLETE, within=30)
    assert done.attempts == 1
    assert done.errors == ()
    assert done.worker == honest.worker_id
    assert (await store.tasks.get(future.id)).state is State.NOTSTARTED
    for worker in (ahead, behind):
        assert "off the database clock by" in worker.stderr()
        assert "recovered" not in worker.stderr()


async def test_bar_retries_with_backoff_then_completes(
    store: Store, spawn_worker: Spawn, http_stub: StubHttpServer
) -> None:
    http_stub.drop_first = 2
    http_stub.status = 500
    spawn_worker(bar_url=http_stub.url)
    task = (await create_many(store, [TaskType.BAR], max_attempts=3))[0]
    done = await wait_for_state(store, task.id, State.COMPLETE)
    assert done.attempts == 3
    assert done.output == "500"
    assert [e.attempt for e in done.errors] == [1, 2]
    assert all("ServerDisconnected" in e.error for e in done.errors)
    first, second = done.errors[0].at, done.errors[1].at
    assert first is not None and second is not None and first < second
    assert http_stub.requests == 3


async def test_bar_that_never_answers_fails_after_max_attempts(
    store: Store, spawn_worker: Spawn, http_stub: StubHttpServer
) -> None:
    http_stub.hang = True
    spawn_worker(bar_url=http_stub.url, bar_timeout=0.3)
    task = (await create_many(store, [TaskType.BAR], max_attempts=2))[0]
    failed = await wait_for_state(store, task.id, State.FAILED)
    assert failed.attempts == 2
    assert len(failed.errors) == 2
    assert all("TimeoutError" in e.error for e in failed.errors)
    assert failed.error == failed.errors[-1].error
    assert failed.output is None
    assert http_stub.requests == 2
