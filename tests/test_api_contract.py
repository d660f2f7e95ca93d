"""The API contract: one error shape, nothing stored on bad input, tokens, OpenAPI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from service.config import Settings
from service.store import Store
from service.web.app import create_app
from tests.helpers import ApiProcess

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
    api: Client, store: Store
) -> None:
    cases: dict[str, tuple[Any, str]] = {
        "unknown type": ({"type": "qux"}, "type"),
        "missing type": ({"run_at": 0}, "type"),
        "run_at null": ({"type": "foo", "run_at": None}, "run_at"),
        "run_at garbage": ({"type": "foo", "run_at": "next tuesday"}, "run_at"),
        "run_at with a NUL after it": (
            {"type": "foo", "run_at": "2030-01-01T00:00:00Z\u0000"},
            "run_at",
        ),
        "run_at with a space before it": (
            {"type": "foo", "run_at": " 2030-01-01T00:00:00Z"},
            "run_at",
        ),
        "no UTC offset": ({"type": "foo", "run_at": "2030-01-01T00:00:00"}, "run_at"),
        "negative seconds": ({"type": "foo", "run_at": -5}, "run_at"),
        "seconds as a string": ({"type": "foo", "run_at": "1700000000"}, "run_at"),
        "beyond year 9999": ({"type": "foo", "run_at": 253402300800}, "run_at"),
        "boolean run_at": ({"type": "foo", "run_at": False}, "run_at"),
        "unknown field": ({"type": "foo", "urgency": 1}, "urgency"),
        "operator value": ({"type": {"$ne": "foo"}}, "body"),
        "operator string": ({"type": "$where"}, "body"),
        "nested operator": ({"type": "foo", "max_attempts": {"$gt": 0}}, "body"),
        "max_attempts zero": ({"type": "foo", "max_attempts": 0}, "max_attempts"),
        "max_attempts float": ({"type": "foo", "max_attempts": 2.5}, "max_attempts"),
        # JSON's "\ud800" escape parses to a lone surrogate, which no database stores.
        "a lone surrogate in a tag": ({"type": "foo", "tags": ["\ud800"]}, "tags"),
        "a lone surrogate in args": ({"type": "baz", "args": {"note": "a\udfff"}}, "args"),
        "a lone surrogate as a key": ({"type": "foo", "\ud800": 1}, "body"),
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
    assert await store.db.tasks.count_documents({}) == 0


async def test_a_body_over_the_limit_is_413(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    small = await aiohttp_client(create_app(dataclasses.replace(settings, max_body_bytes=1024)))
    body = '{"type": "foo", "pad": "' + "x" * 2000 + '"}'
    response = await small.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    await assert_error(response, 413, "body_too_large")
    assert await store.db.tasks.count_documents({}) == 0


async def test_page_size_limit_is_a_setting(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_page_size=5)))
    assert (await client.get("/tasks?limit=5")).status == 200
    error = await assert_error(await client.get("/tasks?limit=6"), 400, "invalid_request")
    assert "limit" in error["details"]


async def test_bad_legacy_creates_are_400_and_store_nothing(api: Client, store: Store) -> None:
    for path in ("/QUX/0", "/FOO/later", "/FOO/-1", "/FOO/1e400", "/FOO/nan", "/FOO/999999999999"):
        await assert_error(await api.post(path), 400, "invalid_request")
    assert await store.db.tasks.count_documents({}) == 0


async def test_hostile_bodies_are_400_not_500(api: Client, store: Store) -> None:
    deep = "[" * 30_000 + "]" * 30_000  # 60 KB: RecursionError in json.loads
    raw_bodies = {
        "deep arrays": deep,
        "deep in a field": '{"type": "foo", "run_at": ' + "[" * 500 + "]" * 500 + "}",
        "deep objects": '{"a": ' * 200 + "1" + "}" * 200,
        "400-digit run_at": '{"type": "foo", "run_at": ' + "9" * 400 + "}",
        "negative 400 digits": '{"type": "foo", "run_at": -' + "9" * 400 + "}",
        "huge max_attempts": '{"type": "foo", "max_attempts": ' + "9" * 400 + "}",
        "5000-digit number": '{"type": "foo", "run_at": ' + "9" * 5000 + "}",
    }
    for name, raw in raw_bodies.items():
        response = await api.post("/tasks", data=raw, headers={"Content-Type": "application/json"})
        error = await assert_error(response, 400, "invalid_request")
        assert error["details"], name
    for run_at in (
        "9999-12-31T23:00:00-14:00",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59.999999-00:01",
        "0001-01-01T00:00:00+00:01",
        "\u0662\u0660\u0663\u0660-01-01T00:00:00Z",  # Arabic-Indic digits
        "\uff12\uff10\uff13\uff10-01-01T00:00:00Z",  # full-width digits
    ):
        body = json.loads('{"type": "foo", "run_at": "' + run_at + '"}')
        error = await assert_error(await api.post("/tasks", json=body), 400, "invalid_request")
        assert "run_at" in error["details"], (run_at, error)
    assert await store.db.tasks.count_documents({}) == 0
    # The extremes that do fall in years 0001 to 9999 in UTC are accepted.
    for run_at in ("9999-12-31T10:00:00-13:59", "0001-01-01T00:00:00-14:00"):
        assert (await api.post("/tasks", json={"type": "foo", "run_at": run_at})).status == 201


async def test_legacy_seconds_are_ascii_digits_only(api: Client, store: Store) -> None:
    refused = (
        "9" * 400,  # OverflowError in float conversion
        "9" * 5000,  # beyond int()'s digit limit
        "9" * 400 + ".5",
        "1_000",
        "%D9%A1%D9%A2",  # Arabic-Indic 12
        "%EF%BC%91%EF%BC%92",  # full-width 12
        "%E0%A5%A7",  # Devanagari 1
        "%2012",  # " 12"
        "12%20",
        "+12",
        "1e3",
        "0x10",
        "1.",
        ".5",
        "1.2.3",
        "inf",
    )
    for seconds in refused:
        error = await assert_error(await api.post(f"/FOO/{seconds}"), 400, "invalid_request")
        assert "run_at" in error["details"], (seconds, error)
    assert await store.db.tasks.count_documents({}) == 0
    for seconds in ("0", "1700000000", "1700000000.25", "0001700000000"):
        assert (await api.post(f"/FOO/{seconds}")).status == 201, seconds


async def test_query_integers_are_ascii_digits_only(api: Client) -> None:
    for limit in ("%D9%A1%D9%A0", "1_0", "%2010", "10%20", "+10", "9" * 5000):
        error = await assert_error(await api.get(f"/tasks?limit={limit}"), 400, "invalid_request")
        assert "limit" in error["details"], limit


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
        ("PUT", "/tasks/abc"),
        ("PUT", "/tasks/batch"),
        ("GET", "/FOO/0"),
        ("POST", "/health"),
    ):
        response = await api.request(method, path)
        await assert_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"]


# -- hostile requests against a real `task-runner api` process ----------------------------


def send(api: ApiProcess, *parts: bytes, pause: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (pausing between parts); the status, headers and body answered."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(pause)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def stop(api: ApiProcess) -> str:
    """SIGTERM, wait (failing if it does not exit within 30 s), and return the whole log."""
    api.signal(signal.SIGTERM)
    api.wait(30)
    return api.stderr()


@pytest.fixture
def api_process(store: Store, start_api: Callable[..., ApiProcess]) -> ApiProcess:
    return start_api(log_level="INFO")


def http(request_line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request that asks the server to close the connection after answering."""
    lines = [request_line, b"Host: x", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def json_post(path: bytes, body: bytes) -> bytes:
    return http(
        b"POST " + path + b" HTTP/1.1",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        body=body,
    )


def assert_json_error(answer: tuple[int, dict[str, str], bytes], status: int) -> None:
    code, headers, body = answer
    assert code == status, answer
    assert headers["Content-Type"].startswith("application/json"), answer
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details"}, answer


def test_hostile_requests_to_a_real_server_are_400_and_logged_briefly(
    api_process: ApiProcess, store: Store
) -> None:
    # Refused by the handlers: the JSON error shape, and nothing in the log.
    in_handlers = [
        json_post(b"/tasks", b"[" * 30_000 + b"]" * 30_000),
        json_post(b"/tasks", b'{"type": "foo", "run_at": "9999-12-31T23:00:00-14:00"}'),
        json_post(b"/tasks", b'{"type": "foo", "run_at": "0001-01-01T00:00:00+14:00"}'),
        json_post(b"/tasks", b'{"type": "foo", "run_at": ' + b"9" * 400 + b"}"),
        http(b"POST /FOO/" + b"9" * 400 + b" HTTP/1.1", b"Content-Length: 0"),
        http(b"POST /FOO/1_000 HTTP/1.1", b"Content-Length: 0"),
        http(b"POST /FOO/%D9%A1%D9%A2 HTTP/1.1", b"Content-Length: 0"),
    ]
    for request in in_handlers:
        assert_json_error(send(api_process, request), 400)
    # Refused by aiohttp's HTTP parser before any handler or middleware runs: a 400 (its
    # body is aiohttp's short text; no supported hook lets an application shape it).
    in_parser = [
        http(b"GET /" + b"a" * 100_000 + b" HTTP/1.1"),
        http(b"GET /health HTTP/1.1", b"X-Pad: " + b"a" * 100_000),
        http("GET /t\u00e9\u0661 HTTP/1.1".encode()),
        http(b"POST /FOO/\xd9\xa1\xd9\xa2 HTTP/1.1", b"Content-Length: 0"),
        http(
            b"POST /tasks HTTP/1.1",
            b"Content-Type: application/json",
            b"Transfer-Encoding: chunked",
            body=b"zz\r\n{}\r\n0\r\n\r\n",
        ),
        http(
            b"POST /tasks HTTP/1.1",
            b"Content-Type: application/json",
            b"Content-Length: 4",
            b"Transfer-Encoding: chunked",
            body=b"2\r\n{}\r\n0\r\n\r\n",
        ),
    ]
    for request in in_parser:
        status, _, body = send(api_process, request)
        assert status == 400, (request[:60], body)
        assert len(body) < 400, body
    log = stop(api_process)
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log
    refused = [line for line in log.splitlines() if "malformed HTTP" in line]
    assert len(refused) == len(in_parser), log
    for line in refused:
        assert len(line) < 400, line
        assert line.isascii() and line.isprintable(), line


def test_a_body_cut_off_by_the_client_is_not_a_logged_500(
    api_process: ApiProcess, store: Store
) -> None:
    # The headers promise a chunked body; the chunk that follows later is malformed, so
    # aiohttp's parser drops the body and the handler waits until the client gives up.
    head = http(
        b"POST /tasks HTTP/1.1", b"Content-Type: application/json", b"Transfer-Encoding: chunked"
    )
    with socket.create_connection(("127.0.0.1", api_process.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)
        sock.sendall(b"zz\r\n{}\r\n0\r\n\r\n")
        time.sleep(0.3)
    # A later request still works, and the log holds no traceback.
    assert_json_error(send(api_process, json_post(b"/tasks", b"{}")), 400)
    log = stop(api_process)
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


# -- tokens -------------------------------------------------------------------------------


@pytest.fixture
async def guarded(settings: Settings, store: Store, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings, api_tokens=("s3cret-one", "s3cret-two"), allow_delete_all=False
            )
        )
    )


async def test_a_token_that_is_not_utf8_is_a_401_not_a_500(guarded: Client, store: Store) -> None:
    body = b'{"type": "foo"}'
    request = http(
        b"POST /tasks HTTP/1.1",
        b"Authorization: Bearer s3cret-\xff\xfe",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        body=body,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer
    assert json.loads(payload)["error"]["code"] == "unauthorized"
    assert await store.db.tasks.count_documents({}) == 0


async def test_writes_need_a_token_when_tokens_are_set(
    guarded: Client, store: Store, caplog: Any
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
    assert await store.db.tasks.count_documents({}) == 0
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
    settings: Settings, store: Store, aiohttp_client: MakeClient
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


def swagger_ui_sample(schema: dict[str, Any], document: dict[str, Any]) -> Any:
    """The value Swagger UI pre-fills for a schema: its example, else the first enum value,
    else the first alternative of a oneOf, else a placeholder of its type ("string", 0)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return swagger_ui_sample(document["components"]["schemas"][name], document)
    if "example" in schema:
        return schema["example"]
    if "enum" in schema:
        return schema["enum"][0]
    if "oneOf" in schema:
        return swagger_ui_sample(schema["oneOf"][0], document)
    if schema.get("type") == "object" or "properties" in schema:
        return {
            name: swagger_ui_sample(prop, document)
            for name, prop in schema.get("properties", {}).items()
            if not prop.get("readOnly")
        }
    placeholders = {"string": "string", "integer": 0, "number": 0, "boolean": True}
    return placeholders[schema.get("type", "string")]


async def test_the_docs_page_pre_filled_create_request_works(api: Client, store: Store) -> None:
    document = await (await api.get("/openapi.json")).json()
    body_schema = document["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    sample = swagger_ui_sample(body_schema, document)
    fields = {
        "type",
        "run_at",
        "max_attempts",
        "args",
        "priority",
        "timeout",
        "tags",
        "queue",
        "callback_url",
    }
    assert set(sample) == fields, sample
    response = await api.post("/tasks", json=sample)
    assert response.status == 201, (sample, await response.text())
    created = await response.json()
    assert created["type"] == sample["type"]
    assert created["max_attempts"] == sample["max_attempts"]
    assert (created["priority"], created["timeout"]) == (sample["priority"], sample["timeout"])
    assert created["tags"] == sample["tags"]
    assert await store.db.tasks.count_documents({}) == 1
    # The choices are listed, so the docs page offers them.
    properties = document["components"]["schemas"]["CreateTask"]["properties"]
    assert properties["type"]["enum"] == ["foo", "bar", "baz", "http"]


async def test_earlier_version_routes_share_one_tag_in_the_docs(api: Client) -> None:
    document = await (await api.get("/openapi.json")).json()
    earlier = {
        (path, method)
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if op.get("tags") == ["earlier version"]
    }
    assert earlier == {
        ("/{type}/{unix_seconds}", "post"),
        ("/id/{id}", "get"),
        ("/id/{id}", "delete"),
        ("/taskstate/{state}", "get"),
        ("/", "delete"),
    }
    # The REST routes that share a handler with /id/{id} stay untagged.
    assert "tags" not in document["paths"]["/tasks/{id}"]["get"]
    assert "tags" not in document["paths"]["/tasks/{id}"]["delete"]
