"""The three task types: exact output lines, Bar against a local server, Baz's range."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from service.models import TaskType
from service.tasks import BAZ_MAX, TaskContext, http_session, run_task
from tests.conftest import StubHttpServer


@pytest.fixture
async def ctx(http_stub: StubHttpServer) -> AsyncIterator[TaskContext]:
    async with http_session() as http:
        yield TaskContext(http=http, bar_url=http_stub.url, bar_timeout=2, foo_seconds=0.05)


async def test_foo_prints_its_id(ctx: TaskContext, capsys: Any) -> None:
    assert await run_task(TaskType.FOO, "abc123", ctx) == "Foo abc123"
    assert capsys.readouterr().out == "Foo abc123\n"


async def test_bar_prints_the_status_code(
    ctx: TaskContext, http_stub: StubHttpServer, capsys: Any
) -> None:
    assert await run_task(TaskType.BAR, "x", ctx) == "418"
    http_stub.status = 503
    assert await run_task(TaskType.BAR, "x", ctx) == "503"
    assert capsys.readouterr().out == "418\n503\n"
    assert http_stub.requests == 2


async def test_bar_raises_when_the_connection_drops(
    ctx: TaskContext, http_stub: StubHttpServer
) -> None:
    http_stub.drop_first = 1
    with pytest.raises(aiohttp.ClientError):
        await run_task(TaskType.BAR, "x", ctx)
    assert await run_task(TaskType.BAR, "x", ctx) == "418"


async def test_bar_times_out_when_the_server_hangs(http_stub: StubHttpServer) -> None:
    http_stub.hang = True
    async with http_session() as http:
        ctx = TaskContext(http=http, bar_url=http_stub.url, bar_timeout=0.3, foo_seconds=0)
        with pytest.raises(TimeoutError):
            await run_task(TaskType.BAR, "x", ctx)


async def test_baz_draws_from_0_to_343_inclusive(ctx: TaskContext, capsys: Any) -> None:
    seen = set()
    for _ in range(20000):
        output = await run_task(TaskType.BAZ, "x", ctx)
        match = re.fullmatch(r"Baz (\d+)", output)
        assert match, output
        seen.add(int(match.group(1)))
    capsys.readouterr()
    # 20000 draws over 344 values: missing any one has probability about 1e-23.
    assert seen == set(range(BAZ_MAX + 1))
