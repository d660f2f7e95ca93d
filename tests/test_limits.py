"""Global per-type concurrency limits (TASK_RUNNER_TYPE_LIMITS) with real worker processes:
a sampler reads the database every 50 ms while workers run, are killed and are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from service.config import Settings, SettingsError
from service.models import State, TaskType
from service.store import Store, new_lease
from tests.helpers import StubHttpServer, WorkerProcess, eventually, wait_until_started

Spawn = Callable[..., WorkerProcess]
LIMIT = 2


class SlowStub(StubHttpServer):
    """Answers every request after `delay` seconds; counts the requests in flight."""

    def __init__(self, *, delay: float) -> None:
        super().__init__(status=200)
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._read_request(reader):
            return
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await self._closing.wait()
            writer.write(b"HTTP/1.1 200 Stub\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self.in_flight -= 1


@pytest.fixture
async def slow_stub() -> AsyncIterator[SlowStub]:
    stub = SlowStub(delay=0.6)
    await stub.start()
    yield stub
    await stub.close()


@dataclass
class Sample:
    at: float
    started: int
    holders: list[str]  # the workers holding Bar's slots


@dataclass
class Sampler:
    """Reads the STARTED Bar tasks and Bar's slots every 50 ms until stopped."""

    store: Store
    samples: list[Sample] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        started = {"state": State.STARTED.value, "type": TaskType.BAR.value}
        while not self.stop.is_set():
            count = await self.store.db.tasks.count_documents(started)
            holders = [str(h.get("worker")) for h in await self.store.slots.holders("bar")]
            self.samples.append(Sample(time.monotonic(), count, holders))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.stop.wait()

    def most_started(self) -> int:
        return max(s.started for s in self.samples)

    def most_holders(self) -> int:
        return max(len(s.holders) for s in self.samples)


@contextlib.asynccontextmanager
async def sampling(store: Store) -> AsyncIterator[Sampler]:
    sampler = Sampler(store)
    running = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        # Stopped by an event, not cancelled: on Python 3.11 the driver can swallow a
        # cancellation that comes as a command completes (see service/worker/wakeups.py), and a
        # sampler that missed it would read for ever.
        sampler.stop.set()
        await running


async def create(store: Store, task_type: TaskType, n: int) -> list[str]:
    return [
        (await store.tasks.create(task_type=task_type, run_at=None, max_attempts=3)).id
        for _ in range(n)
    ]


async def count(store: Store, task_type: TaskType, state: State) -> int:
    return await store.db.tasks.count_documents({"type": task_type.value, "state": state.value})


def limited(**overrides: object) -> dict[str, object]:
    return {"concurrency": 5, "type_limits": f"bar={LIMIT}", **overrides}


# -- the setting ------------------------------------------------------------------------


def test_the_setting_reads_type_equals_a_positive_integer() -> None:
    settings = Settings.from_env({"TASK_RUNNER_TYPE_LIMITS": " Bar=2, foo = 10 "})
    assert settings.limits == {"bar": 2, "foo": 10}
    assert Settings.from_env({}).limits == {}
    for bad in ("bar", "bar=0", "bar=-1", "bar=x", "=2", "bar=2,bar=3", "bar=1.5"):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"TASK_RUNNER_TYPE_LIMITS": bad})
        message = str(caught.value)
        assert "TASK_RUNNER_TYPE_LIMITS" in message and "\n" not in message, message


# -- the slots in the store -------------------------------------------------------------


async def test_concurrent_takers_never_pass_the_limit(store: Store) -> None:
    leases = [new_lease() for _ in range(20)]
    taken = await asyncio.gather(
        *(store.slots.take("bar", limit=3, lease=lease, worker_id="w") for lease in leases)
    )
    assert sum(taken) == 3
    assert len(await store.slots.holders("bar")) == 3
    winner = leases[taken.index(True)]
    await store.slots.free("bar", winner)
    assert await store.slots.take("bar", limit=3, lease=new_lease(), worker_id="w")
    assert not await store.slots.take("bar", limit=3, lease=new_lease(), worker_id="w")


async def test_recovery_frees_only_slots_that_hold_no_started_task(store: Store) -> None:
    running, claimed_nothing = new_lease(), new_lease()
    await store.tasks.create(task_type=TaskType.BAR, run_at=None, max_attempts=3)
    assert await store.slots.take("bar", limit=5, lease=running, worker_id="w")
    assert await store.claims.claim("w", lease=running, types=("bar",)) is not None
    assert await store.slots.take("bar", limit=5, lease=claimed_nothing, worker_id="w")
    # Young slots are never freed: their claim may still be landing.
    assert await store.slots.free_lost(60.0) == 0

    async def freed_one() -> bool:
        # `at` is the clock's estimate, the cutoff what the database has surely reached:
        # a slot taken a few milliseconds ago may not be past it yet.
        return await store.slots.free_lost(0.0) == 1

    await eventually(freed_one, within=5)
    assert await store.slots.free_lost(0.0) == 0
    assert [h["lease"] for h in await store.slots.holders("bar")] == [running]


# -- real processes ---------------------------------------------------------------------


async def test_the_limit_holds_across_workers_and_other_types_flow(
    store: Store, spawn_worker: Spawn, slow_stub: SlowStub
) -> None:
    bars = await create(store, TaskType.BAR, 14)
    async with sampling(store) as sampler:
        workers = [spawn_worker(**limited(bar_url=slow_stub.url)) for _ in range(3)]

        async def limit_reached() -> bool:
            return await count(store, TaskType.BAR, State.STARTED) == LIMIT

        await eventually(limit_reached)
        # Bar tasks wait for a slot; Baz tasks created now run at once all the same.
        began = time.monotonic()
        await create(store, TaskType.BAZ, 10)

        async def baz_done() -> bool:
            return await count(store, TaskType.BAZ, State.COMPLETE) == 10

        await eventually(baz_done, within=10)
        baz_took = time.monotonic() - began
        bars_waiting = await count(store, TaskType.BAR, State.NOTSTARTED)

        async def bar_done() -> bool:
            return await count(store, TaskType.BAR, State.COMPLETE) == len(bars)

        await eventually(bar_done, within=60)
    assert bars_waiting > 0, "Baz tasks should have completed while Bar tasks still waited"
    assert baz_took < 5, baz_took
    assert sampler.most_started() == LIMIT, sampler.most_started()
    assert sampler.most_holders() <= LIMIT
    # Three workers with five free places each would run six Bar tasks at once under a
    # per-worker limit of two: never more than two is the fleet's limit. (Which worker gets
    # a freed slot is not promised: the one that frees it tries again first.)
    assert slow_stub.most_in_flight == LIMIT
    assert all(w.alive() for w in workers)

    async def slots_given_back() -> bool:
        # A slot is given back just after its task's own write, so the last one may still
        # be on its way when the last COMPLETE is seen (CI once caught it in between).
        return await store.slots.holders("bar") == []

    await eventually(slots_given_back, within=1.0)


async def test_a_killed_workers_slot_comes_back_with_recovery(
    store: Store, settings: Settings, spawn_worker: Spawn, slow_stub: SlowStub
) -> None:
    slow_stub.delay = 1.5
    bars = await create(store, TaskType.BAR, 10)
    async with sampling(store) as sampler:
        victim = spawn_worker(**limited(bar_url=slow_stub.url))

        async def victim_holds_a_slot() -> bool:
            holders = await store.slots.holders("bar")
            return any(h.get("worker") == victim.worker_id for h in holders)

        await eventually(victim_holds_a_slot)
        survivors = [spawn_worker(**limited(bar_url=slow_stub.url)) for _ in range(2)]
        victim.kill()
        killed_at = time.monotonic()

        async def slot_back() -> bool:
            return not await victim_holds_a_slot()

        await eventually(slot_back, within=settings.stale_after * 4)
        freed_after = time.monotonic() - killed_at

        async def bar_done() -> bool:
            return await count(store, TaskType.BAR, State.COMPLETE) == len(bars)

        await eventually(bar_done, within=90)
    # Its slot stayed held until its task's heartbeat went stale, then came back.
    assert freed_after >= settings.stale_after - 0.5, freed_after
    assert sampler.most_started() <= LIMIT, sampler.most_started()
    assert sampler.most_holders() <= LIMIT
    # The survivors used both slots after the kill.
    after = [s for s in sampler.samples if s.at > killed_at + freed_after]
    assert max(len(s.holders) for s in after) == LIMIT
    assert all(s.alive() for s in survivors)

    async def all_given_back() -> bool:
        # The last task's give-back follows its result's write: it may land a moment later.
        return await store.slots.holders("bar") == []

    await eventually(all_given_back, within=10)


async def test_a_clean_stop_gives_its_slots_back(
    store: Store, spawn_worker: Spawn, slow_stub: SlowStub
) -> None:
    slow_stub.delay = 30.0
    await create(store, TaskType.BAR, 4)
    worker = spawn_worker(**limited(bar_url=slow_stub.url, shutdown_grace=0.2))
    await wait_until_started(worker)

    async def holds_both() -> bool:
        holders = await store.slots.holders("bar")
        return len(holders) == LIMIT and await count(store, TaskType.BAR, State.STARTED) == LIMIT

    await eventually(holds_both)
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait) == 0
    # At once, not after a stale threshold: the tasks went back, then their slots.
    assert await store.slots.holders("bar") == []
    assert await count(store, TaskType.BAR, State.NOTSTARTED) == 4
    assert "released back to the queue" in worker.stderr()


async def test_a_limited_task_does_not_wait_behind_a_backlog_of_other_types(
    store: Store, spawn_worker: Spawn, slow_stub: SlowStub
) -> None:
    # Unlimited types are claimed in one claim that succeeds as long as a backlog lasts;
    # the limited types are still tried at least once a second meanwhile.
    backlog = 300
    await create(store, TaskType.BAZ, backlog)
    worker = spawn_worker(**limited(bar_url=slow_stub.url))

    async def draining() -> bool:
        return await count(store, TaskType.BAZ, State.COMPLETE) >= 20

    await eventually(draining)
    (bar,) = await create(store, TaskType.BAR, 1)

    async def bar_started() -> bool:
        return (await store.tasks.get(bar)).state is not State.NOTSTARTED

    await eventually(bar_started)
    assert await count(store, TaskType.BAZ, State.NOTSTARTED) > 0, "the backlog was gone first"
    assert worker.alive()
