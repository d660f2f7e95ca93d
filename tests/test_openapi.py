"""The OpenAPI document as generated clients read it: every operation has a stable, unique
operationId; states and types are enums; and a client generated from a real API's
/openapi.json by openapi-python-client creates, reads and lists tasks with that API.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.models import State
from service.plugins import load_registry
from service.store import Store
from service.web.openapi import build_spec, operation
from tests.helpers import ApiProcess, all_tasks

Client = TestClient[Any, Any]

OPERATION_IDS = {
    ("post", "/tasks"): "createTask",
    ("get", "/tasks"): "listTasks",
    ("get", "/tasks/{id}"): "getTask",
    ("delete", "/tasks/{id}"): "deleteTask",
    ("post", "/tasks/{id}/requeue"): "requeueTask",
    ("post", "/recover"): "recoverStaleTasks",
    ("get", "/stats"): "getStats",
    ("get", "/workers"): "listWorkers",
    ("get", "/health"): "getHealth",
    ("get", "/metrics"): "getMetrics",
    ("get", "/openapi.json"): "getOpenApi",
    ("get", "/ui"): "getDashboard",
    ("get", "/events"): "streamEvents",
    ("get", "/id/{id}"): "legacyGetTask",
    ("delete", "/id/{id}"): "legacyDeleteTask",
    ("get", "/taskstate/{state}"): "legacyListTasksInState",
    ("post", "/{type}/{unix_seconds}"): "legacyCreateTask",
    ("delete", "/"): "legacyDeleteAll",
    ("post", "/schedules"): "createSchedule",
    ("get", "/schedules"): "listSchedules",
    ("get", "/schedules/{id}"): "getSchedule",
    ("delete", "/schedules/{id}"): "deleteSchedule",
    ("post", "/schedules/{id}/pause"): "pauseSchedule",
    ("post", "/schedules/{id}/resume"): "resumeSchedule",
    ("get", "/queues"): "listQueues",
    ("get", "/queues/{name}"): "getQueue",
    ("put", "/queues/{name}"): "putQueue",
    ("delete", "/queues/{name}"): "deleteQueue",
    ("post", "/queues/{name}/pause"): "pauseQueue",
    ("post", "/queues/{name}/resume"): "resumeQueue",
}
STATES = [state.value for state in State]


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            yield method, path, op


async def test_every_operation_has_a_stable_unique_operation_id(api: Client) -> None:
    document = await (await api.get("/openapi.json")).json()
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids))
    # The ones this version has keep their names: generated clients call them by these.
    found = {(method, path): op["operationId"] for method, path, op in operations(document)}
    assert {key: found.get(key) for key in OPERATION_IDS} == OPERATION_IDS


async def test_states_and_types_are_enums(api: Client) -> None:
    document = await (await api.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert schemas["Task"]["properties"]["state"]["enum"] == STATES
    assert schemas["Schedule"]["properties"]["missed"]["enum"] == ["latest", "skip"]
    assert schemas["CreateTask"]["properties"]["type"]["enum"] == ["foo", "bar", "baz", "http"]
    listing = {p["name"]: p for p in document["paths"]["/tasks"]["get"]["parameters"]}
    assert listing["state"]["schema"]["enum"] == STATES
    assert listing["type"]["schema"]["enum"] == ["foo", "bar", "baz", "http"]
    assert listing["order"]["schema"]["enum"] == ["asc", "desc"]
    [state] = document["paths"]["/taskstate/{state}"]["get"]["parameters"]
    assert state["schema"]["enum"] == STATES and state["in"] == "path"
    legacy = document["paths"]["/{type}/{unix_seconds}"]["post"]["parameters"]
    assert legacy[0]["name"] == "type" and legacy[0]["schema"]["enum"] == [
        "foo",
        "bar",
        "baz",
        "http",
    ]
    # A task type is not an enum in answers: a task may be of a type this API has not
    # loaded (a worker's own, or one removed since), and is shown as stored.
    assert "enum" not in schemas["Task"]["properties"]["type"]


def app_with(*handlers: Callable[[web.Request], Any]) -> web.Application:
    app = web.Application()
    for index, handler in enumerate(handlers):
        app.router.add_get(f"/r{index}", handler)
    return app


def test_operation_ids_are_set_either_way_and_required_unique() -> None:
    registry = load_registry(entry_points=False)

    @operation("one", responses={200: None}, operation_id="one")
    async def one(request: web.Request) -> web.Response:
        return web.Response()

    @operation("two", responses={200: None}, operationId="two")
    async def two(request: web.Request) -> web.Response:
        return web.Response()

    @operation("nameless", responses={200: None})
    async def nameless(request: web.Request) -> web.Response:
        return web.Response()

    document = build_spec(app_with(one, two), bearer=False, registry=registry)
    assert [op["operationId"] for _, _, op in operations(document)] == ["one", "two"]
    with pytest.raises(LookupError, match="GET /r1 has no operationId"):
        build_spec(app_with(one, nameless), bearer=False, registry=registry)
    with pytest.raises(ValueError, match="GET /r1 has operationId 'one', as GET /r0 has"):
        build_spec(app_with(one, one), bearer=False, registry=registry)
    aliased = build_spec(
        app_with(one, one), bearer=False, registry=registry, earlier_aliases={"/r1"}
    )
    assert [op["operationId"] for _, _, op in operations(aliased)] == ["one", "legacyOne"]
    with pytest.raises(TypeError):
        operation("both", responses={}, operation_id="a", operationId="b")


# -- a generated client --------------------------------------------------------------------------

PACKAGE = "task_runner_generated"


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Callable[[str], Callable[[str], Any]]]:
    """A function generating a client package from the OpenAPI document at a URL with
    openapi-python-client; it returns a function importing the package's modules. The
    modules are forgotten afterwards."""

    def generate(url: str) -> Callable[[str], Any]:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"post_hooks": []}))  # no formatter needed
        command = [sys.executable, "-m", "openapi_python_client", "generate", "--url", url]
        command += ["--config", str(config), "--meta", "none"]
        command += ["--output-path", str(tmp_path / PACKAGE), "--fail-on-warning"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        sys.path.insert(0, str(tmp_path))
        return lambda name: importlib.import_module(f"{PACKAGE}.{name}")

    yield generate
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


async def test_a_generated_client_creates_gets_and_lists_tasks(
    store: Store,
    start_api: Callable[..., ApiProcess],
    generated: Callable[[str], Callable[[str], Any]],
) -> None:
    api = start_api()
    module = generated(f"{api.url}/openapi.json")
    models = module("models")
    create_task = module("api.default.create_task")
    get_task = module("api.default.get_task")
    list_tasks = module("api.default.list_tasks")
    client = module("client").Client(base_url=api.url, raise_on_unexpected_status=True)
    with client:
        body = models.CreateTask(type_=models.CreateTaskType.BAR, priority=4, max_attempts=2)
        created = create_task.sync(client=client, body=body, idempotency_key="generated-1")
        assert isinstance(created, models.Task), created
        assert created.state is models.TaskState.NOTSTARTED and created.priority == 4
        again = create_task.sync(client=client, body=body, idempotency_key="generated-1")
        assert again.id == created.id
        got = get_task.sync(created.id, client=client)
        assert (got.id, got.type_, got.max_attempts) == (created.id, "bar", 2)
        assert got.created_at == created.created_at and got.created_at.tzinfo is not None
        page = list_tasks.sync(
            client=client, state=models.ListTasksState.NOTSTARTED, type_=models.ListTasksType.BAR
        )
        assert [task.id for task in page.tasks] == [created.id] and page.next_cursor is None
        missing = get_task.sync_detailed("0" * 24, client=client)
        assert missing.status_code == 404 and missing.parsed.error.code == "task_not_found"
    assert [task.id for task in await all_tasks(store)] == [created.id]
