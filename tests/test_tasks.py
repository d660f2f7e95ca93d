"""The three task types: exact output lines, Bar against a local server, Baz's range."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from service.config import Settings
from service.models import TaskType
from service.plugins import TaskContext, load_registry, run_task
from service.tasks.baz import BAZ_MAX
from service.worker.process import http_session
from tests.helpers import StubHttpServer

Context = Callable[[str], TaskContext]
BUILT_INS = load_registry(entry_points=False)


async def run_type(task_type: TaskType, ctx: TaskContext) -> str:
    """Run a built-in type as a worker does: looked up by name, printed and returned."""
    definition = BUILT_INS.get(task_type)
    assert definition is not None
    return await run_task(definition, ctx, definition.load_args(None), time_limit=None)


@pytest.fixture
async def ctx(http_stub: StubHttpServer) -> AsyncIterator[Context]:
    settings = Settings(bar_url=http_stub.url, bar_timeout=2, foo_seconds=0.05)
    async with http_session() as http:
        yield lambda task_id: TaskContext(task_id=task_id, attempt=1, settings=settings, http=http)


async def test_the_built_in_types_come_first_in_order() -> None:
    assert load_registry().names == ("foo", "bar", "baz", "http")
    assert [t.value for t in TaskType] == ["foo", "bar", "baz"]


async def test_foo_prints_its_id(ctx: Context, capsys: Any) -> None:
    assert await run_type(TaskType.FOO, ctx("abc123")) == "Foo abc123"
    assert capsys.readouterr().out == "Foo abc123\n"


async def test_bar_prints_the_status_code(
    ctx: Context, http_stub: StubHttpServer, capsys: Any
) -> None:
    assert await run_type(TaskType.BAR, ctx("x")) == "418"
    http_stub.status = 503
    assert await run_type(TaskType.BAR, ctx("x")) == "503"
    assert capsys.readouterr().out == "418\n503\n"
    assert http_stub.requests == 2


async def test_bar_raises_when_the_connection_drops(
    ctx: Context, http_stub: StubHttpServer
) -> None:
    http_stub.drop_first = 1
    with pytest.raises(aiohttp.ClientError):
        await run_type(TaskType.BAR, ctx("x"))
    assert await run_type(TaskType.BAR, ctx("x")) == "418"


async def test_bar_times_out_when_the_server_hangs(http_stub: StubHttpServer) -> None:
    http_stub.hang = True
    settings = Settings(bar_url=http_stub.url, bar_timeout=0.3, foo_seconds=0)
    async with http_session() as http:
        ctx = TaskContext(task_id="x", attempt=1, settings=settings, http=http)
        with pytest.raises(TimeoutError):
            await run_type(TaskType.BAR, ctx)


async def test_baz_draws_from_0_to_343_inclusive(ctx: Context, capsys: Any) -> None:
    seen = set()
    for _ in range(20000):
        output = await run_type(TaskType.BAZ, ctx("x"))
        match = re.fullmatch(r"Baz (\d+)", output)
        assert match, output
        seen.add(int(match.group(1)))
    capsys.readouterr()
    # 20000 draws over 344 values: missing any one has probability about 1e-23.
    assert seen == set(range(BAZ_MAX + 1))


async def test_no_argument_steers_bar_or_foo(ctx: Context) -> None:
    # Bar's URL is a setting: the built-ins take no arguments at all.
    for name in ("foo", "bar", "baz"):
        definition = BUILT_INS.get(name)
        assert definition is not None and definition.args is None
        with pytest.raises(Exception, match="takes no arguments"):
            definition.accept_args({"url": "http://example.com/"})
    # The context carries no URL of its own either.
    assert "bar_url" not in {f.name for f in dataclasses.fields(TaskContext)}
