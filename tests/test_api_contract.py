"""The API contract: one error shape, nothing stored on bad input, tokens, OpenAPI."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from service.app import create_app
from service.config import Settings
from service.store import TaskStore

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]


async def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in await response.text()
    return dict(body["error"])


async def test_every_bad_create_is_a_precise_400_and_stores_nothing(
    api: Client, store: TaskStore
) -> None:
    cases: dict[str, tuple[Any, str]] = {
        "unknown type": ({"type": "qux"}, "type"),
        "missing type": ({"run_at": 0}, "type"),
        "run_at null": ({"type": "foo", "run_at": None}, "run_at"),
        "run_at garbage": ({"type": "foo", "run_at": "next tuesday"}, "run_at"),
        "no UTC offset": ({"type": "foo", "run_at": "2030-01-01T00:00:00"}, "run_at"),
        "negative seconds": ({"type": "foo", "run_at": -5}, "run_at"),
        "seconds as a string": ({"type": "foo", "run_at": "1700000000"}, "run_at"),
        "beyond year 9999": ({"type": "foo", "run_at": 253402300800}, "run_at"),
        "boolean run_at": ({"type": "foo", "run_at": False}, "run_at"),
        "unknown field": ({"type": "foo", "priority": 1}, "priority"),
        "operator value": ({"type": {"$ne": "foo"}}, "body"),
        "operator string": ({"type": "$where"}, "body"),
        "nested operator": ({"type": "foo", "max_attempts": {"$gt": 0}}, "body"),
        "max_attempts zero": ({"type": "foo", "max_attempts": 0}, "max_attempts"),
        "max_attempts float": ({"type": "foo", "max_attempts": 2.5}, "max_attempts"),
    }
    for name, (body, field) in cases.items():
        error = await assert_error(await api.post("/tasks", json=body), 400, "invalid_request")
        assert field in error["details"], (name, error)
    for raw, field in (("[1, 2]", "body"), ('"foo"', "body"), ("{bad json", "body"), ("", "body")):
        response = await api.post("/tasks", data=raw, headers={"Content-Type": "application/json"})
        error = await assert_error(response, 400, "invalid_request")
        assert field in error["details"]
    await assert_error(await api.post("/tasks", data="type=foo"), 415, "unsupported_media_type")
    await assert_error(
        await api.post("/tasks", data=b'{"type": "foo"}', headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert await store.tasks.count_documents({}) == 0


async def test_a_body_over_the_limit_is_413(
    settings: Settings, store: TaskStore, aiohttp_client: MakeClient
) -> None:
    small = await aiohttp_client(create_app(dataclasses.replace(settings, max_body_bytes=1024)))
    body = '{"type": "foo", "pad": "' + "x" * 2000 + '"}'
    response = await small.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    await assert_error(response, 413, "body_too_large")
    assert await store.tasks.count_documents({}) == 0


async def test_page_size_limit_is_a_setting(
    settings: Settings, store: TaskStore, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_page_size=5)))
    assert (await client.get("/tasks?limit=5")).status == 200
    error = await assert_error(await client.get("/tasks?limit=6"), 400, "invalid_request")
    assert "limit" in error["details"]


async def test_bad_legacy_creates_are_400_and_store_nothing(api: Client, store: TaskStore) -> None:
    for path in ("/QUX/0", "/FOO/later", "/FOO/-1", "/FOO/1e400", "/FOO/nan", "/FOO/999999999999"):
        await assert_error(await api.post(path), 400, "invalid_request")
    assert await store.tasks.count_documents({}) == 0


async def test_bad_ids_are_404_with_the_error_shape(api: Client) -> None:
    for path in ("/tasks/zzz", "/tasks/6b05ceaf9af4ef7f5df5957c", "/id/%24ne", "/id/1"):
        await assert_error(await api.get(path), 404, "task_not_found")
        await assert_error(await api.delete(path), 404, "task_not_found")


async def test_bad_list_queries(api: Client) -> None:
    cases = {
        "state=DONE": "state",
        "type=qux": "type",
        "state=STARTED&state=COMPLETE": "state",
        "type=foo&type=bar": "type",
        "state[$ne]=x": "state[$ne]",
        "state=%24ne": "query",
        "limit=0": "limit",
        "limit=1001": "limit",
        "limit=ten": "limit",
        "cursor=made-up": "cursor",
        "cursor=WzEsICJ4Il0": "cursor",
        "sort=run_at": "sort",
    }
    for query, field in cases.items():
        error = await assert_error(await api.get(f"/tasks?{query}"), 400, "invalid_request")
        assert field in error["details"], (query, error)


async def test_a_tampered_cursor_is_refused(api: Client) -> None:
    for _ in range(3):
        await api.post("/tasks", json={"type": "baz"})
    body = await (await api.get("/tasks?limit=1")).json()
    cursor = body["next_cursor"]
    assert cursor
    tampered = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    await assert_error(await api.get(f"/tasks?cursor={tampered}"), 400, "invalid_request")


async def test_methods_a_route_does_not_allow_are_405_with_allow(api: Client) -> None:
    for method, path in (
        ("PUT", "/tasks"),
        ("PATCH", "/tasks/abc"),
        ("GET", "/FOO/0"),
        ("POST", "/health"),
    ):
        response = await api.request(method, path)
        await assert_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"]


# -- tokens -------------------------------------------------------------------------------


@pytest.fixture
async def guarded(settings: Settings, store: TaskStore, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings, api_tokens=("s3cret-one", "s3cret-two"), allow_delete_all=False
            )
        )
    )


async def test_writes_need_a_token_when_tokens_are_set(
    guarded: Client, store: TaskStore, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret-one"},
        {"Authorization": "s3cret-one"},
    ):
        response = await guarded.post("/tasks", json={"type": "foo"}, headers=headers)
        await assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await store.tasks.count_documents({}) == 0
    for token in ("s3cret-one", "s3cret-two"):
        response = await guarded.post(
            "/tasks", json={"type": "foo"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 201
    created = (await response.json())["id"]
    # Reads stay open unless asked; /health always.
    assert (await guarded.get(f"/tasks/{created}")).status == 200
    assert (await guarded.get("/health")).status == 200
    await assert_error(await guarded.delete(f"/tasks/{created}"), 401, "unauthorized")
    # Delete-all stays disabled whatever the token.
    response = await guarded.delete("/", headers={"Authorization": "Bearer s3cret-one"})
    await assert_error(response, 403, "delete_all_disabled")
    assert "s3cret" not in caplog.text


async def test_reads_need_a_token_when_asked(
    settings: Settings, store: TaskStore, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, api_tokens=("t0ken",), auth_reads=True))
    )
    await assert_error(await client.get("/tasks"), 401, "unauthorized")
    assert (await client.get("/tasks", headers={"Authorization": "Bearer t0ken"})).status == 200
    assert (await client.get("/health")).status == 200
    assert (await client.get("/openapi.json")).status == 200


def test_tokens_stay_out_of_settings_repr() -> None:
    settings = Settings.from_env({"TASK_RUNNER_API_TOKENS": "alpha, beta"})
    assert settings.api_tokens == ("alpha", "beta")
    assert "alpha" not in repr(settings)


# -- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_document_is_valid_and_matches_the_routes(api: Client) -> None:
    response = await api.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    validate(document)
    documented = {
        (path, method.upper()) for path, ops in document["paths"].items() for method in ops
    }
    served = set()
    assert api.app is not None
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and not isinstance(route.resource, web.StaticResource):
            served.add((path, route.method))
    assert documented == served - {("/docs", "GET")}
    assert document["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]
    for ops in document["paths"].values():
        for op in ops.values():
            assert "503" in op["responses"]


async def test_docs_page_serves_swagger_ui_locally(api: Client) -> None:
    page = await api.get("/docs")
    assert page.status == 200
    html = await page.text()
    assert "/openapi.json" in html
    script = await api.get("/docs/static/swagger-ui-bundle.js")
    assert script.status == 200
    assert len(await script.read()) > 100_000
