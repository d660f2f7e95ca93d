"""One signed request to a team's service, and what its answer means: what the http type and
the completion callbacks share.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): `webhook-id` (stable
across attempts, for the receiver to deduplicate on), `webhook-timestamp` (Unix seconds) and
`webhook-signature` = `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), the key
being the base64 after `whsec_` in TASK_RUNNER_SIGNING_SECRET. Its reference libraries verify
them in any language.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from multidict import CIMultiDict

from service.destinations import Network, check_url, refused

# The start of a response body kept in a task's output or error.
MAX_SNIPPET = 1024
# The longest wait a Retry-After can ask for before the next attempt (an hour); a longer one
# is cut to this.
MAX_RETRY_AFTER = 3600.0
# Answers worth another attempt: the request timed out, came too early, too often, or the
# service failed (every 5xx).
RETRIED = frozenset({408, 425, 429})
RETRY_AFTER_HONOURED = frozenset({429, 503})
# Headers a task may not set: the transport's own and the signature's.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
SIGNATURE_PREFIX = "webhook-"


def sign(secret: str, *, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of a request, per Standard Webhooks."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    *, webhook_id: str, body: bytes, secret: str | None, traceparent: str | None = None
) -> dict[str, str]:
    """The headers every request carries: its webhook-id and timestamp, its signature when
    a secret is set, and the trace context of the request that created the task."""
    timestamp = int(time.time())
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp)}
    if secret is not None:
        headers["webhook-signature"] = sign(
            secret, webhook_id=webhook_id, timestamp=timestamp, body=body
        )
    if traceparent is not None:
        headers["traceparent"] = traceparent
    return headers


@dataclass(frozen=True)
class Answer:
    """What the service answered: its status, the start of its body, and the seconds a
    Retry-After asked for (None: none, or not on a 429 or 503)."""

    status: int
    snippet: str
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """2xx: done."""
        return 200 <= self.status < 300

    @property
    def retried(self) -> bool:
        """Worth another attempt: 408, 425, 429 and every 5xx."""
        return self.status in RETRIED or 500 <= self.status < 600

    def describe(self) -> str:
        """The status, then the start of the body (the output, or the error)."""
        return f"{self.status}\n{self.snippet}" if self.snippet else str(self.status)


class Refused(Exception):
    """The destination is refused by the network rules: no request was sent."""


async def send(
    session: aiohttp.ClientSession,
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    webhook_id: str,
    secret: str | None,
    allowed: Sequence[Network],
    traceparent: str | None = None,
) -> Answer:
    """Send one signed request (no redirect followed) with a session from guarded_session;
    its Answer. Raises Refused for a destination the rules (`allowed`: the networks opened)
    refuse, aiohttp's errors for a request that got no answer."""
    try:
        check_url(url, allowed)
    except ValueError as exc:
        raise Refused(f"destination refused: {exc}") from None
    sent = CIMultiDict(headers)
    sent.update(
        signed_headers(
            webhook_id=webhook_id, body=body or b"", secret=secret, traceparent=traceparent
        )
    )
    try:
        async with session.request(
            method, url, headers=sent, data=body, allow_redirects=False
        ) as response:
            head = await response.content.read(MAX_SNIPPET)
            retry_after = None
            if response.status in RETRY_AFTER_HONOURED:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
    except aiohttp.ClientError as exc:
        why = refused(exc)
        if why is not None:
            raise Refused(f"destination refused: {why}") from None
        raise
    return Answer(response.status, head.decode("utf-8", "replace"), retry_after)


def no_answer(exc: BaseException) -> str:
    """What a request that got no (readable) answer failed with, as an attempt's error: its
    kind and message, cut to MAX_SNIPPET characters (aiohttp's parse errors quote what the
    service sent, which may be any length)."""
    said = f"{type(exc).__name__}: {exc}"
    return said if len(said) <= MAX_SNIPPET else said[:MAX_SNIPPET] + " [cut]"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A Retry-After's seconds from now (a number of seconds, or an HTTP date), at most
    MAX_RETRY_AFTER; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def http_date(when: datetime) -> str:
    """`when` as an HTTP date (for Retry-After in tests and docs)."""
    return email.utils.format_datetime(when.astimezone(UTC), usegmt=True)
