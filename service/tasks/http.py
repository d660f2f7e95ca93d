"""Http: one request to the URL in the task's args, signed per Standard Webhooks, and the
answer decides (docs/calling-services.md).

2xx completes, with the status then the start of the body as output; 408, 425, 429, 5xx, no
answer and a timeout are retried with the task's backoff (a Retry-After on 429 or 503 sets
the next attempt's time, at most MAX_RETRY_AFTER); any other status fails the task at once.
The URL reaches only destinations the network rules allow (service.destinations): this is the
one type whose argument is an address, and the rules are what keep that safe.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates_schema,
)
from yarl import URL

from service import webhooks
from service.destinations import check_url
from service.plugins import Fail, Retry, TaskContext, task_type

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
DEFAULT_TIMEOUT = 30.0
MAX_HEADERS = 50
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]{0,8192}")


def _url(url: str) -> None:
    try:
        check_url(url)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


def _headers(headers: dict[str, str]) -> None:
    if len(headers) > MAX_HEADERS:
        raise ValidationError(f"at most {MAX_HEADERS} headers")
    for name, value in headers.items():
        lowered = name.lower()
        if not _TOKEN.fullmatch(name):
            raise ValidationError(f"{name!r} is not a header name")
        if lowered in webhooks.RESERVED_HEADERS or lowered.startswith(webhooks.SIGNATURE_PREFIX):
            raise ValidationError(
                f"{name} is set by the service (Host, Content-Length, Transfer-Encoding, "
                "Connection and the webhook-* signature headers cannot be given)"
            )
        if not _VALUE.fullmatch(value):
            raise ValidationError(f"the value of {name} has characters a header cannot hold")


class HttpArgs(Schema):
    """The http type's arguments."""

    class Meta:
        unknown = RAISE

    url = fields.String(
        required=True,
        validate=_url,
        metadata={
            "description": "http:// or https://; not a loopback, private, link-local or other "
            "internal address unless TASK_RUNNER_HTTP_ALLOW_NETWORKS opens it",
            "example": "https://api.example.com/jobs/42",
            "maxLength": 2048,
        },
    )
    method = fields.String(
        load_default="POST",
        validate=validate.OneOf(METHODS),
        metadata={"description": "any letter case; default POST"},
    )
    headers = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        load_default=None,
        validate=_headers,
        metadata={
            "description": "sent as given; not Host, Content-Length or the webhook-* "
            "signature headers"
        },
    )
    body = fields.Raw(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "a string is sent as is (text/plain unless headers give a "
            "Content-Type), any other JSON value as JSON; null or omitted: no body"
        },
    )

    @pre_load
    def _method_in_any_case(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            return {**data, "method": data["method"].upper()}
        return data

    @validates_schema
    def _one_authorization(self, data: dict[str, Any], **kwargs: Any) -> None:
        # aiohttp sends credentials in the URL as Authorization, and refuses both at once.
        url = URL(data["url"])
        given = {name.lower() for name in data.get("headers") or {}}
        if "authorization" in given and (url.user is not None or url.password is not None):
            raise ValidationError(
                "Authorization cannot be given with credentials in the URL", field_name="headers"
            )

    @validates_schema
    def _bodiless(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("method") in ("GET", "HEAD") and data.get("body") is not None:
            raise ValidationError("GET and HEAD requests take no body", field_name="body")


def _body(args: dict[str, Any]) -> tuple[bytes | None, dict[str, str]]:
    """The bytes to send and the headers to send them with."""
    headers = dict(args.get("headers") or {})
    body = args.get("body")
    if body is None:
        return None, headers
    given = {name.lower() for name in headers}
    if isinstance(body, str):
        if "content-type" not in given:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        return body.encode(), headers
    if "content-type" not in given:
        headers["Content-Type"] = "application/json"
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(), headers


@task_type("http", args=HttpArgs, timeout=DEFAULT_TIMEOUT)
async def http(ctx: TaskContext, args: dict[str, Any]) -> str:
    """Send the request; its status and the start of its body."""
    if ctx.outbound is None:
        raise Fail("this worker has no outbound HTTP client (http tasks run in a worker)")
    body, headers = _body(args)
    try:
        answer = await webhooks.send(
            ctx.outbound,
            method=args["method"],
            url=args["url"],
            headers=headers,
            body=body,
            webhook_id=ctx.task_id,
            secret=ctx.settings.signing_secret,
            allowed=ctx.settings.allowed_networks,
            traceparent=ctx.traceparent,
        )
    except webhooks.Refused as exc:
        raise Fail(str(exc)) from None
    except aiohttp.ClientError as exc:
        raise Retry(webhooks.no_answer(exc)) from None
    if answer.ok:
        return answer.describe()
    if answer.retried:
        raise Retry(f"HTTP {answer.describe()}", after=answer.retry_after)
    raise Fail(f"HTTP {answer.describe()}")
