"""Property-based fuzzing of the live API: hypothesis generates hundreds of requests, valid
and hostile; none may get a 5xx, every answer must match the OpenAPI document, and a
refused request must leave the database unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from pymongo import MongoClient

from service.config import Settings
from service.web.keys import OPENAPI
from service.web.schemas.fields import YEAR_10000
from tests.helpers import LiveApi

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
# Hostile classes (issue 9): each once answered 500.
# Unicode decimal digits of every script (Arabic-Indic, full-width, N'Ko...): int() and
# float() take them.
ODD_DIGITS = st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=6)
HUGE_INT = st.integers(min_value=10**15, max_value=10**500) | st.integers(
    min_value=-(10**500), max_value=-(10**15)
)
# The first and last days ISO 8601 can write, with any UTC offset: some fall outside years
# 0001 to 9999 once in UTC.
EXTREME_DATE = st.builds(
    lambda day, seconds, sign, minutes: (
        f"{day}T{seconds // 3600:02}:{seconds // 60 % 60:02}:{seconds % 60:02}"
        f"{sign}{minutes // 60:02}:{minutes % 60:02}"
    ),
    st.sampled_from(["0001-01-01", "0001-01-02", "9999-12-31", "9999-12-30"]),
    st.integers(0, 86_399),
    st.sampled_from("+-"),
    st.integers(0, 23 * 60 + 59),
)
NESTING = st.integers(20, 6000)
# Raw JSON text nested up to 6,000 deep (under 64 KB): far past json.loads' recursion limit.
DEEP_JSON = st.one_of(
    NESTING.map(lambda depth: "[" * depth + "]" * depth),
    NESTING.map(lambda depth: '{"a": ' * depth + "1" + "}" * depth),
    NESTING.map(lambda depth: '{"a": [' * depth + "]}" * depth),
)
RUN_AT = (
    st.integers(min_value=-10, max_value=260_000_000_000)
    | st.floats(allow_nan=False)
    | st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00", "now", "", "$gt"])
    | st.datetimes().map(lambda d: d.isoformat())
    | JSON
    | HUGE_INT
    | EXTREME_DATE
    | ODD_DIGITS
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
# Numbers as JSON text: up to 6,000 digits (json.loads refuses over 4,300), and 1e400.
HUGE_NUMBER_TEXT = st.integers(16, 6000).map(lambda n: "9" * n) | st.sampled_from(
    ["1e400", "-1e400", "-" + "9" * 400, "9" * 400 + ".5"]
)
RUN_AT_TEXT = HUGE_NUMBER_TEXT | DEEP_JSON | RUN_AT.map(json.dumps)
HOSTILE_CREATE_TEXT = st.builds(
    lambda run_at: '{"type": "foo", "run_at": ' + run_at + "}", RUN_AT_TEXT
)
# POST /tasks/batch bodies, and PATCH /tasks/{id} bodies (fields of a create, and others).
BATCH_BODY = st.fixed_dictionaries({"tasks": st.lists(CREATE_BODY | JSON, max_size=3)})
CHANGE_BODY = st.fixed_dictionaries(
    {},
    optional={"run_at": RUN_AT, "priority": st.integers(-12, 12) | JSON, "tags": JSON},
)
BODY = (
    st.none()
    | CREATE_BODY.map(json.dumps)
    | BATCH_BODY.map(json.dumps)
    | CHANGE_BODY.map(json.dumps)
    | JSON.map(json.dumps)
    | st.binary(max_size=60)
    | DEEP_JSON
    | HOSTILE_CREATE_TEXT
)
# Digit strings as a path or query holds them: ASCII digits mixed with other scripts'
# digits, underscores, signs, spaces, exponents, and hundreds of digits.
DIGITS_TEXT = (
    ODD_DIGITS
    | st.integers(1, 600).map(lambda n: "9" * n)
    | st.lists(
        st.sampled_from("0123456789") | st.characters(categories=["Nd"]), min_size=1, max_size=12
    ).map("".join)
    # Not "." or "..": the URL would name another path.
    | st.text(alphabet="0123456789_. +-eEx", min_size=1, max_size=12).filter(
        lambda text: text.strip(".")
    )
    | st.sampled_from(["1_000", "1e3", " 12", "+12", ".5", "1.", "0x10", "inf", "nan", "1.2.3"])
)
QUERY_KEY = st.sampled_from(["state", "type", "tag", "limit", "cursor", "state[$ne]"]) | st.text(
    min_size=1, max_size=8
)
QUERY_VALUE = (
    st.sampled_from(["COMPLETE", "notstarted", "foo", "$ne", "0", "100", "1001", "WzEsICJ4Il0"])
    | st.text(max_size=20)
    | DIGITS_TEXT
)
SEGMENT = (
    OBJECT_ID
    | st.sampled_from(["FOO", "bar", "0", "1700000000", "-1", "STARTED", "tasks", "batch", "%24ne"])
    | st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="/?#%"), min_size=1, max_size=12
    )
    | DIGITS_TEXT
)
LEGACY_TYPE = st.sampled_from(["FOO", "bar", "Baz"])
PATH = st.one_of(
    st.sampled_from(["/tasks", "/tasks/batch", "/", "/health", "/openapi.json", "/taskstate"]),
    st.tuples(st.sampled_from(["/tasks/", "/id/", "/taskstate/", "/"]), SEGMENT).map("".join),
    st.tuples(SEGMENT, SEGMENT).map(lambda p: f"/{p[0]}/{p[1]}"),
    st.tuples(LEGACY_TYPE, DIGITS_TEXT).map(lambda p: f"/{p[0]}/{p[1]}"),
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


# -- hostile inputs, each with the one answer it must get -------------------------------------

LEGACY_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
HOSTILE = st.one_of(
    st.tuples(st.just("run_at"), RUN_AT_TEXT),
    st.tuples(st.just("legacy"), DIGITS_TEXT),
    st.tuples(st.just("limit"), DIGITS_TEXT),
)


def expected_status(kind: str, value: str, *, body: bytes, max_body: int) -> int:
    """What the API must answer, decided independently of its code."""
    if len(body) > max_body:
        return 413
    if kind == "legacy":
        valid = LEGACY_SECONDS.fullmatch(value) and float(value) < YEAR_10000
        return 201 if valid else 400
    if kind == "limit":
        return 200 if re.fullmatch("[0-9]+", value) and 1 <= int(value) <= 1000 else 400
    try:
        run_at = json.loads(value)
    except (ValueError, RecursionError):
        return 400
    if isinstance(run_at, bool) or not isinstance(run_at, int | float | str):
        return 400
    if not isinstance(run_at, str):
        return 201 if 0 <= run_at < YEAR_10000 else 400  # NaN and infinities compare false
    if not (run_at.isascii() and run_at.isprintable() and run_at == run_at.strip()):
        return 400  # ISO 8601 is printable ASCII, nothing around it
    try:
        parsed = datetime.fromisoformat(run_at)
        if parsed.tzinfo is None:
            return 400
        parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return 400
    return 201


def test_hostile_inputs_get_the_answer_they_deserve(
    live: tuple[LiveApi, MongoClient[dict[str, Any]]], settings: Settings
) -> None:
    api, client = live
    tasks = client[settings.database]["tasks"]

    @hypothesis_settings(FUZZ, max_examples=200)
    @given(case=HOSTILE)
    def one(case: tuple[str, str]) -> None:
        kind, value = case
        method, path, query, text = "POST", "/tasks", [], ""
        if kind == "run_at":
            text = '{"type": "foo", "run_at": ' + value + "}"
        elif kind == "legacy":
            path = f"/FOO/{value}"
        else:
            method, query = "GET", [("limit", value)]
        request = {"method": method, "path": path, "query": query, "body": text or None}
        before = tasks.count_documents({})
        status, headers, raw = api.send({**request, "content_type": "application/json"})
        body = text.encode()
        expected = expected_status(kind, value, body=body, max_body=settings.max_body_bytes)
        assert status == expected, (case, status, raw[:300])
        if status >= 400:
            assert headers["Content-Type"].startswith("application/json"), (case, raw[:300])
            assert set(json.loads(raw)["error"]) == {"code", "message", "details"}
            assert tasks.count_documents({}) == before, case

    one()


def test_fuzzed_batches_answer_one_result_per_item_and_store_exactly_the_tasks(
    live: tuple[LiveApi, MongoClient[dict[str, Any]]], settings: Settings
) -> None:
    api, client = live
    document = api.app[OPENAPI]
    tasks = client[settings.database]["tasks"]
    answers = document["paths"]["/tasks/batch"]["post"]["responses"]
    statuses: dict[int, int] = {}
    outcomes = {"task": 0, "error": 0}

    @hypothesis_settings(FUZZ, max_examples=150)
    @given(body=BATCH_BODY)
    def one(body: dict[str, Any]) -> None:
        before = tasks.count_documents({})
        request = {"method": "POST", "path": "/tasks/batch", "query": [], "body": json.dumps(body)}
        status, _, raw = api.send({**request, "content_type": "application/json"})
        statuses[status] = statuses.get(status, 0) + 1
        answer = json.loads(raw)
        schema = resolve(answers[str(status)]["content"]["application/json"]["schema"], document)
        OAS30Validator(schema).validate(answer)
        if status != 200:
            assert status == 400, (body, status, raw[:300])
            assert tasks.count_documents({}) == before, body
            return
        results = answer["results"]
        assert len(results) == len(body["tasks"])
        created = [r["id"] for r in results if "id" in r]
        assert tasks.count_documents({}) == before + len(created), (body, results)
        outcomes["task"] += len(created)
        outcomes["error"] += len(results) - len(created)

    one()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
    assert outcomes["task"] > 0 and outcomes["error"] > 0, outcomes
