"""Safe destinations for http tasks and callbacks, with the default rules: internal addresses
in any spelling refused at create (a 400 naming args.url), a name that resolves to loopback
never contacted; the http type's other argument checks; its schema in OpenAPI."""

from __future__ import annotations

import ipaddress
import socket
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks
from aiohttp.test_utils import TestClient

from service.destinations import GuardedResolver, check_url, guarded_session
from service.webhooks import Refused, parse_retry_after, send, signed_headers
from tests.calling import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = "127.0.0.0/8"

REFUSED_HOSTS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "169.254.169.254",
    "[fe80::1]",
    "10.0.0.1",
    "10.255.1.2",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.254",
    "[fd00::1]",
    "[fc00::1]",
    "0.0.0.0",
    "0",
    "[::]",
    "224.0.0.1",
    "[ff02::1]",
    "240.0.0.1",
    "localhost",
    "LOCALHOST",
    "foo.localhost",
    "127.0.0.1.",
    "[64:ff9b::7f00:1]",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_internal_addresses_in_any_spelling_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match=r"not a destination|not a valid address"):
        check_url(f"http://{host}:8080/hook")


@pytest.mark.parametrize(
    "url", ["https://api.example.com/jobs/42", "http://93.184.216.34/", "https://[2606:4700::1]/"]
)
def test_public_destinations_are_accepted(url: str) -> None:
    assert str(check_url(url)) == url


def test_an_allowed_network_opens_only_itself() -> None:
    opened = [ipaddress.ip_network(LOOPBACK)]
    check_url("http://127.0.0.1:9/", opened)
    check_url("http://localhost:9/", opened)
    with pytest.raises(ValueError):
        check_url("http://10.0.0.1/", opened)
    with pytest.raises(ValueError, match="http:// or https://"):
        check_url("file:///etc/passwd", opened)


async def test_create_refuses_an_internal_url_naming_args_url(api: TestClient[Any, Any]) -> None:
    for host in ("127.1", "169.254.169.254", "[::ffff:127.0.0.1]", "localhost"):
        body = {"type": "http", "args": {"url": f"http://{host}/"}}
        response = await api.post("/tasks", json=body)
        assert response.status == 400, host
        answer = await response.json()
        assert "url" in answer["error"]["details"]["args"], answer


async def test_create_checks_method_headers_and_body(api: TestClient[Any, Any]) -> None:
    url = "https://api.example.com/hook"
    bad = [
        {"url": url, "method": "TRACE"},
        {"url": url, "headers": {"Host": "evil"}},
        {"url": url, "headers": {"webhook-id": "x"}},
        {"url": url, "headers": {"X-A": "b\r\nX-B: c"}},
        {"url": url, "method": "GET", "body": "text"},
        {"url": url, "surprise": 1},
    ]
    for args in bad:
        response = await api.post("/tasks", json={"type": "http", "args": args})
        assert response.status == 400, args
    good = {"url": url, "method": "put", "headers": {"X-Team": "acme"}, "body": {"n": 1}}
    response = await api.post("/tasks", json={"type": "http", "args": good})
    assert response.status == 201
    assert (await response.json())["args"] == {**good, "method": "PUT"}


async def test_the_args_schema_is_in_openapi(api: TestClient[Any, Any]) -> None:
    document = await (await api.get("/openapi.json")).json()
    schema = document["components"]["schemas"]["Args.http"]
    assert schema["required"] == ["url"]
    assert set(schema["properties"]) == {"url", "method", "headers", "body"}


async def test_a_name_that_resolves_to_loopback_is_never_contacted() -> None:
    name = socket.gethostname()
    infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    if not all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
        pytest.skip(f"{name} does not resolve to loopback here")
    receiver = Receiver()
    await receiver.start()
    try:
        async with guarded_session() as session:
            for url in (f"http://{name}:{receiver.port}/", f"http://localhost:{receiver.port}/"):
                with pytest.raises(Refused, match="destination refused"):
                    await send(
                        session,
                        method="POST",
                        url=url,
                        headers={},
                        body=b"{}",
                        webhook_id="t",
                        secret=SECRET,
                        allowed=(),
                    )
        results = await GuardedResolver([ipaddress.ip_network(LOOPBACK)]).resolve(name, 80)
        assert results and all(r["host"].startswith("127.") for r in results)
    finally:
        await receiver.close()
    assert receiver.received == []


def test_retry_after_in_seconds_or_as_a_date_is_capped() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("999999") == 3600.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_create_refuses_an_internal_callback_url_naming_it(
    api: TestClient[Any, Any],
) -> None:
    for path, body in (
        ("/tasks", {"type": "baz"}),
        ("/schedules", {"type": "baz", "every": 60}),
    ):
        for url in ("http://10.0.0.1/done", "http://[::1]/done", "ftp://example.com/"):
            response = await api.post(path, json={**body, "callback_url": url})
            assert response.status == 400, (path, url)
            answer = await response.json()
            assert list(answer["error"]["details"]) == ["callback_url"], answer
        ok = await api.post(path, json={**body, "callback_url": "https://example.com/done"})
        assert ok.status == 201, await ok.text()
        assert (await ok.json())["callback_url"] == "https://example.com/done"


@pytest.mark.parametrize("body", [b"", b'{"a":1}', "h\u00e9llo \u2603".encode(), bytes(range(256))])
def test_signatures_match_the_reference_byte_for_byte(body: bytes) -> None:
    headers = signed_headers(webhook_id="msg_1", body=body, secret=SECRET)
    reference = standardwebhooks.Webhook(SECRET)
    when = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    assert headers["webhook-signature"] == reference.sign("msg_1", when, body)
    reference.verify(body, headers, json_parse=False)
    assert "webhook-signature" not in signed_headers(webhook_id="m", body=body, secret=None)


async def test_a_url_that_cannot_be_stored_is_a_400_naming_its_field(
    api: TestClient[Any, Any],
) -> None:
    # A lone surrogate is valid JSON ("\ud800") but no UTF-8 the database can store.
    url = "https://example.com/done\ud800"
    for path, body in (
        ("/tasks", {"type": "baz", "callback_url": url}),
        ("/schedules", {"type": "baz", "every": 60, "callback_url": url}),
        ("/tasks", {"type": "http", "args": {"url": url}}),
    ):
        response = await api.post(path, json=body)
        assert response.status == 400, (path, await response.text())
        details = (await response.json())["error"]["details"]
        # Named by its place: refused with the body's other strings that are not text.
        assert set(details) <= {"callback_url", "args"} and len(details) == 1, details
        if "args" in details:
            assert set(details["args"]) == {"url"}, details


async def test_the_outbound_client_leaves_the_time_limit_to_the_task() -> None:
    # aiohttp's own default cuts every request at 5 minutes (30 s to connect): an http task
    # whose timeout is longer (up to 7 days) would time out at 300 s, and be retried to
    # failure, against a service that answers in 6 minutes. The task's timeout (and a
    # callback's 10 s) is the only bound.
    session = guarded_session()
    try:
        assert (session.timeout.total, session.timeout.connect) == (None, None)
        assert (session.timeout.sock_connect, session.timeout.sock_read) == (None, None)
    finally:
        await session.close()


async def test_credentials_in_the_url_and_an_authorization_header_are_refused_at_create(
    api: TestClient[Any, Any],
) -> None:
    # aiohttp refuses to send both (a ValueError before any byte is sent): accepted, such a
    # task would fail every attempt, retried to max_attempts, without ever being sent.
    args = {"url": "https://u:p@api.example.com/hook", "headers": {"authorization": "Bearer t"}}
    response = await api.post("/tasks", json={"type": "http", "args": args})
    assert response.status == 400, await response.text()
    assert list((await response.json())["error"]["details"]["args"]) == ["headers"]
    for alone in ({"url": args["url"]}, {**args, "url": "https://api.example.com/hook"}):
        response = await api.post("/tasks", json={"type": "http", "args": alone})
        assert response.status == 201, await response.text()


def test_port_0_is_refused_as_65536_is() -> None:
    # Nothing listens on port 0: accepted, a task would be retried to max_attempts, unsent.
    for url in ("https://api.example.com:0/hook", "https://api.example.com:65536/hook"):
        with pytest.raises(ValueError, match=r"port|not a URL"):
            check_url(url)
    assert check_url("https://api.example.com:1/hook").port == 1
    assert check_url("https://api.example.com:65535/hook").port == 65535
