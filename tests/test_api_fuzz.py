"""Property-based fuzzing of the live API: hypothesis generates hundreds of requests, valid
and hostile; none may get a 5xx, every answer must match the OpenAPI document, and a
refused request must leave the database unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from pymongo import MongoClient

from service.api import OPENAPI
from service.app import create_app
from service.config import Settings
from service.localdb import free_port

OBJECT_ID = st.text(alphabet="0123456789abcdef", min_size=24, max_size=24)
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
RUN_AT = (
    st.integers(min_value=-10, max_value=260_000_000_000)
    | st.floats(allow_nan=False)
    | st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00", "now", "", "$gt"])
    | st.datetimes().map(lambda d: d.isoformat())
    | JSON
)
TYPE = st.sampled_from(["foo", "BAR", "Baz", "qux", "", "$ne"]) | JSON
CREATE_BODY = st.fixed_dictionaries(
    {},
    optional={
        "type": TYPE,
        "run_at": RUN_AT,
        "max_attempts": st.integers(-2, 200) | JSON,
        "extra": JSON,
    },
)
BODY = st.none() | CREATE_BODY.map(json.dumps) | JSON.map(json.dumps) | st.binary(max_size=60)
QUERY_KEY = st.sampled_from(["state", "type", "limit", "cursor", "state[$ne]"]) | st.text(
    min_size=1, max_size=8
)
QUERY_VALUE = st.sampled_from(
    ["COMPLETE", "notstarted", "foo", "$ne", "0", "100", "1001", "WzEsICJ4Il0"]
) | st.text(max_size=20)
SEGMENT = (
    OBJECT_ID
    | st.sampled_from(["FOO", "bar", "0", "1700000000", "-1", "STARTED", "tasks", "%24ne"])
    | st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="/?#%"), min_size=1, max_size=12
    )
)
PATH = st.one_of(
    st.sampled_from(["/tasks", "/", "/health", "/openapi.json", "/taskstate"]),
    st.tuples(st.sampled_from(["/tasks/", "/id/", "/taskstate/", "/"]), SEGMENT).map("".join),
    st.tuples(SEGMENT, SEGMENT).map(lambda p: f"/{p[0]}/{p[1]}"),
)
REQUEST = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
        "path": PATH,
        "query": st.lists(st.tuples(QUERY_KEY, QUERY_VALUE), max_size=3),
        "body": BODY,
        "content_type": st.sampled_from(["application/json", "text/plain", None]),
    }
)


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


def resolve(node: Any, document: dict[str, Any]) -> Any:
    """Inline every $ref, so a plain validator can check answers against the document."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return resolve(document["components"]["schemas"][name], document)
        return {key: resolve(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, document) for value in node]
    return node


def route_for(
    document: dict[str, Any], order: list[str], method: str, path: str
) -> tuple[str | None, bool]:
    """The documented path template serving (method, path) as the router resolves it, and
    whether any template matched the path at all (so 405, not 404)."""
    matched_any = False
    for template in order:
        # aiohttp matches a {name} segment with [^{}/]+.
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^{}/]+", template) + "$"
        if re.match(pattern, urllib.parse.unquote(path)):
            matched_any = True
            if method.lower() in document["paths"][template]:
                return template, True
    return None, matched_any


FUZZ = hypothesis_settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.fixture
def live(settings: Settings) -> Iterator[tuple[LiveApi, MongoClient[dict[str, Any]]]]:
    fuzz_settings = dataclasses.replace(settings, allow_delete_all=False)
    with LiveApi(fuzz_settings) as api:
        client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_url)
        yield api, client
        client.drop_database(settings.database)
        client.close()


def test_fuzzed_requests_never_5xx_and_match_the_document(
    live: tuple[LiveApi, MongoClient[dict[str, Any]]], settings: Settings
) -> None:
    api, client = live
    document = api.app[OPENAPI]
    order: list[str] = []
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        template = info.get("path") or info.get("formatter")
        if template and template in document["paths"] and template not in order:
            order.append(template)
    tasks = client[settings.database]["tasks"]
    seen_statuses: dict[int, int] = {}

    @FUZZ
    @given(request=REQUEST)
    def one(request: dict[str, Any]) -> None:
        before = tasks.count_documents({})
        status, headers, raw = api.send(request)
        seen_statuses[status] = seen_statuses.get(status, 0) + 1
        assert status < 500, (request, status, raw[:500])
        body = (
            json.loads(raw)
            if raw and headers.get("Content-Type", "").startswith("application/json")
            else None
        )
        template, matched = route_for(document, order, request["method"], request["path"])
        if status >= 400:
            assert body is not None and set(body) == {"error"}, (request, status, raw[:300])
            assert set(body["error"]) == {"code", "message", "details"}
            assert tasks.count_documents({}) == before, request
        if template is None:
            assert status == (405 if matched else 404), (request, status)
            return
        responses = document["paths"][template][request["method"].lower()]["responses"]
        assert str(status) in responses, (request, status, raw[:300])
        content = responses[str(status)].get("content")
        if content is None:
            assert not raw, (request, status)
            return
        schema = resolve(content["application/json"]["schema"], document)
        OAS30Validator(schema).validate(body)

    one()
    # The fuzzer reached both sides of the contract.
    assert any(s < 300 for s in seen_statuses), seen_statuses
    assert seen_statuses.get(400, 0) > 0, seen_statuses
