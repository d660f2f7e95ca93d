"""The operator's REST actions (requeue, recover), GET /stats, the event feed, and the
dashboard itself in a real headless Chromium against a real API and a real worker process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId

import service.web.ui
from service.config import Settings
from service.store import Store
from service.web.app import create_app
from service.web.feed import TaskFeed
from service.web.keys import TASK_FEED
from tests.browser import TOKEN, Stack, open_dashboard
from tests.helpers import (
    eventually,
)

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


async def failed_task(store: Store, **fields: Any) -> str:
    """A FAILED task written directly, with one failed attempt."""
    now = datetime.now(UTC)
    doc = {
        "_id": ObjectId(),
        "type": "bar",
        "state": "FAILED",
        "run_at": now,
        "created_at": now,
        "started_at": now,
        "finished_at": now,
        "attempts": 1,
        "max_attempts": 1,
        "error": "HTTP 418",
        "errors": [{"attempt": 1, "error": "HTTP 418", "at": now, "worker": "pod-1:7"}],
        **fields,
    }
    await store.db.tasks.insert_one(doc)
    return str(doc["_id"])


async def stale_task(store: Store, *, attempts: int, max_attempts: int) -> str:
    """A STARTED task whose worker went silent a minute ago."""
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    doc = {
        "_id": ObjectId(),
        "type": "foo",
        "state": "STARTED",
        "run_at": long_ago,
        "created_at": long_ago,
        "started_at": long_ago,
        "heartbeat_at": long_ago,
        "attempts": attempts,
        "max_attempts": max_attempts,
        "lease": "lost-lease",
        "worker": "gone-host:1",
    }
    await store.db.tasks.insert_one(doc)
    return str(doc["_id"])


# -- the REST actions and the summary -------------------------------------------------------


async def test_requeue_puts_a_failed_task_back_and_refuses_others(
    api: Client, store: Store
) -> None:
    task_id = await failed_task(store)
    response = await api.post(f"/tasks/{task_id}/requeue")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["id"], body["state"], body["attempts"]) == (task_id, "NOTSTARTED", 0)
    assert len(body["errors"]) == 1  # the history stays
    doc = await store.db.tasks.find_one({"_id": ObjectId(task_id)})
    assert doc is not None and doc["state"] == "NOTSTARTED"

    again = await api.post(f"/tasks/{task_id}/requeue")
    assert again.status == 409
    error = (await again.json())["error"]
    assert error["code"] == "task_not_requeueable"
    assert error["details"] == {"id": task_id, "state": "NOTSTARTED"}
    for missing in ("zzz", str(ObjectId())):
        response = await api.post(f"/tasks/{missing}/requeue")
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "task_not_found"


async def test_recover_answers_which_tasks_went_back_and_which_failed(
    api: Client, store: Store
) -> None:
    back = await stale_task(store, attempts=1, max_attempts=3)
    out = await stale_task(store, attempts=3, max_attempts=3)
    response = await api.post("/recover")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["found"] == 2
    assert body["requeued"] == [back]
    assert body["failed"] == [out]
    assert body["not_recovered"] == []
    states = {str(d["_id"]): d["state"] async for d in store.db.tasks.find({})}
    assert states == {back: "NOTSTARTED", out: "FAILED"}
    empty = await (await api.post("/recover")).json()
    assert (empty["found"], empty["requeued"], empty["failed"]) == (0, [], [])


async def test_stats_summarise_the_queue(api: Client, store: Store) -> None:
    for task_type in ("foo", "foo", "bar"):
        assert (await api.post("/tasks", json={"type": task_type})).status == 201
    later = {"type": "baz", "run_at": "2999-01-01T00:00:00Z"}
    assert (await api.post("/tasks", json=later)).status == 201
    failed = await failed_task(store)
    stale = await stale_task(store, attempts=1, max_attempts=3)
    await store.db.tasks.insert_one({"_id": ObjectId(), "state": 7, "type": "foo"})  # unreadable
    await asyncio.sleep(0.05)
    body = await (await api.get("/stats")).json()
    assert body["total"] == 7
    assert body["by_state"] == {"NOTSTARTED": 4, "STARTED": 1, "COMPLETE": 0, "FAILED": 1, "7": 1}
    assert body["by_type"]["foo"] == 4
    assert {"state": "NOTSTARTED", "type": "foo", "count": 2} in body["counts"]
    assert body["due"] == 3
    assert body["oldest_due"]["type"] == "foo"
    assert body["oldest_due"]["lag_seconds"] >= 0
    assert [t["id"] for t in body["stale_tasks"]] == [stale]
    assert body["stale"] == 1
    assert body["unreadable"] == 1
    assert [t["id"] for t in body["recent_failures"]] == [failed]


async def test_actions_need_a_token_and_the_page_does_not(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    guarded = dataclasses.replace(settings, api_tokens=("s3cret",), auth_reads=True)
    client = await aiohttp_client(create_app(guarded))
    task_id = await failed_task(store)
    for method, path in (
        ("POST", f"/tasks/{task_id}/requeue"),
        ("POST", "/recover"),
        ("GET", "/stats"),
        ("GET", "/events"),
    ):
        response = await client.request(method, path)
        assert response.status == 401, (method, path)
    page = await client.get("/ui")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "/ui/static/app.js" in await page.text()
    for name in ("app.js", "style.css"):
        assert (await client.get(f"/ui/static/{name}")).status == 200
    authorised = {"Authorization": "Bearer s3cret"}
    response = await client.post(f"/tasks/{task_id}/requeue", headers=authorised)
    assert response.status == 200
    assert (await client.get("/stats", headers=authorised)).status == 200


# -- the event feed -------------------------------------------------------------------------


async def read_events(response: Any, count: int, *, within: float = 10.0) -> list[dict[str, Any]]:
    """The next `count` data events of an SSE stream."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(events) < count:
            line = await response.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return events


@pytest.mark.parametrize("change_streams", [True, False], ids=["change-stream", "polling"])
async def test_events_follow_task_changes(
    settings: Settings, store: Store, aiohttp_client: MakeClient, change_streams: bool
) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, change_streams=change_streams))
    )
    response = await client.get("/events")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await read_events(response, 1) == [{"op": "open"}]
    created = await (await client.post("/tasks", json={"type": "foo"})).json()
    if change_streams:
        [event] = await read_events(response, 1)
        assert event == {"op": "insert", "id": created["id"], "state": "NOTSTARTED", "type": "foo"}
        await store.db.tasks.update_one({"_id": ObjectId(created["id"])}, {"$set": {"worker": "x"}})
        await store.db.tasks.update_one(
            {"_id": ObjectId(created["id"])}, {"$set": {"state": "STARTED"}}
        )
        [event] = await read_events(response, 1)  # the first update changed no state
        assert event == {"op": "update", "id": created["id"], "state": "STARTED", "type": None}
        await client.delete(f"/tasks/{created['id']}")
        [event] = await read_events(response, 1)
        assert event == {"op": "delete", "id": created["id"], "state": None, "type": None}
    else:
        assert await read_events(response, 1) == [{"op": "changed"}]
    response.close()


async def test_an_event_stream_ends_when_the_client_leaves_and_at_shutdown(
    settings: Settings, store: Store, aiohttp_client: MakeClient, monkeypatch: Any
) -> None:
    monkeypatch.setattr(service.web.ui, "KEEPALIVE", 0.1)
    client = await aiohttp_client(create_app(settings))
    assert client.app is not None
    feed: TaskFeed = client.app[TASK_FEED]
    leaving = await client.get("/events")
    await read_events(leaving, 1)
    staying = await client.get("/events")
    await read_events(staying, 1)
    assert feed.subscribers == 2
    leaving.close()

    async def one_left() -> bool:
        return feed.subscribers == 1

    await eventually(one_left, within=5)
    assert feed.watching
    started = time.monotonic()
    await client.server.close()  # runs on_shutdown, then waits for the handlers
    assert time.monotonic() - started < 5
    rest = await staying.content.read()  # to the end of the chunked body: not cut off
    assert set(rest.split(b"\n")) <= {b"", b": keep-alive"}, rest
    assert not feed.watching


async def test_an_event_stream_ends_before_the_request_timeout(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, request_timeout=1.0)))
    response = await client.get("/events")
    started = time.monotonic()
    body = await response.content.read()
    assert 0.5 < time.monotonic() - started < 1.0
    assert body.startswith(b"retry: ")
    assert b"request_timeout" not in body


# -- the dashboard in a real browser ------------------------------------------------------------


async def test_the_dashboard_follows_tasks_live_and_shows_the_fleet(stack: Stack) -> None:
    page = await open_dashboard(stack)
    await page.wait_for_selector("#card-total .value")
    # Created after the page loaded: it must arrive by the event feed, then complete.
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    status, created = stack.call("POST", "/tasks", {"type": "foo", "run_at": soon})
    assert status == 201
    row = f'#tasks tr[data-id="{created["id"]}"]'
    await page.wait_for_selector(row, timeout=10_000)
    assert await page.get_attribute(row, "data-state") == "NOTSTARTED"
    await page.wait_for_selector(f'{row}[data-state="COMPLETE"]', timeout=15_000)
    assert (await stack.task(created["id"]))["state"] == "COMPLETE"
    assert await page.evaluate("window.__notReloaded") is True
    # Selectors, not wait_for_function: its polling evaluates a string, which the page's
    # Content-Security-Policy forbids (it worked only when true at the first look).
    await page.wait_for_selector("#card-COMPLETE .value:text-is('1')")

    # The fleet: a failure with its error, one waiting task, the worker and what it holds.
    stack.stub.drop_first = 1  # the Bar task's request goes unanswered: it fails
    status, failing = stack.call("POST", "/tasks", {"type": "bar", "max_attempts": 1})
    assert status == 201
    stack.call("POST", "/tasks", {"type": "baz", "run_at": "2999-01-01T00:00:00Z"})
    stack.call("POST", "/tasks", {"type": "foo"})
    await page.wait_for_selector(f'#failures tr[data-id="{failing["id"]}"]', timeout=15_000)
    error = (await stack.task(failing["id"]))["error"]
    assert error and error in await page.inner_text("#failures")
    status, _ = stack.call("GET", "/workers")
    if status == 200:
        await page.wait_for_selector(f"#workers:has-text({stack.worker.worker_id!r})")
    else:
        assert "no worker data" in await page.inner_text("#workers")
    await page.click(f'#tasks tr[data-id="{created["id"]}"] a')
    await page.wait_for_selector("#detail-fields[data-state=COMPLETE]")
    assert f"Foo {created['id']}" in await page.inner_text("#detail-output")
    fields = await page.inner_text("#detail-fields")
    assert stack.worker.worker_id in fields and "1 of 3" in fields, fields
    # Schedules too, for the screenshot: one active, one paused (nothing due within the test).
    status, hourly = stack.call("POST", "/schedules", {"type": "foo", "every": 3600})
    assert status == 201, hourly
    status, weekdays = stack.call("POST", "/schedules", WEEKDAYS_IN_PARIS)
    assert status == 201, weekdays
    assert stack.call("POST", f"/schedules/{weekdays['id']}/pause")[0] == 200
    await page.wait_for_selector(f'#schedules tr[data-id="{hourly["id"]}"][data-state=active]')
    await page.wait_for_selector(f'#schedules tr[data-id="{weekdays["id"]}"][data-state=paused]')
    # Queues too: one throttled, one paused.
    assert stack.call("PUT", "/queues/partner-api", {"rate": 4, "concurrency": 2})[0] == 200
    assert stack.call("POST", "/queues/reports/pause")[0] == 200
    await page.wait_for_selector('#queues tr[data-name="reports"][data-state=paused]')
    await page.wait_for_selector('#queues tr[data-name="partner-api"]')
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)


async def test_requeue_and_delete_from_the_page(stack: Stack, store: Store) -> None:
    stack.stub.drop_first = 1  # the first request goes unanswered, the next gets a 418
    status, failing = stack.call("POST", "/tasks", {"type": "bar", "max_attempts": 1})
    assert status == 201
    page = await open_dashboard(stack, token=False)
    await page.wait_for_selector(f'#failures tr[data-id="{failing["id"]}"]', timeout=15_000)

    # Without the token the API refuses, and the page says why.
    await page.goto(f"{stack.api.url}/ui#task={failing['id']}")
    await page.wait_for_selector("#detail-fields[data-state=FAILED]")
    await page.click("#detail-requeue")
    await page.wait_for_selector("#message.bad")
    assert "token" in await page.inner_text("#message")
    assert (await stack.task(failing["id"]))["state"] == "FAILED"

    # With it, requeue runs the task again; the stub answers this time, so it completes.
    await page.fill("#token", TOKEN)
    await page.click("#token-form button[type=submit]")
    await page.click("#detail-requeue")
    await page.wait_for_selector("#detail-fields[data-state=COMPLETE]", timeout=15_000)
    task = await stack.task(failing["id"])
    assert task["state"] == "COMPLETE"
    assert len(task["errors"]) == 1  # the first attempt's failure is kept

    # Delete a waiting task from its detail.
    status, waiting = stack.call(
        "POST", "/tasks", {"type": "baz", "run_at": "2999-01-01T00:00:00Z"}
    )
    await page.goto(f"{stack.api.url}/ui#task={waiting['id']}")
    await page.wait_for_selector("#detail-fields[data-state=NOTSTARTED]")
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("#detail-delete")
    await page.wait_for_selector("#detail-gone")
    assert stack.call("GET", f"/tasks/{waiting['id']}")[0] == 404
    assert await store.db.tasks.count_documents({"_id": ObjectId(waiting["id"])}) == 0


async def test_requeue_all_failed_of_a_type_from_the_page(stack: Stack, store: Store) -> None:
    failed = [await failed_task(store, type="baz") for _ in range(3)]
    other = await failed_task(store)  # a bar: another type, left FAILED
    page = await open_dashboard(stack)
    button = '#counts tr[data-type="baz"] button.requeue-failed'
    await page.wait_for_selector(button)
    asked: list[str] = []

    # Cancelled: the confirmation names the count, and nothing changes.
    async def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    page.once("dialog", dismiss)
    await page.click(button)
    assert len(asked) == 1 and "Requeue all 3 FAILED baz tasks?" in asked[0], asked
    assert "requeued" not in await page.inner_text("#message")  # "token saved", if shown
    for task_id in failed:
        assert (await stack.task(task_id))["state"] == "FAILED"

    # Confirmed: POST /tasks/requeue {"state": "FAILED", "type": "baz"}; the worker runs them.
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click(button)
    await page.wait_for_selector("#message:has-text('3 FAILED baz task(s) requeued')")
    for task_id in failed:
        task = await stack.task(task_id)
        assert task["state"] in ("NOTSTARTED", "STARTED", "COMPLETE"), task

    async def all_complete() -> bool:
        found = [(await stack.task(task_id))["state"] for task_id in failed]
        return found == ["COMPLETE"] * len(failed)

    await eventually(all_complete, within=20, what="the requeued baz tasks run to COMPLETE")
    await page.wait_for_selector(button, state="detached")  # no FAILED baz task is left
    assert await page.is_visible('#counts tr[data-type="bar"] button.requeue-failed')
    assert (await stack.task(other))["state"] == "FAILED"


WEEKDAYS_IN_PARIS = {"type": "baz", "cron": "30 9 * * 1-5", "timezone": "Europe/Paris"}


async def test_schedules_show_and_pause_resume_and_delete_from_the_page(stack: Stack) -> None:
    status, every = stack.call("POST", "/schedules", {"type": "foo", "every": 3600})
    assert status == 201, every
    status, cron = stack.call("POST", "/schedules", WEEKDAYS_IN_PARIS)
    assert status == 201, cron
    page = await open_dashboard(stack, token=False)  # reads need no token; writes do

    # Both rows, with how they recur and their next occurrence (the API's, as the title).
    rows = {s["id"]: f'#schedules tr[data-id="{s["id"]}"]' for s in (every, cron)}
    for schedule in (every, cron):
        row = rows[schedule["id"]]
        await page.wait_for_selector(f"{row}[data-state=active]")
        next_at = f'{row} td.next span[title="{schedule["next_at"]}"]'
        assert "in " in await page.inner_text(next_at)  # e.g. "(in 1.0 h)": in the future
    assert await page.inner_text(f"{rows[every['id']]} td.when") == "every 3600 s (1.0 h)"
    cron_row = await page.inner_text(rows[cron["id"]])
    assert "cron 30 9 * * 1-5 (Europe/Paris)" in cron_row and "baz" in cron_row, cron_row
    await page.wait_for_selector("#schedule-count:text-is('(2, 0 paused)')")

    # Without the token the API refuses the pause, and the page says why.
    await page.click(f"{rows[every['id']]} button.pause")
    await page.wait_for_selector("#message.bad")
    assert "token" in await page.inner_text("#message")
    assert stack.call("GET", f"/schedules/{every['id']}")[1]["paused"] is False

    # With it: Pause, then Resume.
    await page.fill("#token", TOKEN)
    await page.click("#token-form button[type=submit]")
    await page.click(f"{rows[every['id']]} button.pause")
    await page.wait_for_selector(f"{rows[every['id']]}[data-state=paused]")
    status, paused = stack.call("GET", f"/schedules/{every['id']}")
    assert status == 200 and paused["paused"] is True, paused
    assert await page.inner_text(f"{rows[every['id']]} .state") == "paused"
    assert "held while paused" in await page.inner_text(f"{rows[every['id']]} td.next")
    await page.wait_for_selector("#schedule-count:text-is('(2, 1 paused)')")
    await page.click(f"{rows[every['id']]} button.resume")
    await page.wait_for_selector(f"{rows[every['id']]}[data-state=active]")
    assert stack.call("GET", f"/schedules/{every['id']}")[1]["paused"] is False

    # Delete, after the page's confirmation: gone from the API and from the page.
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click(f"{rows[cron['id']]} button.delete")
    await page.wait_for_selector(rows[cron["id"]], state="detached")
    status, body = stack.call("GET", f"/schedules/{cron['id']}")
    assert status == 404, body
    assert await page.is_visible(rows[every["id"]])
    await page.wait_for_selector("#schedule-count:text-is('(1, 0 paused)')")


async def test_queues_show_their_settings_and_counts_and_pause_resume_from_the_page(
    stack: Stack,
) -> None:
    status, _ = stack.call("POST", "/tasks", {"type": "foo", "queue": "mail", "run_at": 4102444800})
    assert status == 201
    status, queue = stack.call("PUT", "/queues/mail", {"rate": 2.5, "burst": 3, "concurrency": 4})
    assert status == 200, queue
    page = await open_dashboard(stack)
    row = '#queues tr[data-name="mail"]'
    await page.wait_for_selector(f"{row}[data-state=active]")
    assert await page.inner_text(f"{row} td.rate") == "2.5/s\nburst 3"
    assert await page.inner_text(f"{row} td.concurrency") == "4"
    assert "1" in await page.inner_text(f"{row} td.num >> nth=0")  # NOTSTARTED
    await page.click(f"{row} button.pause")
    await page.wait_for_selector(f"{row}[data-state=paused]")
    assert stack.call("GET", "/queues/mail")[1]["paused"] is True
    await page.wait_for_selector("#queue-count:text-is('(1, 1 paused)')")
    await page.click(f"{row} button.resume")
    await page.wait_for_selector(f"{row}[data-state=active]")
    assert stack.call("GET", "/queues/mail")[1]["paused"] is False


async def test_what_tasks_hold_is_shown_as_text(stack: Stack, store: Store) -> None:
    hostile = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    task_id = await failed_task(store, output=hostile, error=hostile, type="foo")
    page = await open_dashboard(stack)
    await page.goto(f"{stack.api.url}/ui#task={task_id}")
    await page.wait_for_selector("#detail-fields[data-state=FAILED]")
    assert await page.inner_text("#detail-output") == hostile
    assert hostile in await page.inner_text("#failures")
    assert await page.locator("#detail img, #failures img, main script").count() == 0
    assert await page.evaluate("window.__xss") is None


async def test_an_http_task_shows_its_target_last_status_and_callback(
    stack: Stack, store: Store
) -> None:
    callback = {"state": "DELIVERED", "attempts": 2, "last_error": "HTTP 500"}
    task_id = await failed_task(
        store,
        type="http",
        args={"url": "https://api.acme.test/jobs/42", "method": "PUT"},
        error="HTTP 410\ngone",
        callback_url="https://api.acme.test/done",
        callback=callback,
    )
    page = await open_dashboard(stack)
    await page.goto(f"{stack.api.url}/ui#task={task_id}")
    await page.wait_for_selector("#detail-fields[data-state=FAILED]")
    assert await page.inner_text("#detail-target") == "PUT https://api.acme.test/jobs/42"
    assert await page.inner_text("#detail-status") == "410"
    shown = await page.inner_text("#detail-callback[data-state=DELIVERED]")
    assert shown == "https://api.acme.test/done — DELIVERED after 2 attempt(s): HTTP 500"
