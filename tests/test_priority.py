"""Priorities: among due tasks the higher is claimed first, then the earlier run_at, then
the id; a task due now is never held back by a higher one still waiting; tasks written
before priorities existed count as 0. With the store and with real worker processes.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from bson import ObjectId

from service.models import State, Task, TaskType
from service.store import Store, new_lease
from tests.helpers import WorkerProcess, all_tasks, eventually, wait_until_started

Spawn = Callable[..., WorkerProcess]
Client = TestClient[Any, Any]


async def create(store: Store, priority: int, *, in_seconds: float = 0) -> str:
    run_at = None if in_seconds == 0 else store.clock.now() + timedelta(seconds=in_seconds)
    task = await store.tasks.create(
        task_type=TaskType.FOO, run_at=run_at, max_attempts=1, priority=priority
    )
    return task.id


async def claim_all(store: Store) -> list[str]:
    claimed: list[str] = []
    while (task := await store.claims.claim("w", lease=new_lease())) is not None:
        claimed.append(task.id)
    return claimed


async def test_the_higher_priority_is_claimed_first_then_the_earlier_run_at(
    store: Store,
) -> None:
    low = await create(store, -10)
    normal_first = await create(store, 0)
    high = await create(store, 5)
    normal_second = await create(store, 0)
    highest_in_an_hour = await create(store, 10, in_seconds=3600)
    higher_second = await create(store, 5)
    # Due a second ago: earlier run_at than the two 0s, so it goes first among them.
    normal_earliest = await store.db.tasks.insert_one(
        {
            "_id": ObjectId(),
            "type": "foo",
            "state": State.NOTSTARTED.value,
            "run_at": store.clock.now() - timedelta(seconds=1),
            "attempts": 0,
            "max_attempts": 1,
            "priority": 0,
        }
    )
    claimed = await claim_all(store)
    assert claimed == [
        high,
        higher_second,
        str(normal_earliest.inserted_id),
        normal_first,
        normal_second,
        low,
    ]
    # A task due now is never held back by a higher one that is not due yet.
    assert (await store.tasks.get(highest_in_an_hour)).state is State.NOTSTARTED


async def test_tasks_written_before_priorities_count_as_zero(store: Store) -> None:
    def earlier_version(seconds_ago: float, state: State = State.NOTSTARTED) -> dict[str, object]:
        return {
            "_id": ObjectId(),
            "type": "foo",
            "state": state.value,
            "run_at": store.clock.now() - timedelta(seconds=seconds_ago),
            "attempts": 0,
            "max_attempts": 1,
        }

    old = [earlier_version(30), earlier_version(20)]
    running = earlier_version(40, State.STARTED)
    done = earlier_version(50, State.COMPLETE)
    await store.db.tasks.insert_many([*old, running, done])
    newer = await create(store, 0)
    lower = await create(store, -1)
    # Without a priority, a descending index puts them after -1: what the start-up fixes.
    await store.ensure_indexes()
    assert await claim_all(store) == [str(old[0]["_id"]), str(old[1]["_id"]), newer, lower]
    stored = {doc["_id"]: doc async for doc in store.db.tasks.find({})}
    assert stored[running["_id"]]["priority"] == 0  # it may be retried: it waits fairly too
    assert "priority" not in stored[done["_id"]]  # finished history is left as it is
    # Idempotent: a second start changes nothing.
    result = await store.db.tasks.count_documents({"priority": {"$exists": False}})
    await store.ensure_indexes()
    assert await store.db.tasks.count_documents({"priority": {"$exists": False}}) == result == 1


async def test_the_api_takes_and_shows_priority(api: Client) -> None:
    response = await api.post("/tasks", json={"type": "foo", "priority": 7})
    assert response.status == 201
    assert (await response.json())["priority"] == 7
    for wrong in (11, -11, 1.5, "1", True, None):
        response = await api.post("/tasks", json={"type": "foo", "priority": wrong})
        assert response.status == 400, wrong
    response = await api.post("/tasks", json={"type": "foo"})
    assert (await response.json())["priority"] == 0


# -- real worker processes -------------------------------------------------------------


def started_order(tasks: list[Task]) -> list[Task]:
    return sorted(tasks, key=lambda t: (t.started_at or datetime.max, t.id))


async def run_to_completion(store: Store, workers: list[WorkerProcess], count: int) -> list[Task]:
    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": State.COMPLETE.value}) == count

    await eventually(all_complete, within=120)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0] * len(workers)
    return [t for t in await all_tasks(store) if t.state is State.COMPLETE]


async def test_one_worker_runs_due_tasks_in_priority_order(
    store: Store, spawn_worker: Spawn
) -> None:
    # All due before the worker starts; one slot, so each claim picks among all that wait.
    priorities = [random.randint(-10, 10) for _ in range(10)] + [0, 0, 10, -10]
    random.shuffle(priorities)
    created = [await create(store, p) for p in priorities]
    waiting = await create(store, 10, in_seconds=3600)
    # Higher priority first, then creation order (run_at, then the id).
    order = sorted(range(len(created)), key=lambda n: (-priorities[n], n))
    expected = [created[n] for n in order]
    worker = spawn_worker(concurrency=1)
    done = await run_to_completion(store, [worker], len(created))
    assert [t.id for t in started_order(done)] == expected
    assert (await store.tasks.get(waiting)).state is State.NOTSTARTED


async def test_three_workers_start_the_highest_priorities_first(
    store: Store, spawn_worker: Spawn
) -> None:
    priorities = [random.randint(-10, 10) for _ in range(30)]
    created = dict(zip([await create(store, p) for p in priorities], priorities, strict=True))
    # The claims in the order the database applied them, from a change stream: started_at
    # is stamped as a claim arrives, so of two claims in flight at once, the one stamped
    # later may be applied first and take the higher priority.
    claimed = {
        "$or": [
            {"operationType": "update", "updateDescription.updatedFields.state": "STARTED"},
            {"operationType": "replace", "fullDocument.state": "STARTED"},
        ]
    }
    claims: list[str] = []
    async with await store.db.tasks.watch([{"$match": claimed}], max_await_time_ms=500) as stream:
        workers = [spawn_worker(concurrency=2) for _ in range(3)]
        for worker in workers:
            await wait_until_started(worker)

        async def all_claimed() -> bool:
            change = await stream.try_next()
            if change is not None:
                claims.append(str(change["documentKey"]["_id"]))
            return len(claims) >= len(created)

        await eventually(
            all_claimed, within=120, interval=0, what=lambda: f"every claim; seen {claims}"
        )
    done = await run_to_completion(store, workers, len(created))
    assert sorted(claims) == sorted(created)
    # Every claim, whichever worker sent it, took the highest priority left.
    in_order = [created[task_id] for task_id in claims]
    assert in_order == sorted(in_order, reverse=True), in_order
    assert len({t.worker for t in done}) >= 2
