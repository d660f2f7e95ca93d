"""A database outage: the server is stopped mid-run and started again on the same data."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from service.clock import DbClock
from service.config import Settings
from service.errors import DatabaseUnavailable
from service.localdb import LocalDatabase, free_port
from service.models import TaskType
from service.store import Store, open_client
from service.web.app import create_app
from service.worker.claimer import Claimer
from service.worker.queues import QueueGate
from service.worker.slots import Slots
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


class ReplyEater:
    """A TCP proxy to a database that can swallow the server's replies and cut every
    connection: a reply lost when the server dies just after a write."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.swallow = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"mongodb://127.0.0.1:{port}/?directConnection=true"

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]
        for pipe in (
            self._pipe(reader, up_writer, replies=False),
            self._pipe(up_reader, writer, replies=True),
        ):
            task = asyncio.create_task(pipe)
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if not (replies and self.swallow):
                    writer.write(data)
                    await writer.drain()
        writer.close()

    def cut(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_a_claim_whose_reply_a_database_crash_lost_takes_one_task_only(
    own_db: LocalDatabase, own_store: Store, settings: Settings
) -> None:
    # The server commits a claim and dies before its reply arrives. The driver's automatic
    # retry would run the claim again on the restarted server, which has forgotten the
    # retryable-write record (SecantusDB keeps it in memory), and take a second task under
    # the same lease: the first sat STARTED, never run, until recovery gave it a second
    # attempt (seen as `attempts: 2` and one Foo line after the database was SIGKILLed).
    first = await own_store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    second = await own_store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
    proxy = ReplyEater(own_db.port)
    url = await proxy.start()
    client = open_client(url, timeout=10.0, appname="tests")
    claim_client = open_client(url, timeout=10.0, appname="tests", retry_writes=False)
    # As the worker makes its store (service/worker/worker.py _serve).
    store = Store(client, database=settings.database, clock=DbClock(), claim_client=claim_client)
    try:
        await store.sync_clock()
        await claim_client.admin.command("ping")  # connected before replies are lost
        await asyncio.sleep(0.01)  # both due
        proxy.swallow = True
        slots = Slots(
            store.slots, store.claims, limits={}, types=("baz",), worker_id="w1", claim_within=1.0
        )
        claimer = Claimer(
            store.claims,
            slots=slots,
            queues=QueueGate(
                store.queues,
                store.slots,
                store.claims,
                type_slots=slots,
                worker_id="w1",
                claim_within=1.0,
            ),
            wakeups=None,  # type: ignore[arg-type]
            worker_id="w1",
            types=("baz",),
        )
        claim = asyncio.create_task(claimer._claim())
        await asyncio.sleep(0.5)  # landed; its reply swallowed
        own_db.stop(kill=True)
        proxy.cut()
        proxy.swallow = False
        own_db.start()
        try:
            got = await claim
        except DatabaseUnavailable:
            got = await claimer._claim()  # the claim loop's next round: confirms first
        assert got is not None and got.id == first.id
        held = [doc["_id"] async for doc in own_store.db.tasks.find({"state": "STARTED"})]
        assert held == [ObjectId(first.id)], f"second task {second.id} taken too: {held}"
    finally:
        await client.close()
        await claim_client.close()
        proxy.close()


async def test_a_database_restart_makes_recovery_wait_though_none_of_its_calls_failed(
    own_db: LocalDatabase, settings: Settings
) -> None:
    from service.store import new_lease
    from service.worker.recovery import OutageWatch, Recoverer

    outages = OutageWatch()
    client = open_client(own_db.url, timeout=1.0, appname="tests", event_listeners=[outages])
    try:
        store = Store(client, database=settings.database, clock=DbClock())
        await store.sync_clock()
        await store.ensure_indexes()
        stale_after = 2.0
        recoverer = Recoverer(
            store.claims, clock=store.clock, ping=store.ping, stale_after=stale_after, interval=1
        )
        outages.on_outage = recoverer.database_lost
        assert await recoverer.run_once() == 0  # the database seen: the wait begins
        await asyncio.sleep(stale_after + 0.2)  # ... and is over
        # The database restarts while this process sends it nothing.
        own_db.stop(kill=True)
        own_db.start()
        await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=3)

        async def claimed() -> Any:
            return await store.claims.claim("a-live-worker", lease=new_lease())

        task = await eventually(claimed, within=10)
        # Its worker's heartbeats failed during the outage: its heartbeat_at looks old.
        old = store.clock.now() - timedelta(seconds=60)
        await store.db.tasks.update_one({"_id": task.key}, {"$set": {"heartbeat_at": old}})
        # Recovery waits a whole stale threshold again before judging it ...
        assert await recoverer.run_once() == 0
        assert (await store.tasks.get(task.id)).state == "STARTED"
        # ... and then recovers what is still stale.
        await asyncio.sleep(stale_after + 0.2)
        assert await recoverer.run_once() == 1
    finally:
        await client.close()
