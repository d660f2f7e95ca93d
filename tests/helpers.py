"""What the tests share: polling with a deadline, real `task-runner` processes (API and
workers) and the environment that hands them the test's settings, the API served from a
thread, and a stub HTTP server for the Bar task. The fixtures that use them are in
conftest.py. The database command counter is the service's own: `CommandCounter` in
service.worker.metrics (the benchmark scripts count with it too).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, overload

from aiohttp import web
from pymongo import monitoring

from service.clock import DbClock
from service.config import Settings, env_name
from service.localdb import free_port
from service.models import State, Task
from service.store import Store, new_lease
from service.web.app import create_app

T = TypeVar("T")

# `task-runner` as the tests run it; TASK_RUNNER is the installed console script, for the
# tests that need the script itself.
CLI = [sys.executable, "-m", "service.cli"]
TASK_RUNNER = str(Path(sys.executable).with_name("task-runner"))

# -- polling with a deadline ------------------------------------------------------------------

What = str | Callable[[], str] | None


def _deadline_error(predicate: Callable[[], object], within: float, what: What) -> AssertionError:
    if what is None:
        what = getattr(predicate, "__name__", repr(predicate))
    elif callable(what):
        what = what()
    return AssertionError(f"not within {within}s: {what}")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]],
    *,
    within: float = 30.0,
    interval: float = 0.05,
    what: What = None,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T], *, within: float = 30.0, interval: float = 0.05, what: What = None
) -> T: ...


async def eventually(
    predicate: Callable[[], object],
    *,
    within: float = 30.0,
    interval: float = 0.05,
    what: What = None,
) -> object:
    """Poll `predicate` (a function or a coroutine function) every `interval` seconds until
    it returns something true, and return that; once `within` seconds have passed, fail
    with an AssertionError naming what was awaited: `what` (a text, or a function giving
    it then), else the predicate's name."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _deadline_error(predicate, within, what)
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], T], *, within: float = 30.0, interval: float = 0.05, what: What = None
) -> T:
    """`eventually` for synchronous tests: blocks the thread between polls."""
    deadline = time.monotonic() + within
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise _deadline_error(predicate, within, what)
        time.sleep(interval)
    return result


# -- real `task-runner` processes -----------------------------------------------------------


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


def run_cli(
    env: dict[str, str], *args: str, installed: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `task-runner ARGS` to its end (60 s at most): its exit code, stdout and stderr.
    `installed`: the console script, as a user runs it, rather than `python -m`."""
    program = [TASK_RUNNER] if installed else CLI
    return subprocess.run([*program, *args], env=env, capture_output=True, text=True, timeout=60)


class ServiceProcess:
    """A real `task-runner COMMAND` process with its stdout and stderr in files."""

    def __init__(self, command: str, env: dict[str, str], directory: Path, name: str) -> None:
        self.name = name
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen([*CLI, command], env=env, stdout=out, stderr=err)

    def stdout_lines(self) -> list[str]:
        """What the process printed (for a worker: what its tasks printed)."""
        return self.stdout_path.read_text().splitlines()

    def stderr(self) -> str:
        """The process's log."""
        return self.stderr_path.read_text()

    def output(self) -> str:
        """Its log and then its stdout, for a failure message."""
        return self.stderr() + self.stdout_path.read_text()

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.process.wait(timeout)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it still runs after `timeout` seconds: clean-up. (A test
        that checks how the process exits sends the signal and waits itself.)"""
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class WorkerProcess(ServiceProcess):
    """A real `task-runner worker` process."""

    def __init__(self, env: dict[str, str], directory: Path, name: str) -> None:
        super().__init__("worker", env, directory, name)
        self.worker_id = f"{socket.gethostname()}:{self.process.pid}"


async def wait_until_started(worker: WorkerProcess, within: float = 20.0) -> None:
    """Wait for the worker's 'started' log line."""

    async def started() -> bool:
        assert worker.alive(), worker.stderr()
        return " started: " in worker.stderr()

    await eventually(
        started,
        within=within,
        what=lambda: f"{worker.name}'s 'started' line in:\n{worker.stderr()}",
    )


COMPLETED = re.compile(r"task (\w+) type=\w+ attempt=(\d+) COMPLETE")


def completions(workers: list[WorkerProcess]) -> Counter[str]:
    """How many times each task id was written COMPLETE, from every worker's log."""
    return Counter(m.group(1) for w in workers for m in COMPLETED.finditer(w.stderr()))


class ApiProcess(ServiceProcess):
    """A real `task-runner api` process (web.run_app, as deployed), listening on the
    loopback port its environment names."""

    def __init__(self, env: dict[str, str], directory: Path, name: str) -> None:
        super().__init__("api", env, directory, name)
        self.port = int(env[env_name("port")])
        self.url = f"http://127.0.0.1:{self.port}"

    def answers(self) -> bool:
        """True once GET /health answers 200; fails the test if the process has exited."""
        assert self.alive(), self.output()
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_ready(self, within: float = 30.0) -> None:
        """Wait until it answers."""
        wait_until(self.answers, within=within, what=self._not_answering)

    async def ready(self, within: float = 30.0) -> None:
        """Wait until it answers, polling from the event loop."""
        await eventually(self.answers, within=within, what=self._not_answering)

    def _not_answering(self) -> str:
        return f"{self.name} answering GET /health; its output:\n{self.output()}"


def call_api(
    url: str, method: str = "GET", body: Any = None, *, token: str | None = None
) -> tuple[int, Any]:
    """A JSON request (`body` JSON-encoded; the bearer `token` if any) to a real API: the
    status and the decoded answer (None for an empty one), an error status included."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


# -- the API in this process ----------------------------------------------------------------


class LiveApi:
    """The API served from its own thread and event loop, for a synchronous fuzzer."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.app = create_app(settings)
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> LiveApi:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def send(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        query = urllib.parse.urlencode(request["query"])
        path = urllib.parse.quote(request["path"], safe="/%")
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        body = request["body"]
        data = body.encode() if isinstance(body, str) else body
        headers = {"Content-Type": request["content_type"]} if request["content_type"] else {}
        req = urllib.request.Request(url, data=data, method=request["method"], headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


# -- the database -----------------------------------------------------------------------------


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


# -- a stub for the Bar task -------------------------------------------------------------------


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

    async def _read_request(self, reader: asyncio.StreamReader) -> bool:
        """Read a request's head and count it; False if the client left before it ended."""
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return False
        self.requests += 1
        return True

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._read_request(reader):
            return
        if self.hang:
            await self._closing.wait()
        elif self.requests > self.drop_first:
            writer.write(
                f"HTTP/1.1 {self.status} Stub\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()


async def stuck_task(store: Store, *, max_attempts: int = 3, worker: str = "gone-host:123") -> str:
    """A task claimed (the first due, as a worker would) by a worker that has been silent
    for ten minutes; returns its id.

    The claim is asked again until it lands: on SecantusDB a claim made the moment after
    the insert, from another connection, now and then finds nothing (a worker would try
    again at its next wake-up; here the task is only the set-up)."""
    await store.tasks.create(task_type="foo", run_at=None, max_attempts=max_attempts)

    async def claimed() -> Task | None:
        return await store.claims.claim(worker, lease=new_lease())

    task = await eventually(claimed, within=10, what="a claim of a due task")
    assert task is not None
    old = store.clock.now() - timedelta(seconds=600)
    await store.db.tasks.update_one({"_id": task.key}, {"$set": {"heartbeat_at": old}})
    return task.id


async def listed_ids(api: Any, **params: str) -> tuple[list[str], int]:
    """Every task id GET /tasks lists with these query parameters, page after page (each
    page must answer 200), and how many pages it took."""
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = params | ({"cursor": cursor} if cursor else {})
        response = await api.get("/tasks", params=query)
        assert response.status == 200, await response.text()
        body = await response.json()
        seen.extend(task["id"] for task in body["tasks"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


class CommandLog(monitoring.CommandListener):
    """Every command the client sent, with what it asked and what it got."""

    def __init__(self) -> None:
        self.started_commands: dict[int, tuple[str, dict[str, Any]]] = {}
        self.done: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.recording = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.recording:
            self.started_commands[event.request_id] = (event.command_name, dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        sent = self.started_commands.pop(event.request_id, None)
        if sent is not None:
            self.done.append((sent[0], sent[1], dict(event.reply)))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.started_commands.pop(event.request_id, None)


# -- tasks ----------------------------------------------------------------------------------


async def task_ended(store: Store, task_id: str, within: float = 60) -> Task:
    """The task once it is COMPLETE or FAILED (waiting up to `within` seconds)."""

    async def ended() -> Task | None:
        task = await store.tasks.get(task_id)
        return task if task.state in (State.COMPLETE, State.FAILED) else None

    task = await eventually(ended, within=within, what=f"task {task_id} to end")
    assert task is not None
    return task


class SteppedClock(DbClock):
    """A database clock that moves only when told to."""

    def __init__(self, at: datetime) -> None:
        super().__init__()
        self.at = at

    def surely_now(self) -> datetime:
        return self.at


class NothingWaiting:
    """A TaskWatch whose look-up finds nothing (the test announces what waits)."""

    async def earliest_waiting(self, **_: Any) -> list[tuple[Any, datetime]]:
        return []
