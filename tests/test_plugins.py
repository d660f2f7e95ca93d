"""Task types as plugins, with real processes: a module named in TASK_RUNNER_TASK_MODULES
and a package's entry point, arguments checked at the API and loaded by the worker, old
workers that leave new types alone, start-up refused with one line, and time limits."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.config import Settings
from service.models import State
from service.plugins import PluginError, load_registry
from service.store import Store
from service.web.app import create_app
from tests.helpers import (
    ApiProcess,
    WorkerProcess,
    eventually,
    run_cli,
    settings_env,
    wait_until_started,
)

# A plugin as a team would write it: a type with an argument schema, one without, and two
# that overrun their time limits.
PLUGIN = """
import asyncio
from typing import Any

from marshmallow import Schema, fields, validate

from service.plugins import TaskContext, task_type


class GreetArgs(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=40))
    times = fields.Integer(load_default=1, validate=validate.Range(min=1, max=3))


@task_type("greet", args=GreetArgs)
async def greet(ctx: TaskContext, args: dict[str, Any]) -> str:
    hello = " ".join([f"Hello {args['name']}"] * args["times"])
    return f"{hello} ({ctx.task_id} attempt {ctx.attempt})"


@task_type("ping")
async def ping(ctx: TaskContext, args: None) -> str:
    return f"pong {ctx.task_id} {args}"


@task_type("hang", timeout=0.5)
async def hang(ctx: TaskContext, args: None) -> str:
    await asyncio.sleep(3600)
    return "never"


class NapArgs(Schema):
    seconds = fields.Float(required=True)


@task_type("nap", args=NapArgs)
async def nap(ctx: TaskContext, args: dict[str, Any]) -> str:
    await asyncio.sleep(args["seconds"])
    return f"napped {ctx.task_id}"
"""

Client = TestClient[Any, Any]


def write_module(directory: Path, source: str, prefix: str = "plugin") -> str:
    """A module of a fresh name (no test sees another's import) in `directory`."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def finished(store: Store, task_id: str, within: float = 30.0) -> Any:
    """Wait for the task to be COMPLETE or FAILED and return it."""

    async def done() -> bool:
        task = await store.tasks.get(task_id)
        return task.state in (State.COMPLETE, State.FAILED)

    await eventually(done, within=within)
    return await store.tasks.get(task_id)


# -- a module named in TASK_RUNNER_TASK_MODULES ------------------------------------------------


async def test_a_plugin_module_with_an_argument_schema_runs_through_api_and_worker(
    store: Store,
    tmp_path: Path,
    start_api: Callable[..., ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = write_module(tmp_path, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    api = start_api(task_modules=(module,))

    # Any letter case; args checked by the type's schema and stored as it loaded them.
    status, greet = await post(
        http, f"{api.url}/tasks", {"type": "GREET", "args": {"name": "Ada", "times": 2}}
    )
    assert status == 201, greet
    assert (greet["type"], greet["args"]) == ("greet", {"name": "Ada", "times": 2})
    status, defaulted = await post(
        http, f"{api.url}/tasks", {"type": "greet", "args": {"name": "Bo"}}
    )
    assert status == 201 and defaulted["args"] == {"name": "Bo", "times": 1}, defaulted
    # The earlier version's create route takes plugin types too (those without arguments).
    async with http.post(f"{api.url}/PING/0") as response:
        assert response.status == 201
        ping = await response.json()
    assert ping["type"] == "ping" and ping["args"] is None

    # Bad arguments: 400, the schema's messages under details.args, nothing stored.
    refusals: list[tuple[dict[str, Any], Any]] = [
        ({"type": "greet"}, {"name": ["Missing data for required field."]}),
        ({"type": "greet", "args": {"name": ""}}, {"name": ["Length must be between 1 and 40."]}),
        (
            {"type": "greet", "args": {"name": "x", "times": 9}},
            {"times": ["Must be greater than or equal to 1 and less than or equal to 3."]},
        ),
        (
            {"type": "greet", "args": {"name": "x", "url": "http://example.com/"}},
            {"url": ["Unknown field."]},
        ),
        ({"type": "ping", "args": {"x": 1}}, ["type ping takes no arguments"]),
        ({"type": "bar", "args": {"url": "http://example.com/"}}, ["type bar takes no arguments"]),
    ]
    for body, messages in refusals:
        status, answer = await post(http, f"{api.url}/tasks", body)
        assert status == 400, (body, answer)
        assert answer["error"]["code"] == "invalid_request"
        assert answer["error"]["details"] == {"args": messages}, (body, answer)
    status, answer = await post(http, f"{api.url}/tasks", {"type": "unknown"})
    assert status == 400
    assert answer["error"]["details"]["type"] == [
        "must be one of foo, bar, baz, http, greet, ping, hang, nap (any letter case)"
    ]
    assert await store.db.tasks.count_documents({}) == 3

    # GET /tasks?type= takes the plugin's types; the document shows them and their schemas.
    async with http.get(f"{api.url}/tasks?type=Greet") as response:
        listed = [task["id"] for task in (await response.json())["tasks"]]
    assert sorted(listed) == sorted([greet["id"], defaulted["id"]])
    async with http.get(f"{api.url}/openapi.json") as response:
        document = await response.json()
    create = document["components"]["schemas"]["CreateTask"]["properties"]
    assert create["type"]["enum"] == ["foo", "bar", "baz", "http", "greet", "ping", "hang", "nap"]
    assert {"$ref": "#/components/schemas/Args.greet"} in create["args"]["anyOf"]
    greet_args = document["components"]["schemas"]["Args.greet"]
    assert greet_args["required"] == ["name"]
    assert set(greet_args["properties"]) == {"name", "times"}

    # A worker with the module runs them: output printed and stored, as for the built-ins.
    worker = spawn_worker(task_modules=(module,))
    done = [await finished(store, task["id"]) for task in (greet, defaulted, ping)]
    assert [task.state for task in done] == [State.COMPLETE] * 3
    assert done[0].output == f"Hello Ada Hello Ada ({greet['id']} attempt 1)"
    assert done[1].output == f"Hello Bo ({defaulted['id']} attempt 1)"
    assert done[2].output == f"pong {ping['id']} None"
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert sorted(worker.stdout_lines()) == sorted(task.output for task in done)
    api.stop()


# -- a package's entry point ------------------------------------------------------------------


def install_package(root: Path) -> Path:
    """Install a tiny package declaring entry points in `task_runner.task_types` into a
    folder for PYTHONPATH, as `pip install --target` lays it out (its .dist-info with
    entry_points.txt written here: pip would need network or the `wheel` package)."""
    site = root / "site"
    package = site / "teamtasks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(
        textwrap.dedent(
            """
            from marshmallow import Schema, fields

            from service.plugins import task_type


            class ShoutArgs(Schema):
                word = fields.String(required=True)


            @task_type("shout", args=ShoutArgs)
            async def shout(ctx, args):
                return args["word"].upper() + "!"
            """
        )
    )
    (package / "single.py").write_text(
        textwrap.dedent(
            """
            from service.plugins import task_type


            @task_type("whisper")
            async def whisper(ctx, args):
                return f"psst {ctx.task_id}"
            """
        )
    )
    info = site / "teamtasks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: teamtasks\nVersion: 1.0\n")
    # One entry point names a module (all its types), the other one registered function.
    (info / "entry_points.txt").write_text(
        "[task_runner.task_types]\njobs = teamtasks.jobs\nquiet = teamtasks.single:whisper\n"
    )
    return site


async def test_a_package_entry_point_adds_types_to_api_and_worker(
    store: Store,
    tmp_path: Path,
    start_api: Callable[..., ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = install_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(site))
    api = start_api()
    status, shout = await post(http, f"{api.url}/tasks", {"type": "shout", "args": {"word": "hi"}})
    assert status == 201, shout
    status, whisper = await post(http, f"{api.url}/tasks", {"type": "Whisper"})
    assert status == 201, whisper
    status, answer = await post(http, f"{api.url}/tasks", {"type": "shout", "args": {}})
    assert (status, answer["error"]["details"]) == (
        400,
        {"args": {"word": ["Missing data for required field."]}},
    )
    worker = spawn_worker()
    assert (await finished(store, shout["id"])).output == "HI!"
    assert (await finished(store, whisper["id"])).output == f"psst {whisper['id']}"
    registered = await store.db.workers.find_one({"_id": worker.worker_id})
    assert registered is not None
    assert registered["types"] == ["foo", "bar", "baz", "http", "shout", "whisper"]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


async def test_an_entry_point_in_the_api_fixture(
    settings: Settings,
    store: Store,
    tmp_path: Path,
    aiohttp_client: Callable[[web.Application], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(install_package(tmp_path)))
    client: Client = await aiohttp_client(create_app(settings))
    response = await client.post("/tasks", json={"type": "SHOUT", "args": {"word": "x"}})
    assert response.status == 201
    assert (await response.json())["args"] == {"word": "x"}


# -- rolling upgrades: an old worker leaves a new type alone -----------------------------------


async def test_an_old_worker_leaves_a_new_types_tasks_to_a_new_worker(
    store: Store,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = write_module(tmp_path, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    old = spawn_worker()
    await wait_until_started(old)
    now = store.clock.now()
    # The new type's task is due first: a worker that could claim it would take it first.
    greet = await store.tasks.create(
        task_type="greet", run_at=now - timedelta(seconds=30), max_attempts=1, args={"name": "Cy"}
    )
    baz = [await store.tasks.create(task_type="baz", run_at=None, max_attempts=1) for _ in range(5)]
    for task in baz:
        assert (await finished(store, task.id)).state == State.COMPLETE
    left = await store.tasks.get(greet.id)
    assert (left.state, left.attempts) == (State.NOTSTARTED, 0)
    registered = await store.db.workers.find_one({"_id": old.worker_id})
    assert registered is not None and registered["types"] == ["foo", "bar", "baz", "http"]

    new = spawn_worker(task_modules=(module,))
    done = await finished(store, greet.id)
    assert (done.state, done.worker) == (State.COMPLETE, new.worker_id)
    assert done.output == f"Hello Cy ({greet.id} attempt 1)"
    assert not any(line.startswith("Hello") for line in old.stdout_lines())
    for worker in (old, new):
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0


async def test_stored_args_that_no_longer_load_fail_the_task_once(
    store: Store,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = write_module(tmp_path, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # As an older version, a migration or a person might have left them.
    wrong = await store.tasks.create(
        task_type="greet", run_at=None, max_attempts=3, args={"name": 5}
    )
    extra = await store.tasks.create(task_type="foo", run_at=None, max_attempts=3, args={"x": 1})
    shape = await store.tasks.create(task_type="greet", run_at=None, max_attempts=3)
    await store.db.tasks.update_one({"_id": shape.key}, {"$set": {"args": "name=Ada"}})
    worker = spawn_worker(task_modules=(module,))
    failed = [await finished(store, task.id) for task in (wrong, extra, shape)]
    assert [(t.state, t.attempts) for t in failed] == [(State.FAILED, 1)] * 3
    assert failed[0].error is not None and "args do not load as greet args" in failed[0].error
    assert "'name': ['Not a valid string.']" in failed[0].error
    assert failed[1].error == "type foo takes no arguments, but has {'x': 1}"
    assert failed[2].error is not None and failed[2].error.startswith("malformed task: args is")
    assert worker.alive()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert worker.stdout_lines() == []


# -- start-up refused with one line -------------------------------------------------------------


def run_command(settings: Settings, command: str, module: str, path: Path) -> Any:
    env = {**settings_env(settings, task_modules=(module,)), "PYTHONPATH": str(path)}
    return run_cli(env, command)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "import no_such_module_here\n",
            "task module '{module}' (TASK_RUNNER_TASK_MODULES) could not be imported: "
            "ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        (
            "from service.plugins import task_type\n\n\n"
            "@task_type('foo')\nasync def foo(ctx, args):\n    return 'not the real foo'\n",
            "task type 'foo' is defined twice: in service.tasks.foo and in {module}",
        ),
        (
            "def broken(:\n",
            "task module '{module}' (TASK_RUNNER_TASK_MODULES) could not be imported: "
            "SyntaxError: invalid syntax ({module}.py, line 1)",
        ),
        (
            "X = 1\n",
            "task module '{module}' (TASK_RUNNER_TASK_MODULES) defines no task type "
            "(no @task_type in it)",
        ),
    ],
    ids=["import-error", "duplicate", "syntax-error", "no-types"],
)
def test_a_bad_task_module_stops_api_and_worker_with_one_line(
    settings: Settings, tmp_path: Path, source: str, expected: str
) -> None:
    module = write_module(tmp_path, source, prefix="bad")
    for command in ("worker", "api"):
        done = run_command(settings, command, module, tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"task-runner {command}: {expected.format(module=module)}"
        ], done.stderr
        assert done.stdout == ""


def test_two_modules_defining_one_name_and_a_missing_module(tmp_path: Path) -> None:
    sys.path.insert(0, str(tmp_path))
    try:
        first = write_module(tmp_path, PLUGIN)
        second = write_module(tmp_path, PLUGIN)
        with pytest.raises(
            PluginError, match=f"'greet' is defined twice: in {first} and in {second}"
        ):
            load_registry((first, second))
        # The same module twice (say, an entry point and the setting) is not a clash.
        assert load_registry((first, first)).names[4:] == ("greet", "ping", "hang", "nap")
        with pytest.raises(PluginError, match=r"'nowhere_xyz' .* No module named 'nowhere_xyz'"):
            load_registry(("nowhere_xyz",))
    finally:
        sys.path.remove(str(tmp_path))


def test_the_decorator_refuses_what_it_cannot_run() -> None:
    from service.plugins import task_type

    with pytest.raises(ValueError, match="must be lowercase"):
        task_type("Has Space")
    # The service's own paths: POST /tasks/1 must never read as a task of type "tasks".
    with pytest.raises(ValueError, match="'tasks' is reserved: it is one of the service's own"):
        task_type("tasks")
    with pytest.raises(ValueError, match="timeout must be"):
        task_type("ok", timeout=0)
    with pytest.raises(TypeError, match="Schema class"):
        task_type("ok", args=dict)  # type: ignore[arg-type]

    async def generator(ctx: Any, args: Any) -> Any:
        yield ""

    # A plain def is a task type (run in a thread); an async generator is not.
    with pytest.raises(TypeError, match="is not a function def run"):
        task_type("ok")(generator)


# -- time limits ---------------------------------------------------------------------------------


async def test_a_run_past_its_time_limit_fails_the_attempt_and_is_retried(
    store: Store,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = write_module(tmp_path, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    create = store.tasks.create
    # The type's default (0.5 s), the task's own (0.3 s), TASK_RUNNER_TASK_TIMEOUT (0.4 s).
    by_type = await create(task_type="hang", run_at=None, max_attempts=2)
    by_task = await create(task_type="hang", run_at=None, max_attempts=2, time_limit=0.3)
    by_setting = await create(task_type="nap", run_at=None, max_attempts=2, args={"seconds": 60})
    quick = await create(task_type="nap", run_at=None, max_attempts=2, args={"seconds": 0.01})
    began = time.monotonic()
    worker = spawn_worker(task_modules=(module,), task_timeout=0.4, concurrency=4)
    done = {t.id: await finished(store, t.id) for t in (by_type, by_task, by_setting, quick)}
    assert time.monotonic() - began < 30
    assert done[quick.id].state == State.COMPLETE
    for task, limit in ((by_type, "0.5"), (by_task, "0.3"), (by_setting, "0.4")):
        failed = done[task.id]
        assert (failed.state, failed.attempts) == (State.FAILED, 2)
        assert [e.error for e in failed.errors] == [f"timed out after {limit} s"] * 2
        assert [e.attempt for e in failed.errors] == [1, 2]
        assert failed.error == f"timed out after {limit} s"
    assert worker.alive()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert worker.stdout_lines() == [f"napped {quick.id}"]


def test_a_task_module_python_cannot_find_hints_at_pythonpath(
    settings: Settings, tmp_path: Path
) -> None:
    done = run_command(settings, "worker", "acme_tasks_not_on_the_path", tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "No module named 'acme_tasks_not_on_the_path'" in line, line
    assert "PYTHONPATH" in line, line
