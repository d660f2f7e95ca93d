"""What each task type does. No web server and no database here: just the work."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from service.models import TaskType

BAZ_MAX = 343


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """What the task functions may use, opened once per worker process."""

    http: aiohttp.ClientSession
    bar_url: str
    bar_timeout: float
    foo_seconds: float


def http_session() -> aiohttp.ClientSession:
    """The worker's HTTP client: one request per attempt.

    aiohttp silently resends an idempotent request once when the connection drops. Our own
    retries already back off and record every failure, so that hidden retry is turned off
    (the same switch aiohttp's test client uses) to keep one attempt = one request.
    """
    session = aiohttp.ClientSession()
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


async def foo(task_id: str, ctx: TaskContext) -> str:
    """Sleep (3 s by default), then name the task."""
    await asyncio.sleep(ctx.foo_seconds)
    return f"Foo {task_id}"


async def bar(task_id: str, ctx: TaskContext) -> str:
    """GET the configured URL; any HTTP response, 5xx included, is a result."""
    timeout = aiohttp.ClientTimeout(total=ctx.bar_timeout)
    async with ctx.http.get(ctx.bar_url, timeout=timeout, allow_redirects=True) as response:
        return str(response.status)


async def baz(task_id: str, ctx: TaskContext) -> str:
    """Draw N uniformly from 0..343 inclusive."""
    return f"Baz {random.randint(0, BAZ_MAX)}"


RUNNERS: dict[TaskType, Callable[[str, TaskContext], Awaitable[str]]] = {
    TaskType.FOO: foo,
    TaskType.BAR: bar,
    TaskType.BAZ: baz,
}


async def run_task(task_type: str, task_id: str, ctx: TaskContext) -> str:
    """Run one task, print its one line of output to stdout (flushed) and return it."""
    output = await RUNNERS[TaskType(task_type)](task_id, ctx)
    print(output, flush=True)
    return output
