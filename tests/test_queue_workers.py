"""Queues with real worker processes: pause and resume, a rate across three workers, a
concurrency across workers (one of them SIGKILLed); a sampler reads the database every 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.models import State, TaskType
from service.store import Store
from service.worker.queues import REFRESH
from tests.helpers import WorkerProcess, eventually, wait_until_started

Spawn = Callable[..., WorkerProcess]
# Long enough for every worker to have read a settings change (QueueGate.refresh), with room
# for a busy machine.
ACKNOWLEDGED = REFRESH * 2.5


async def create(store: Store, n: int, *, queue: str, task_type: TaskType = TaskType.BAZ) -> None:
    for _ in range(n):
        await store.tasks.create(task_type=task_type, run_at=None, max_attempts=3, queue=queue)


async def count(store: Store, queue: str, *states: State) -> int:
    query: dict[str, Any] = {"queue": queue, "state": {"$in": [s.value for s in states]}}
    return await store.db.tasks.count_documents(query)


async def stays(predicate: Callable[[], Any], seconds: float) -> None:
    """Check `predicate` every 50 ms for `seconds`: it must hold throughout."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert await predicate()
        await asyncio.sleep(0.05)


@dataclass
class Sampler:
    """Reads a queue's STARTED count every 50 ms until stopped."""

    store: Store
    queue: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            started = await count(self.store, self.queue, State.STARTED)
            self.samples.append((time.monotonic(), started))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.stop.wait()


@contextlib.asynccontextmanager
async def sampling(store: Store, queue: str) -> AsyncIterator[Sampler]:
    sampler = Sampler(store, queue)
    running = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        sampler.stop.set()  # an event, not a cancellation (see tests/test_limits.py)
        await running


async def test_a_paused_queue_starts_nothing_until_resumed(
    store: Store, spawn_worker: Spawn
) -> None:
    await store.queues.put("held", {"paused": True})
    await create(store, 10, queue="held")
    await create(store, 10, queue="default")
    workers = [spawn_worker() for _ in range(2)]

    async def default_done() -> bool:
        return await count(store, "default", State.COMPLETE) == 10

    await eventually(default_done, within=30)

    async def held_waits() -> bool:
        return await count(store, "held", State.NOTSTARTED) == 10

    await stays(held_waits, ACKNOWLEDGED)
    await store.queues.put("held", {"paused": False})

    async def held_done() -> bool:
        return await count(store, "held", State.COMPLETE) == 10

    await eventually(held_done, within=30)

    # Paused again while the workers run: once they have seen it, a new task waits.
    await store.queues.put("held", {"paused": True})
    await asyncio.sleep(ACKNOWLEDGED)
    await create(store, 1, queue="held")
    await create(store, 1, queue="default")

    async def witness_done() -> bool:
        return await count(store, "default", State.COMPLETE) == 11

    await eventually(witness_done, within=30)

    async def new_one_waits() -> bool:
        return await count(store, "held", State.NOTSTARTED) == 1

    await stays(new_one_waits, ACKNOWLEDGED)
    await store.queues.put("held", {"paused": False})

    async def all_done() -> bool:
        return await count(store, "held", State.COMPLETE) == 11

    await eventually(all_done, within=30)
    assert all(w.alive() for w in workers)
    await asyncio.gather(*(wait_until_started(w) for w in workers))
