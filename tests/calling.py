"""A team's service, as http tasks and callbacks reach it: a local HTTP receiver that records
every request, the settings that open loopback to it and sign requests, and the check that
each request verifies with the Standard Webhooks reference library."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import standardwebhooks
from aiohttp import web

from service.config import Settings


class Received:
    """One request a Receiver got."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.monotonic()

    @property
    def webhook_id(self) -> str:
        """The Standard Webhooks id it carried."""
        return self.headers.get("webhook-id", "")


SIGNING_SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
LOOPBACK = "127.0.0.0/8"


def calling(settings: Settings) -> Settings:
    """These settings with loopback opened to http tasks and callbacks (a Receiver is on
    it) and requests signed with SIGNING_SECRET."""
    return dataclasses.replace(
        settings, http_allow_networks=(LOOPBACK,), signing_secret=SIGNING_SECRET
    )


def verify(received: Received) -> Any:
    """The request verifies with the Standard Webhooks reference library (raises otherwise);
    its payload: decoded when it is JSON, else the body's bytes."""
    is_json = received.headers.get("content-type", "").startswith("application/json")
    hook = standardwebhooks.Webhook(SIGNING_SECRET)
    payload = hook.verify(received.body, received.headers, json_parse=is_json)
    return payload if is_json else received.body


# (status, headers) to answer; or None to hold the request open until the receiver closes.
Answer = tuple[int, dict[str, str]] | None


class Receiver:
    """A local HTTP service (aiohttp) that records every request (headers lowercased) and
    answers what `answer(request number, the request)` says: 200 by default."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer: Callable[[int, Received], Answer] = lambda n, r: (200, {})
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        """Its base URL, ending in /."""
        return f"http://127.0.0.1:{self.port}/"

    def by_id(self) -> Counter[str]:
        """How many requests came with each webhook-id."""
        return Counter(r.webhook_id for r in self.received)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Let go of held requests and stop."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        got = Received(request.method, request.path, headers, await request.read())
        self.received.append(got)
        answer = self.answer(len(self.received), got)
        if answer is None:
            await self._closing.wait()
            return web.Response(status=503)
        status, extra = answer
        return web.Response(status=status, text=f"answer {len(self.received)}", headers=extra)
