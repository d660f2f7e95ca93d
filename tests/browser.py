"""The dashboard in a real headless Chromium: an API (with tokens) and a worker process, and
a browser cut off from everything but the API. Shared by the dashboard's test files."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright

from tests.helpers import ApiProcess, StubHttpServer, WorkerProcess, call_api

CHROMIUM = os.environ.get("TASK_RUNNER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "t0ken-for-the-dashboard"


@dataclasses.dataclass
class Stack:
    api: ApiProcess
    worker: WorkerProcess
    stub: StubHttpServer
    page: Page
    outside: list[str]  # requests the page tried beyond the API

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request to the API with the token; the status and the decoded JSON body (or
        None)."""
        return call_api(self.api.url + path, method, body, token=TOKEN)

    async def task(self, task_id: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/tasks/{task_id}")
        assert status == 200, body
        return dict(body)


@contextlib.asynccontextmanager
async def browser_stack(
    http_stub: StubHttpServer,
    start_api: Callable[..., ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
) -> AsyncIterator[Stack]:
    """API (with tokens) + one worker + headless Chromium cut off from all but the API (the
    `stack` fixture of tests/conftest.py)."""
    shared = {"api_tokens": TOKEN, "bar_url": http_stub.url, "foo_seconds": 0.5}
    api = start_api(ready=False, **shared)
    # The API's environment as it is, port and all.
    worker = spawn_worker(host="127.0.0.1", port=api.port, **shared)
    outside: list[str] = []
    await api.ready()
    async with async_playwright() as playwright:
        browser: Browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            context: BrowserContext = await browser.new_context(
                viewport={"width": 1280, "height": 900}
            )

            async def cut_off(route: Route) -> None:
                outside.append(route.request.url)
                await route.abort()

            await context.route(lambda url: not url.startswith(api.url + "/"), cut_off)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: (
                    errors.append(msg.text) if "Content Security Policy" in msg.text else None
                ),
            )
            yield Stack(api, worker, http_stub, page, outside)
            assert errors == [], errors
            assert outside == [], f"the page reached beyond the API: {outside}"
            await context.close()
        finally:
            await browser.close()


async def open_dashboard(stack: Stack, *, token: bool = True) -> Page:
    page = stack.page
    await page.goto(stack.api.url + "/ui")
    if token:
        await page.fill("#token", TOKEN)
        await page.click("#token-form button[type=submit]")
    await page.wait_for_selector("#feed.live", timeout=10_000)
    await page.evaluate("window.__notReloaded = true")
    return page
