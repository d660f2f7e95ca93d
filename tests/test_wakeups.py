"""Wake-ups: a due task starts on time, every time; the earliest-run_at look-up and the
change stream consider only the worker's types and skip documents without a date; the
watcher always stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from bson import ObjectId

from service.clock import DbClock
from service.config import Settings
from service.models import TaskType
from service.plugins import load_registry
from service.store import Store, open_client
from service.worker.process import http_session
from service.worker.wakeups import WakeUps
from service.worker.worker import Worker
from tests.helpers import (
    NothingWaiting,
    SteppedClock,
    WorkerProcess,
    eventually,
    wait_until_started,
)

SLOT = 0.150  # seconds between two tasks' run_at


async def test_tasks_created_through_the_api_each_start_on_time(
    api: TestClient[Any, Any], store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # Forty tasks due 3 s ahead at 150 ms spacing, one idle worker (production poll
    # interval, so a task that waits for the safety poll shows). Accounting that drifted
    # started most of them one slot late and the last one at the next poll.
    worker = spawn_worker(max_poll_interval=5.0)
    await wait_until_started(worker)
    await asyncio.sleep(1.0)  # first look done, stream open: idle
    count = 40
    start = store.clock.surely_now() + timedelta(seconds=3)
    for i in range(count):
        run_at = start + timedelta(seconds=i * SLOT)
        response = await api.post("/tasks", json={"type": "baz", "run_at": run_at.isoformat()})
        assert response.status == 201, await response.text()

    async def all_complete() -> bool:
        assert worker.alive(), worker.stderr()
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == count

    await eventually(all_complete, within=30)
    docs = [doc async for doc in store.db.tasks.find({}).sort("run_at", 1)]
    lags = [(doc["started_at"] - doc["run_at"]).total_seconds() for doc in docs]
    print("lags (ms):", [round(lag * 1000) for lag in lags])
    assert all(lag >= 0 for lag in lags), lags
    # What drifting bookkeeping does: most tasks a slot late, or some left to the next
    # safety poll (5 s). A loaded machine may stall the database for a moment (the server
    # stamps started_at when it runs the claim), so one stall may make a few tasks late by
    # up to a second; none waits for the poll, and the typical task starts within a slot.
    polled = [(i, round(lag * 1000)) for i, lag in enumerate(lags) if lag >= 1.0]
    assert not polled, f"left to the safety poll (index, ms): {polled}"
    late = [(i, round(lag * 1000)) for i, lag in enumerate(lags) if lag >= SLOT]
    assert statistics.median(lags) < SLOT / 3, f"started a slot late or more: {late}"
    assert len(late) <= count // 4, f"started a slot late or more (index, ms): {late}"


def malformed_waiting(now: datetime) -> list[dict[str, Any]]:
    """NOTSTARTED documents nobody can schedule: run_at missing or not a date."""
    base = {"state": "NOTSTARTED", "type": "baz", "attempts": 0, "max_attempts": 1}
    return [
        {"_id": ObjectId(), **base},
        {"_id": ObjectId(), **base, "run_at": None},
        {"_id": ObjectId(), **base, "run_at": "2020-01-01T00:00:00Z"},
        {"_id": ObjectId(), **base, "run_at": 1_700_000_000},
        {"_id": ObjectId(), **base, "run_at": 1.5},
        {"_id": ObjectId(), **base, "run_at": {"$date": "soon"}},
        {"_id": "a-string-id", **base, "run_at": "tomorrow"},
    ]


async def test_the_look_up_ignores_undated_documents_and_other_types(store: Store) -> None:
    now = store.clock.surely_now()
    past = now - timedelta(days=365 * 30)
    await store.db.tasks.insert_many(malformed_waiting(now))
    assert await store.watch.earliest_waiting(after=past, types=["baz"]) == []
    assert await store.watch.earliest_waiting(after=past) == []
    qux = ObjectId()
    await store.db.tasks.insert_one(
        {"_id": qux, "state": "NOTSTARTED", "type": "qux", "run_at": now, "attempts": 0}
    )
    assert await store.watch.earliest_waiting(after=past, types=["baz"]) == []
    assert await store.watch.earliest_waiting(after=past) == [(qux, now)]
    later = await store.tasks.create(
        task_type=TaskType.BAZ, run_at=now + timedelta(seconds=60), max_attempts=1
    )
    latest = await store.tasks.create(
        task_type=TaskType.BAZ, run_at=now + timedelta(seconds=90), max_attempts=1
    )
    expected = [(ObjectId(later.id), later.run_at), (ObjectId(latest.id), latest.run_at)]
    assert await store.watch.earliest_waiting(after=past, types=["baz", "foo"], limit=5) == expected
    assert await store.watch.earliest_waiting(after=past, limit=2) == [(qux, now), expected[0]]
    # From a time on: what waits before it (not claimed: not this worker's to claim) is left out.
    assert await store.watch.earliest_waiting(after=now + timedelta(seconds=1)) == expected[:1]
    assert later.run_at is not None
    after_later = later.run_at + timedelta(milliseconds=1)
    assert await store.watch.earliest_waiting(after=after_later) == expected[1:]


async def test_the_stream_skips_undated_documents_and_other_types(store: Store) -> None:
    opened = asyncio.Event()
    seen: list[tuple[Any, datetime | None]] = []

    async def listen() -> None:
        announced = store.watch.announcements(types=["baz"], max_await=0.5, on_open=opened.set)
        async for wakeup in announced:
            seen.append((wakeup.id, wakeup.run_at))

    listener = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await opened.wait()
        now = store.clock.surely_now()
        await store.db.tasks.insert_many(malformed_waiting(now))
        await store.db.tasks.insert_one(
            {"_id": ObjectId(), "state": "NOTSTARTED", "type": "qux", "run_at": now}
        )
        # Back to NOTSTARTED with a run_at that is not a date: skipped too.
        await store.db.tasks.update_many(
            {"type": "baz"}, {"$set": {"state": "NOTSTARTED", "run_at": "later"}}
        )
        good = await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
        # A release: back to NOTSTARTED without a run_at, due as it was.
        await store.db.tasks.update_one(
            {"_id": ObjectId(good.id)}, {"$set": {"state": "STARTED", "lease": "x"}}
        )
        await store.db.tasks.update_one(
            {"_id": ObjectId(good.id)}, {"$set": {"state": "NOTSTARTED"}}
        )

        async def both_seen() -> bool:
            assert not listener.done() or listener.result() is None
            return len(seen) >= 2

        await eventually(both_seen, within=10)
        await asyncio.sleep(0.5)  # nothing else comes
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    assert seen == [(ObjectId(good.id), good.run_at), (ObjectId(good.id), None)]


async def test_a_worker_stays_up_beside_undated_documents(
    store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    await store.db.tasks.insert_many(malformed_waiting(store.clock.surely_now()))
    worker = spawn_worker()
    await wait_until_started(worker)
    task = await store.tasks.create(
        task_type=TaskType.BAZ,
        run_at=store.clock.surely_now() + timedelta(seconds=1),
        max_attempts=1,
    )

    async def complete() -> bool:
        assert worker.alive(), worker.stderr()
        return (await store.tasks.get(task.id)).state == "COMPLETE"

    await eventually(complete, within=20)
    await asyncio.sleep(2.5)  # a couple of safety polls: each looks the documents up
    assert worker.alive(), worker.stderr()
    assert "Traceback" not in worker.stderr(), worker.stderr()


class LosesACancellation(Store):
    """A change stream whose read loses the first cancellation, as a read can inside the
    driver: on Python 3.11 `asyncio.wait_for` (which the driver's send uses) returns
    normally when it is cancelled just as its operation completes."""

    async def wakeups(
        self,
        *,
        types: Any = None,
        max_await: float,
        on_open: Callable[[], None],
        ready: asyncio.Event | None = None,
        gather: float = 0.0,
    ) -> AsyncIterator[tuple[Any, datetime | None]]:
        on_open()
        lost = False
        while True:
            try:
                await asyncio.sleep(max_await)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True
            if False:  # an async generator that yields nothing
                yield None, None


async def test_a_worker_stops_even_if_its_stream_read_loses_a_cancellation(
    settings: Settings,
) -> None:
    assert settings.mongodb_url is not None
    client = open_client(settings.mongodb_url, timeout=settings.db_timeout, appname="tests")
    store = LosesACancellation(client, database=settings.database, clock=DbClock())
    await store.sync_clock()
    try:
        async with http_session() as http:
            quick = dataclasses.replace(
                settings, bar_url="http://127.0.0.1:9/", bar_timeout=1, foo_seconds=0
            )
            for _ in range(3):
                worker = Worker(store, quick, registry=load_registry(), http=http, worker_id="stop")
                running = asyncio.create_task(worker.run())
                await asyncio.sleep(0.3)
                began = time.monotonic()
                worker.stop()
                done, _ = await asyncio.wait({running}, timeout=15)
                assert running in done, "the worker hung stopping its change-stream watcher"
                running.result()
                assert time.monotonic() - began < 8
    finally:
        await client.drop_database(settings.database)
        await client.close()


async def test_a_task_that_comes_due_between_the_check_and_the_wait_is_not_left_to_the_poll() -> (
    None
):
    # due() and wait() read the clock one after the other: a run_at whose millisecond the
    # clock passed between the two was not due for the one and already past for the other,
    # which then slept until the safety poll (seen as tasks 13-39 of the test above started
    # together 4 s late under load).
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock = SteppedClock(start)
    wakeups = WakeUps(
        NothingWaiting(),  # type: ignore[arg-type]
        clock=clock,
        types=["baz"],
        max_poll=5.0,
        change_stream=False,
    )
    assert wakeups.due()  # the first look
    await wakeups.found_nothing()
    run_at = start + timedelta(milliseconds=100)
    wakeups._announce(ObjectId(), run_at)
    clock.at = run_at  # the claim would not find it yet (SecantusDB's $lte)
    assert not wakeups.due()
    clock.at = run_at + timedelta(milliseconds=1)  # ...and now it would
    began = time.monotonic()
    async with asyncio.timeout(1.0):
        await wakeups.wait(free=True)
    assert time.monotonic() - began < 0.1
    assert wakeups.due()
    # With every slot taken, a due task waits for a freed slot's nudge: no spinning.
    wakeups.nudge()
    await wakeups.wait()  # the nudge
    try:
        async with asyncio.timeout(0.2):
            await wakeups.wait()
    except TimeoutError:
        pass
    else:
        raise AssertionError("wait() with full slots returned at once for a due task")
