"""Results finished together are written in one bulk_write of fenced updates: a burst costs
fewer result writes than tasks, a lost lease in a batch drops only its own result, and a
result alone goes out at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest

from service.config import Settings
from service.models import State, Task, TaskType
from service.plugins import load_registry
from service.store import Store, new_lease
from service.worker.execution import Outcome
from service.worker.process import http_session
from service.worker.results import GATHER, HOLD, SPREAD, Pace, ResultWriter
from service.worker.worker import Worker
from tests.helpers import CommandLog, eventually
from tests.test_budget import run_worker


@pytest.fixture
def logged(watched: tuple[Store, CommandLog]) -> tuple[Store, CommandLog]:
    """test_budget's store whose client logs every command, recording from the start."""
    watched[1].recording = True
    return watched


def result_writes(log: CommandLog) -> list[list[dict[str, Any]]]:
    """The update commands on the tasks that wrote results: the updates of each."""
    return [
        command["updates"]
        for name, command, _ in log.done
        if name == "update"
        and command.get("update") == "tasks"
        and "lease" in command["updates"][0]["q"]
        and "_id" in command["updates"][0]["q"]
        and isinstance(command["updates"][0]["u"], dict)
        and "$set" in command["updates"][0]["u"]
    ]


async def claim(store: Store, count: int) -> list[Task]:
    for _ in range(count):
        await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    claimed = [await store.claims.claim("w", lease=new_lease()) for _ in range(count)]
    assert all(task is not None for task in claimed)
    return [task for task in claimed if task is not None]


async def test_a_burst_writes_its_results_in_fewer_commands_than_tasks_each_once(
    logged: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    worker_store, log = logged
    tasks = 200
    for _ in range(tasks):
        await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    log.done.clear()
    worker, running = await run_worker(worker_store, settings)

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == tasks

    await eventually(all_complete)
    worker.stop()
    await running
    writes = result_writes(log)
    written = Counter(str(update["q"]["_id"]) for updates in writes for update in updates)
    sizes = Counter(len(updates) for updates in writes)
    print(f"{tasks} tasks: {len(writes)} result writes, batch sizes {dict(sorted(sizes.items()))}")
    assert len(written) == tasks and set(written.values()) == {1}, written
    assert len(writes) <= tasks * 0.6, sizes
    async for doc in store.db.tasks.find({}):
        assert doc["state"] == "COMPLETE" and doc["attempts"] == 1, doc


async def test_a_lost_lease_in_a_batch_drops_its_result_alone_and_logs_it(
    logged: tuple[Store, CommandLog],
    store: Store,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker_store, log = logged
    claimed = await claim(worker_store, 5)
    deleted, taken = claimed[1], claimed[3]
    await store.db.tasks.delete_one({"_id": deleted.key})
    await store.db.tasks.update_one({"_id": taken.key}, {"$set": {"lease": new_lease()}})
    http = http_session()
    async with http:
        worker = Worker(worker_store, settings, registry=load_registry(), http=http)
        log.done.clear()
        with caplog.at_level(logging.INFO, logger="service.worker.execution"):
            await asyncio.gather(
                *(
                    worker.executor.finish(task, Outcome(time.monotonic(), output="done"))
                    for task in claimed
                )
            )
    assert [len(updates) for updates in result_writes(log)] == [5]
    dropped = [r for r in caplog.records if "lease lost, result dropped" in r.getMessage()]
    assert sorted(r.getMessage().split()[1] for r in dropped) == sorted([deleted.id, taken.id])
    for task in claimed:
        doc = await store.db.tasks.find_one({"_id": task.key})
        if task is deleted:
            assert doc is None
        elif task is taken:
            assert doc is not None and doc["state"] == "STARTED", doc
        else:
            assert doc is not None and doc["state"] == "COMPLETE", doc
            assert doc["output"] == "done", doc


async def test_a_batch_retried_after_a_lost_reply_counts_what_landed(store: Store) -> None:
    # The first try landed but its reply was lost; the retry matches nothing and finds each
    # lease in its target state: written, once.
    claimed = await claim(store, 3)
    finishes = [
        store.claims.completion(claimed[0], "a"),
        store.claims.failure(claimed[1], "boom", retry_at=None),
        store.claims.failure(claimed[2], "again", retry_at=store.clock.now()),
    ]
    assert await store.claims.finish_many(finishes) == [True, True, True]
    assert await store.claims.finish_many(finishes) == [True, True, True]
    states = [(await store.tasks.get(task.id)).state for task in claimed]
    assert states == [State.COMPLETE, State.FAILED, State.NOTSTARTED]
    errors = (await store.db.tasks.find_one({"_id": claimed[1].key}) or {})["errors"]
    assert len(errors) == 1, errors


async def test_a_result_alone_goes_at_once_and_those_behind_a_write_gather(
    logged: tuple[Store, CommandLog],
) -> None:
    store, log = logged
    claimed = await claim(store, 6)
    log.done.clear()

    async def write(tasks: list[Task]) -> list[bool]:
        """Write the first result, and the others once it is in flight (a fresh writer)."""
        writer = ResultWriter(store.claims, backoff_cap=1.0, gather=2.0, most=2)
        first = asyncio.create_task(writer.write(store.claims.completion(tasks[0], "x")))
        await asyncio.sleep(0)
        behind = asyncio.gather(
            *(writer.write(store.claims.completion(task, "x")) for task in tasks[1:])
        )
        written = [await first, *await behind]
        await writer.stop()
        return written

    began = time.monotonic()
    assert await write(claimed[:1]) == [True]  # nothing held it for the gathering delay
    assert await write(claimed[1:4]) == [True] * 3  # two behind: a full batch, sent at once
    assert time.monotonic() - began < 1.5
    began = time.monotonic()
    assert await write(claimed[4:]) == [True] * 2  # one behind waits for company
    assert time.monotonic() - began >= 1.9
    assert [len(updates) for updates in result_writes(log)] == [1, 1, 2, 1, 1]


def test_the_window_widens_to_a_steady_pace_within_the_hold_and_a_trickle_waits_gather() -> None:
    pace = Pace(gather=GATHER, hold=HOLD)
    assert pace.window() == GATHER  # nothing known of the pace
    now = 100.0
    for _ in range(20):  # a backlog drained on a slow database: results 50 ms apart
        pace.note(now)
        now += 0.05
    assert pace.window() == pytest.approx(SPREAD * 0.05)
    pace.note(now + 5.0)  # a pause: the pace is a trickle again at once
    assert pace.window() == GATHER
    fast = Pace(gather=GATHER, hold=HOLD)
    for n in range(20):  # a millisecond apart (MongoDB): GATHER waits for many
        fast.note(n * 0.001)
    assert fast.window() == GATHER
    slow = Pace(gather=GATHER, hold=HOLD)
    for n in range(20):  # a trickle, each result on its own
        slow.note(n * HOLD / 2)
    assert slow.window() == GATHER


async def test_results_at_a_steady_pace_slower_than_gather_still_go_together(
    logged: tuple[Store, CommandLog],
) -> None:
    # Twelve results 50 ms apart, as a worker draining a backlog on a slow database sends
    # them: the window follows the pace (a hold of 2 s, so that a busy machine's slower
    # pace still counts as steady), and they take fewer writes than results.
    store, log = logged
    claimed = await claim(store, 12)
    log.done.clear()
    writer = ResultWriter(store.claims, backoff_cap=1.0, hold=2.0)
    writes = []
    for task in claimed:
        writes.append(asyncio.create_task(writer.write(store.claims.completion(task, "x"))))
        await asyncio.sleep(0.05)
    assert await asyncio.gather(*writes) == [True] * 12
    await writer.stop()
    sizes = [len(updates) for updates in result_writes(log)]
    assert sum(sizes) == 12 and len(sizes) <= 8, sizes


async def test_stopping_the_writer_abandons_what_is_pending(store: Store) -> None:
    [task] = await claim(store, 1)
    writer = ResultWriter(store.claims, backoff_cap=1.0)
    pending = asyncio.create_task(writer.write(store.claims.completion(task, "x")))
    await asyncio.sleep(0)
    await writer.stop()
    with pytest.raises(asyncio.CancelledError):
        await pending
