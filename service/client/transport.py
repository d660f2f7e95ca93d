"""HTTP for the client: one aiohttp session, the bearer token, JSON both ways, and retries
with exponential backoff.

What is retried: a connection that could not be made (nothing was sent), for every call;
and, for the calls that are safe to repeat, a connection that broke before the answer, a
timeout, and a 502, 503 or 504 answer. Safe to repeat: reads, a create (it carries one
Idempotency-Key across its retries, so the API creates the task once), and the calls whose
second application changes nothing (update, delete, requeue, pause, resume, the bulk
actions). A schedule or a batch created without a key is not repeated once it may have
reached the API.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from service import version
from service.client.errors import ConnectionFailed, error_from_answer

RunAt = datetime | float | str


def given(**fields: Any) -> dict[str, Any]:
    """The fields that were given (not None): the client sends only those."""
    return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Retry:
    """How often and how patiently the client tries a call again.

    `attempts`: tries in all (1: never again). After the n-th failure it waits `backoff`
    seconds doubled n-1 times, at most `backoff_max`, shortened at random by up to half (so
    clients that failed together do not come back together), and never less than the
    Retry-After the API asked for (itself capped at `backoff_max`).

        AsyncClient(url, retry=Retry(attempts=6, backoff=0.5, backoff_max=10))
    """

    attempts: int = 4
    backoff: float = 0.25
    backoff_max: float = 5.0
    statuses: frozenset[int] = field(default=frozenset({502, 503, 504}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("backoff and backoff_max must be at least 0")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1 for the first)."""
        wait = min(self.backoff_max, self.backoff * 2.0 ** (failures - 1))
        wait *= random.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.backoff_max))
        return wait


@dataclass(frozen=True)
class Answer:
    """An answer of the API: its status, its body decoded (None when empty or not JSON),
    and whether an earlier attempt of the same call may have been carried out (`doubt`)."""

    status: int
    body: Any
    text: str
    headers: Mapping[str, str]
    doubt: bool = False


def encode(value: Any) -> Any:
    """JSON for what the client sends: datetimes as ISO 8601 (an aware one keeps its offset;
    the API refuses a naive one), tuples and sets as lists."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


class Transport:
    """The requests of one client: one aiohttp session (made on first use, on the running
    event loop), the bearer token on each request, retries after `retry`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        retry: Retry,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the API's URL must begin with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self.headers = {"Accept": "application/json", "User-Agent": f"task-runner/{version()}"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        repeatable: bool,
        seconds: float | None = None,
    ) -> Answer:
        """Send the request, trying again after `retry`; the answer, an error status
        included. `repeatable`: safe to send again once it may have reached the API.
        `seconds`: how long each attempt may take (default: the client's timeout).
        ConnectionFailed when no attempt got an answer."""
        data = None if body is None else json.dumps(body, default=encode).encode()
        sent_headers = {**self.headers, **(headers or {})}
        if data is not None:
            sent_headers["Content-Type"] = "application/json"
        doubt = False
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                answer = await self._send(method, path, params, data, sent_headers, seconds)
            except aiohttp.ClientConnectorError as exc:  # not connected: nothing was sent
                if last:
                    raise ConnectionFailed(f"{method} {path}: {exc}") from exc
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:  # sent; the answer is lost
                if last or not repeatable:
                    raise ConnectionFailed(f"{method} {path}: {exc!r}") from exc
                doubt = True
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            doubt = doubt or answer.doubt
            if last or not repeatable or answer.status not in self.retry.statuses:
                return Answer(answer.status, answer.body, answer.text, answer.headers, doubt)
            doubt = True
            await asyncio.sleep(self.retry.delay(attempt, _seconds(answer.headers)))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        data: bytes | None,
        headers: Mapping[str, str],
        seconds: float | None,
    ) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        sent = 0

        async def count(
            request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
        ) -> aiohttp.ClientResponse:
            # aiohttp sends a GET or DELETE again, once, by itself when the connection
            # breaks: a second send means the first may have been carried out.
            nonlocal sent
            sent += 1
            return await handler(request)

        async with self._session.request(
            method,
            self.url + path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=seconds or self.timeout),
            middlewares=(count,),
        ) as response:
            raw = await response.read()
            text = raw.decode("utf-8", "replace")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            return Answer(response.status, body, text, response.headers.copy(), sent > 1)

    async def delete(self, path: str) -> None:
        """DELETE, retried: a 404 after an attempt whose answer was lost means that attempt
        (or another client) deleted it, which is what was asked."""
        answer = await self.request("DELETE", path, repeatable=True)
        if answer.status >= 400 and not (answer.status == 404 and answer.doubt):
            raise error_from_answer(answer.status, answer.body, answer.text)

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        repeatable: bool = True,
        seconds: float | None = None,
    ) -> Answer:
        """`request`, with an error answer raised as its ApiError."""
        answer = await self.request(
            method,
            path,
            params=params,
            body=body,
            headers=headers,
            repeatable=repeatable,
            seconds=seconds,
        )
        if answer.status >= 400:
            raise error_from_answer(answer.status, answer.body, answer.text)
        return answer


def _seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (the API sends whole seconds; an HTTP date is ignored)."""
    raw = headers.get("Retry-After", "")
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None
