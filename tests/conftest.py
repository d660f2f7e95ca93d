"""Fixtures: a real database server (SecantusDB on a free port, or MONGODB_URL), a clean
database per test, the API under pytest-aiohttp, and worker processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.clock import DbClock
from service.config import Settings, env_name
from service.localdb import database_url
from service.models import Task
from service.store import Store, open_client
from service.web.app import create_app


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    """MONGODB_URL when set; otherwise a SecantusDB server started for this test session."""
    with database_url() as url:
        yield url


@pytest.fixture
def settings(mongodb_url: str) -> Settings:
    """Test settings: a database of this test's own, short intervals."""
    return Settings(
        mongodb_url=mongodb_url,
        database=f"test_{uuid.uuid4().hex[:12]}",
        heartbeat_interval=0.5,
        stale_after=2.0,
        max_poll_interval=1.0,
        retry_base=0.1,
        retry_max=0.5,
        foo_seconds=0.2,
        db_timeout=3.0,
        allow_delete_all=True,
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """A store on the test's database; the database is dropped afterwards."""
    assert settings.mongodb_url is not None
    client = open_client(settings.mongodb_url, timeout=settings.db_timeout, appname="tests")
    task_store = Store(client, database=settings.database, clock=DbClock())
    await task_store.sync_clock()
    await task_store.ensure_indexes()
    yield task_store
    await client.drop_database(settings.database)
    await client.close()


@pytest.fixture
async def api(
    settings: Settings,
    store: Store,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
) -> TestClient[Any, Any]:
    """The API over the test's database."""
    return await aiohttp_client(create_app(settings))


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 30.0, interval: float = 0.05
) -> None:
    """Poll `check` until it is true; fail the test at the deadline."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def all_tasks(store: Store) -> list[Task]:
    """Every task of the test's database."""
    tasks: list[Task] = []
    after = None
    while True:
        page = await store.tasks.page(limit=1000, after=after)
        tasks.extend(page.tasks)
        if page.after is None:
            return tasks
        after = page.after


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_RUNNER_")}
    values = {**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, **overrides}
    for name, value in values.items():
        if isinstance(value, tuple):
            value = ",".join(value) or None
        if value is not None:
            env[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """A real `task-runner worker` process with its stdout and stderr in files."""

    def __init__(self, env: dict[str, str], directory: Path, name: str) -> None:
        self.name = name
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker"], env=env, stdout=out, stderr=err
            )
        self.worker_id = f"{socket.gethostname()}:{self.process.pid}"

    def stdout_lines(self) -> list[str]:
        """What the worker's tasks printed."""
        return self.stdout_path.read_text().splitlines()

    def stderr(self) -> str:
        """The worker's log."""
        return self.stderr_path.read_text()

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.process.wait(timeout)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None


@pytest.fixture
def spawn_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes on the test's database; every one is killed at the end."""
    started: list[WorkerProcess] = []

    def spawn(**overrides: Any) -> WorkerProcess:
        worker = WorkerProcess(
            settings_env(settings, **overrides), tmp_path, f"worker{len(started)}"
        )
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.alive():
            worker.signal(signal.SIGCONT)
            worker.process.kill()
            worker.process.wait()


async def wait_until_started(worker: WorkerProcess, within: float = 20.0) -> None:
    """Wait for the worker's 'started' log line."""

    async def started() -> bool:
        assert worker.alive(), worker.stderr()
        return " started: " in worker.stderr()

    await eventually(started, within=within)


class StubHttpServer:
    """A local HTTP server for the Bar task: answers `status`, after dropping the first
    `drop_first` connections unanswered; `hang` keeps every connection open and silent.
    """

    def __init__(self, *, status: int = 418, drop_first: int = 0, hang: bool = False) -> None:
        self.status = status
        self.drop_first = drop_first
        self.hang = hang
        self.requests = 0
        self.server: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The URL to point TASK_RUNNER_BAR_URL at."""
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening."""
        self._closing.set()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._answer(reader, writer)
        finally:
            writer.close()
            self._handlers.discard(handler)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        self.requests += 1
        if self.hang:
            await self._closing.wait()
        elif self.requests > self.drop_first:
            writer.write(
                f"HTTP/1.1 {self.status} Stub\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()


@pytest.fixture
async def http_stub() -> AsyncIterator[StubHttpServer]:
    """A StubHttpServer answering 418; tests may change its behaviour before use."""
    stub = StubHttpServer()
    await stub.start()
    yield stub
    await stub.close()
