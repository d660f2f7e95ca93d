"""The dashboard (GET /ui: static files in service/web/static/ui, no build step, nothing from
the network) and its live feed (GET /events: Server-Sent Events from one TaskFeed per
process). Everything the page shows or does goes through the REST API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from service.web.feed import TaskFeed
from service.web.keys import SETTINGS, STORE, TASK_FEED
from service.web.openapi import answers, operation

STATIC = Path(__file__).parent / "static" / "ui"
# A comment line every so often: proxies keep the stream, and a client that left is noticed.
KEEPALIVE = 5.0
# Sent with each stream: how soon (ms) the browser's EventSource reconnects.
RETRY_MS = 1000
# No script, style or connection but the API's own; no inline script (defence in depth:
# the page also builds every element with textContent, never with HTML from the data).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

routes = web.RouteTableDef()


@routes.get("/ui")
@answers("text/html")
@operation(
    "the dashboard (an HTML page for people)",
    operation_id="getDashboard",
    responses={200: None},
    tags=["dashboard"],
)
async def dashboard(request: web.Request) -> web.StreamResponse:
    """The dashboard: an HTML page whose scripts call this API."""
    return web.FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


@routes.get("/events")
@answers("text/event-stream")
@operation(
    "task changes as Server-Sent Events",
    operation_id="streamEvents",
    responses={200: None},
    tags=["dashboard"],
)
async def events(request: web.Request) -> web.StreamResponse:
    """A text/event-stream: one `data:` line of JSON per task insert, delete or change of
    state ({"op", "id", "state", "type"}), {"op": "open"} once changes are watched, and
    {"op": "changed"} where the server has no change streams (polled). Each stream ends
    before TASK_RUNNER_REQUEST_TIMEOUT; clients reconnect (EventSource does by itself)."""
    feed = request.app[TASK_FEED]
    timeout = request.app[SETTINGS].request_timeout
    # End the stream before the timeout middleware would answer 503 on top of it.
    lifetime = timeout - min(1.0, timeout / 4)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lifetime
    with feed.subscribe() as queue:
        await response.prepare(request)
        try:
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            while (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(KEEPALIVE, remaining)):
                        event = await queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:  # the app is shutting down
                    break
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:  # the client left (aiohttp's error subclasses it)
            pass
    return response


async def feed_context(app: web.Application) -> AsyncIterator[None]:
    """One TaskFeed for the process (a cleanup_ctx, after the database's): the event
    stream's and GET /tasks/{id}?wait='s."""
    store = app[STORE]
    feed = TaskFeed(
        watch=store.watch, tasks=store.tasks, change_streams=app[SETTINGS].change_streams
    )
    app[TASK_FEED] = feed
    yield
    await feed.close()


async def end_streams(app: web.Application) -> None:
    """on_shutdown: end every open stream, so that shutdown does not wait on them (the
    runner waits for running handlers before it runs the cleanup contexts)."""
    feed = app.get(TASK_FEED)
    if feed is not None:
        await feed.close()


def add_dashboard(app: web.Application) -> None:
    """Wire the dashboard into the API app: its routes, static files and feed."""
    app.add_routes(routes)
    app.router.add_static("/ui/static", STATIC, name="ui-static")
    app.cleanup_ctx.append(feed_context)
    app.on_shutdown.append(end_streams)
