"""No herd: a task created into several idle worker processes is tried by one of them (its
owner by rendezvous hashing over the registry), the others only if it is still waiting a
moment later; an owner that is frozen or dead strands nothing."""

from __future__ import annotations

import asyncio
import signal
import statistics
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from bson import ObjectId

from service.localdb import free_port
from service.models import State, TaskType
from service.store import Store
from service.store.streams import Announcement
from service.worker.owners import HANDOFF, rank
from service.worker.wakeups import WakeUps
from tests.helpers import (
    NothingWaiting,
    SteppedClock,
    WorkerProcess,
    all_tasks,
    completions,
    eventually,
    wait_until_started,
)


async def claims_sent(ports: list[int]) -> int:
    """The findAndModify commands the workers have sent, from their /metrics."""
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            for line in text.splitlines():
                if line.startswith("task_runner_worker_database_commands_total{") and (
                    'command="findAndModify"' in line
                ):
                    total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def registered(store: Store, workers: list[WorkerProcess]) -> None:
    """Wait until every worker is in the registry (and, a moment on, idle and listening)."""

    async def listed() -> bool:
        for worker in workers:
            assert worker.alive(), worker.stderr()
        seen = {w.id for w in await store.workers.seen(60)}
        return seen >= {w.worker_id for w in workers}

    await eventually(listed, within=30)
    await asyncio.sleep(1.5)


async def create_one_by_one(store: Store, count: int) -> list[str]:
    """Create `count` Baz tasks due now, 100 ms apart (each into idle workers)."""
    ids = []
    for _ in range(count):
        task = await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
        ids.append(task.id)
        await asyncio.sleep(0.1)
    return ids


async def all_complete(store: Store, count: int, workers: list[WorkerProcess]) -> None:
    async def done() -> bool:
        return await store.db.tasks.count_documents({"state": State.COMPLETE.value}) == count

    await eventually(done, within=60, what=lambda: "\n".join(w.stderr()[-3000:] for w in workers))


async def test_a_task_created_into_four_idle_workers_is_claimed_about_once(
    store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    ports = [free_port() for _ in range(4)]
    workers = [spawn_worker(metrics_port=port) for port in ports]
    for worker in workers:
        await wait_until_started(worker)
    await registered(store, workers)
    before = await claims_sent(ports)
    count = 40
    await create_one_by_one(store, count)
    await all_complete(store, count, workers)
    claims = await claims_sent(ports) - before
    # Before: every idle worker tried every task (4 claims a task, 3 of them empty). Now
    # the owner claims; the others only when the claim's announcement is late (a busy
    # machine), and a safety poll (every second here) may try once more.
    assert claims <= 1.5 * count + 5, f"{claims} claims for {count} tasks"
    tasks = await all_tasks(store)
    assert all(task.attempts == 1 for task in tasks)
    assert set(completions(workers).values()) == {1}
    # The owners are spread over the workers, and an owner claims at once.
    by_worker = Counter(task.worker for task in tasks)
    assert len(by_worker) >= 2, by_worker
    lags = [(t.started_at - t.run_at).total_seconds() for t in tasks if t.started_at and t.run_at]
    assert statistics.median(lags) < HANDOFF, sorted(lags)


class OwnedElsewhere:
    """Owners that make this worker the runner-up for every task."""

    worker_id = "me"

    async def refresh(self) -> None:
        pass

    def delay(self, task_id: str, task_type: str | None) -> float:
        return HANDOFF


async def test_a_task_another_worker_owns_is_tried_after_the_hand_off_unless_claimed() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock = SteppedClock(start)
    wakeups = WakeUps(
        NothingWaiting(),  # type: ignore[arg-type]
        clock=clock,
        types=["baz"],
        max_poll=60.0,
        change_stream=False,
        owners=OwnedElsewhere(),  # type: ignore[arg-type]
    )
    assert wakeups.due()  # the first look
    await wakeups.found_nothing()
    claimed, waiting = ObjectId(), ObjectId()
    await wakeups._heard(Announcement(claimed, start, "baz"))
    clock.at = start + timedelta(seconds=HANDOFF / 2)
    assert not wakeups.due()  # the owner's turn
    await wakeups._heard(Announcement(claimed, None, taken=True))  # the owner claimed it
    clock.at = start + timedelta(seconds=HANDOFF, milliseconds=1)
    assert not wakeups.due()  # never this worker's to try
    await wakeups._heard(Announcement(waiting, clock.at, "baz"))
    clock.at += timedelta(seconds=HANDOFF / 2)
    assert not wakeups.due()
    clock.at += timedelta(seconds=HANDOFF / 2, milliseconds=1)
    assert wakeups.due()  # not claimed by its owner: this worker's turn
    await wakeups.found_nothing()  # ...but the claim found nothing: forgotten
    clock.at = start + timedelta(seconds=10)
    assert not wakeups.due()
    # Heard late (the worker was busy), a task is still left to its owner for the hand-off.
    await wakeups._heard(Announcement(ObjectId(), start, "baz"))
    assert not wakeups.due()
    clock.at += timedelta(seconds=HANDOFF, milliseconds=1)
    assert wakeups.due()


def test_each_task_has_one_owner_and_the_owners_are_spread() -> None:
    workers = [f"host-{n}:{100 + n}" for n in range(4)]
    tasks = [f"{n:024x}" for n in range(2000)]
    firsts: Counter[str] = Counter()
    for task in tasks:
        ranks = sorted(rank(w, task, workers) for w in workers)
        assert ranks == [0, 1, 2, 3]  # one owner, one runner-up, the same in every process
        firsts.update(w for w in workers if rank(w, task, workers) == 0)
    assert all(350 < firsts[w] < 650 for w in workers), firsts  # about 500 each
    # A worker that is not listed (full, or not seen yet) comes after every listed one.
    assert rank("elsewhere:1", tasks[0], workers) == 4
    # When one leaves, the others keep what they owned and share out its tasks.
    moved = [t for t in tasks if rank(workers[1], t, workers[1:]) == 0]
    assert set(moved) >= {t for t in tasks if rank(workers[1], t, workers) == 0}
    assert len(moved) < len(tasks) // 2


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGKILL], ids=["frozen", "killed"])
async def test_the_tasks_of_a_frozen_or_dead_owner_are_claimed_by_the_others(
    store: Store, spawn_worker: Callable[..., WorkerProcess], stop: signal.Signals
) -> None:
    # The stopped worker stays listed as alive for the stale threshold (30 s) and the
    # safety poll comes every 30 s: within the test, only the hand-off claims its tasks.
    slow = {"stale_after": 30.0, "heartbeat_interval": 1.0, "max_poll_interval": 30.0}
    workers = [spawn_worker(**slow) for _ in range(3)]
    for worker in workers:
        await wait_until_started(worker)
    await registered(store, workers)
    gone, alive = workers[0], workers[1:]
    gone.signal(stop)
    count = 24
    began = asyncio.get_running_loop().time()
    ids = await create_one_by_one(store, count)
    await all_complete(store, count, alive)
    # Well before the stale threshold or a safety poll could have claimed them.
    assert asyncio.get_running_loop().time() - began < 25
    everyone = [w.worker_id for w in workers]
    orphans = {i for i in ids if rank(gone.worker_id, i, everyone) == 0}
    assert orphans, "no task fell to the stopped worker: pick more tasks"
    tasks = {task.id: task for task in await all_tasks(store)}
    lags = {
        i: (t.started_at - t.run_at).total_seconds()
        for i, t in tasks.items()
        if t.started_at and t.run_at
    }
    for task_id in orphans:
        task = tasks[task_id]
        assert task.worker != gone.worker_id and task.attempts == 1
        # Not at once (a few ms): after the hand-off, or taken by the claim another task
        # due 100 ms later set off (a claim takes the earliest due).
        assert lags[task_id] >= 0.06, (task_id, lags[task_id])
    owned = [lag for i, lag in lags.items() if i not in orphans]
    assert statistics.median(owned) < HANDOFF, sorted(owned)
    assert set(completions(alive).values()) == {1}
    if stop == signal.SIGSTOP:
        gone.signal(signal.SIGCONT)
