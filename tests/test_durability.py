"""A database crash loses nothing it acknowledged: the server killed with SIGKILL mid-run,
twice, restarted with `task-runner db`; every task that got a 201 exists and ran once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.clock import DbClock
from service.config import Settings
from service.localdb import free_port
from service.store import Store, open_client
from tests.helpers import (
    CLI,
    ApiProcess,
    WorkerProcess,
    eventually,
    settings_env,
    wait_until_started,
)


def server_pids(port: int) -> list[int]:
    """The SecantusDB server processes listening on `port` (found by command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"secantus" in b" ".join(args) and str(port).encode() in args:
            pids.append(int(entry.name))
    return pids


class LocalDb:
    """`task-runner db` on a port and data directory of the test's own."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.port = free_port()
        self.path = directory / "data"
        self.url = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        self.env = settings_env(settings, local_db_port=self.port, local_db_path=self.path)
        self.log = directory / "db.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([*CLI, "db"], env=self.env, stdout=log, stderr=log)

    async def ready(self) -> None:
        async def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            return "local database listening" in self.log.read_text().split("STARTED")[-1]

        await eventually(listening, within=60)

    def kill(self) -> None:
        """SIGKILL the server itself (and the command that started it): a crash."""
        pids = server_pids(self.port)
        assert pids, "no SecantusDB server found on the test's port"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        with self.log.open("a") as log:
            log.write("\nSTARTED again\n")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        for pid in server_pids(self.port):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def local_db(settings: Settings, tmp_path: Path) -> Iterator[LocalDb]:
    db = LocalDb(settings, tmp_path)
    yield db
    db.stop()


@pytest.fixture
def api_process(local_db: LocalDb, start_api: Callable[..., ApiProcess]) -> Iterator[ApiProcess]:
    # Started before the database: it must answer once the database is up.
    api = start_api(ready=False, mongodb_url=local_db.url)
    yield api
    api.signal(signal.SIGTERM)
    api.wait(30)


async def test_sigkill_of_the_database_twice_loses_no_acknowledged_task(
    settings: Settings,
    local_db: LocalDb,
    api_process: ApiProcess,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    local_db.start()
    await local_db.ready()
    # The stale threshold is longer than an outage, as in production, so no running task is
    # given to a second worker while the database restarts.
    overrides: dict[str, Any] = {"mongodb_url": local_db.url, "foo_seconds": 0.3}
    overrides |= {"heartbeat_interval": 1.0, "stale_after": 10.0, "concurrency": 4}
    workers = [spawn_worker(**overrides) for _ in range(2)]
    for worker in workers:
        await wait_until_started(worker)

    acknowledged: list[str] = []
    refused = Counter[int]()
    stop = asyncio.Event()

    async def create_tasks() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                try:
                    async with http.post(f"{api_process.url}/tasks", json={"type": "foo"}) as r:
                        if r.status == 201:
                            acknowledged.append((await r.json())["id"])
                        else:
                            refused[r.status] += 1
                except aiohttp.ClientError:
                    refused[0] += 1
                    await asyncio.sleep(0.05)

    async def acknowledged_count(n: int) -> None:
        async def reached() -> bool:
            return len(acknowledged) >= n

        await eventually(reached, within=60)

    creator = asyncio.create_task(create_tasks())
    try:
        for crash in range(2):
            await acknowledged_count(40 * (crash + 1))
            local_db.kill()
            await asyncio.sleep(0.5)
            local_db.start()
            await local_db.ready()
        await acknowledged_count(len(acknowledged) + 20)
    finally:
        stop.set()
        await creator

    client = open_client(local_db.url, timeout=5.0, appname="tests")
    store = Store(client, database=settings.database, clock=DbClock())
    try:

        async def all_complete() -> bool:
            waiting = {"state": {"$ne": "COMPLETE"}}
            return await store.db.tasks.count_documents(waiting) == 0

        await eventually(all_complete, within=120)
        stored = {str(doc["_id"]): doc async for doc in store.db.tasks.find({})}
    finally:
        await client.close()
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0]

    lost = [task_id for task_id in acknowledged if task_id not in stored]
    assert not lost, f"{len(lost)} acknowledged task(s) lost: {lost[:5]}"
    runs = Counter(line for worker in workers for line in worker.stdout_lines())
    assert {line: n for line, n in runs.items() if n > 1} == {}
    assert set(runs) == {f"Foo {task_id}" for task_id in stored}
    assert refused[201] == 0 and len(acknowledged) >= 100
