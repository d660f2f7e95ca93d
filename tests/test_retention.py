"""Retention: finished tasks expire by a TTL index kept in step with the setting, and a
bounded sweep deletes what a TTL monitor left; nothing unfinished is touched."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from service.models import TaskType
from service.store import Store
from service.store.retention import RETENTION_INDEX
from service.worker.retention import Retention
from tests.helpers import WorkerProcess, eventually, wait_until_started


async def index(store: Store) -> dict[str, Any] | None:
    info: dict[str, Any] | None = (await store.db.tasks.index_information()).get(RETENTION_INDEX)
    return info


async def test_the_ttl_index_follows_the_setting(store: Store) -> None:
    # An index of another shape under the name (an earlier build's) is made anew.
    await store.db.tasks.create_index("finished_at", name=RETENTION_INDEX, expireAfterSeconds=9)
    assert await store.retention.ensure(3600) == "created"
    assert (await index(store) or {})["expireAfterSeconds"] == 3600
    assert await store.retention.ensure(3600) == "kept"
    assert await store.retention.ensure(60) == "changed"
    assert (await index(store) or {})["expireAfterSeconds"] == 60
    assert await store.retention.ensure(0) == "dropped"
    assert await index(store) is None
    assert await store.retention.ensure(0) == "none"


async def test_the_sweep_deletes_only_tasks_finished_long_enough_ago(store: Store) -> None:
    now = store.clock.now()
    old = now - timedelta(hours=2)
    finished = [
        {"state": state, "type": "baz", "run_at": old, "finished_at": old}
        for state in ("COMPLETE", "FAILED")
        for _ in range(3)
    ]
    await store.db.tasks.insert_many(finished)
    recent = await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    await store.db.tasks.update_one(
        {"_id": recent.key}, {"$set": {"state": "COMPLETE", "finished_at": now}}
    )
    waiting = await store.tasks.create(task_type=TaskType.FOO, run_at=old, max_attempts=1)
    # Waiting, yet with a finished_at (a person or a migration wrote it): not finished work.
    odd = {"state": "NOTSTARTED", "type": "baz", "run_at": old, "finished_at": old}
    odd_key = (await store.db.tasks.insert_one(odd)).inserted_id

    sweep = Retention(store.retention, clock=store.clock, retention=3600, grace=0)
    assert await sweep.run_once() == 6
    assert await sweep.run_once() == 0
    left = {str(doc["_id"]) async for doc in store.db.tasks.find({})}
    assert left == {recent.id, waiting.id, str(odd_key)}
    assert await Retention(store.retention, clock=store.clock, retention=0).run_once() == 0


async def test_the_servers_ttl_monitor_expires_finished_tasks(store: Store) -> None:
    # The real thing, not our sweep: MongoDB's and SecantusDB's monitors run about once a
    # minute, so this waits up to two sweeps.
    done = await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    now = store.clock.now()
    await store.db.tasks.update_one(
        {"_id": done.key}, {"$set": {"state": "COMPLETE", "finished_at": now}}
    )
    waiting = await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    await store.db.tasks.update_one({"_id": waiting.key}, {"$set": {"finished_at": now}})
    await Retention(store.retention, clock=store.clock, retention=1).ensure()

    async def expired() -> bool:
        return await store.db.tasks.count_documents({"_id": done.key}) == 0

    await eventually(expired, within=150, interval=1.0)
    # Only finished tasks expire, whatever else carries a finished_at.
    assert await store.db.tasks.count_documents({"_id": waiting.key}) == 1


async def test_a_worker_sets_the_ttl_index_from_its_setting(
    store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(retention=120)
    await wait_until_started(worker)

    async def indexed() -> bool:
        return (await index(store) or {}).get("expireAfterSeconds") == 120

    await eventually(indexed, within=20)
    assert "retention index created: finished tasks are kept for 120s" in worker.stderr()
