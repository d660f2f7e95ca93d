"""Fixtures: a real database server (SecantusDB on a free port, or MONGODB_URL), a clean
database per test, the API under pytest-aiohttp, API and worker processes, a stub HTTP
server. What tests import (helpers, process classes) is in helpers.py.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient

from service.clock import DbClock
from service.config import Settings
from service.localdb import database_url, free_port
from service.store import Store, open_client
from service.web.app import create_app
from tests.calling import Receiver
from tests.helpers import (
    ApiProcess,
    CommandLog,
    StubHttpServer,
    WorkerProcess,
    settings_env,
)

if TYPE_CHECKING:
    from tests.browser import Stack


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


@pytest.fixture
def spawn_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes on the test's database (settings overridden by keyword);
    every one is killed at the end."""
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
            worker.kill()


@pytest.fixture
def start_api(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ApiProcess]]:
    """Start `task-runner api` processes on the test's database, each on a free loopback
    port (settings overridden by keyword), and wait until each answers (`ready=False`:
    return at once); each is stopped at the end: SIGTERM, then SIGKILL after 30 s."""
    started: list[ApiProcess] = []

    def start(*, ready: bool = True, **overrides: Any) -> ApiProcess:
        where = {"host": "127.0.0.1", "port": free_port()}
        env = settings_env(settings, **{**where, **overrides})
        api = ApiProcess(env, tmp_path, f"api{len(started)}")
        started.append(api)
        if ready:
            api.wait_ready()
        return api

    yield start
    for api in started:
        api.stop()


@pytest.fixture
async def http_stub() -> AsyncIterator[StubHttpServer]:
    """A StubHttpServer answering 418; tests may change its behaviour before use."""
    stub = StubHttpServer()
    await stub.start()
    yield stub
    await stub.close()


@pytest.fixture
async def stack(
    store: Store,
    http_stub: StubHttpServer,
    start_api: Callable[..., ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
) -> AsyncIterator[Stack]:
    """API (with tokens) + one worker + headless Chromium cut off from all but the API, for
    the dashboard's tests (tests/browser.py)."""
    from tests.browser import browser_stack  # Playwright only for the tests that use it

    async with browser_stack(http_stub, start_api, spawn_worker) as opened:
        yield opened


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A team's service on a loopback port, for http tasks and callbacks (answers 200)."""
    service = Receiver()
    await service.start()
    yield service
    await service.close()


@pytest.fixture
async def watched(settings: Settings) -> AsyncIterator[tuple[Store, CommandLog]]:
    """A store whose client logs every command."""
    log = CommandLog()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongodb_url, tz_aware=True, event_listeners=[log]
    )
    store = Store(client, database=settings.database, clock=DbClock())
    await store.sync_clock()
    await store.ensure_indexes()
    yield store, log
    await client.close()
