"""A database outage: the server is stopped mid-run and started again on the same data."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.clock import DbClock
from service.config import Settings
from service.localdb import LocalDatabase, free_port
from service.models import TaskType
from service.store import Store, open_client
from service.web.app import create_app
from tests.helpers import WorkerProcess, completions, eventually, wait_until_started


@pytest.fixture
def own_db(tmp_path: Path) -> Iterator[LocalDatabase]:
    """A SecantusDB server of this test's own, with its data on disk so it can restart."""
    db = LocalDatabase(port=free_port(), path=str(tmp_path / "db"))
    db.start()
    yield db
    db.stop(kill=True)


@pytest.fixture
async def own_store(own_db: LocalDatabase, settings: Settings) -> AsyncIterator[Store]:
    client = open_client(own_db.url, timeout=1.0, appname="tests")
    store = Store(client, database=settings.database, clock=DbClock())
    await store.sync_clock()
    await store.ensure_indexes()
    yield store
    await client.close()


async def test_database_restart_mid_run(
    own_db: LocalDatabase,
    own_store: Store,
    settings: Settings,
    spawn_worker: Callable[..., WorkerProcess],
    aiohttp_client: Any,
) -> None:
    store = own_store
    api = await aiohttp_client(
        create_app(dataclasses.replace(settings, mongodb_url=own_db.url, db_timeout=1.0))
    )
    workers = [
        spawn_worker(mongodb_url=own_db.url, concurrency=5, foo_seconds=0.5, log_level="DEBUG")
        for _ in range(2)
    ]
    for worker in workers:
        await wait_until_started(worker)
    created = [
        await store.tasks.create(task_type=t, run_at=None, max_attempts=3)
        for t in [TaskType.FOO, TaskType.BAZ] * 60
    ]

    async def some_done() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) >= 20

    await eventually(some_done)
    own_db.stop()
    response = await api.get("/health")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "database_unavailable"
    response = await api.post("/tasks", json={"type": "foo"})
    assert response.status == 503
    # Longer than the stale threshold (2 s): every heartbeat looks old when it returns.
    await asyncio.sleep(3)
    own_db.start()

    async def api_back() -> bool:
        status: int = (await api.get("/health")).status
        return status == 200

    await eventually(api_back, within=20)

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": "COMPLETE"}) == len(created)

    await eventually(all_complete, within=90)
    done = completions(workers)
    assert set(done) == {t.id for t in created}
    assert max(done.values()) == 1
    foo_lines = Counter(
        line for w in workers for line in w.stdout_lines() if line.startswith("Foo ")
    )
    assert foo_lines == Counter(f"Foo {t.id}" for t in created if t.type == TaskType.FOO)
    errors = [d async for d in store.db.tasks.find({"errors.0": {"$exists": True}})]
    assert errors == [], [(d["_id"], d["errors"], d["worker"]) for d in errors]
    assert all(w.alive() for w in workers)
