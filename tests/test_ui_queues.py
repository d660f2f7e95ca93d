"""The dashboard's queues in the task list: a queue column, the queue in a task's detail, and
a queue filter beside the state and type filters; in a real headless Chromium (the `stack`
fixture, tests/browser.py)."""

from __future__ import annotations

from service.store import Store
from tests.browser import Stack, open_dashboard
from tests.test_ui import failed_task

LATER = 4102444800  # 2100: the worker leaves these tasks waiting


def row(task_id: str) -> str:
    return f'#tasks tr[data-id="{task_id}"]'


async def test_the_task_list_shows_and_filters_by_queue(stack: Stack) -> None:
    status, mail = stack.call("POST", "/tasks", {"type": "foo", "queue": "mail", "run_at": LATER})
    assert status == 201, mail
    status, plain = stack.call("POST", "/tasks", {"type": "foo", "run_at": LATER})
    assert status == 201, plain
    page = await open_dashboard(stack)
    await page.wait_for_selector(row(mail["id"]))
    headers = await page.locator("#tasks thead th").all_inner_texts()
    assert headers[:4] == ["id", "type", "queue", "state"], headers
    assert await page.inner_text(f"{row(mail['id'])} td.queue") == "mail"
    assert await page.inner_text(f"{row(plain['id'])} td.queue") == "default"

    # The filter offers the queues GET /queues knows; choosing one lists only its tasks.
    await page.wait_for_selector('#filter-queue option[value="mail"]', state="attached")
    await page.select_option("#filter-queue", "mail")
    await page.wait_for_selector(row(plain["id"]), state="detached")
    assert await page.is_visible(row(mail["id"]))
    await page.select_option("#filter-queue", "")
    await page.wait_for_selector(row(plain["id"]))

    await page.goto(f"{stack.api.url}/ui#task={mail['id']}")
    await page.wait_for_selector("#detail-fields[data-state=NOTSTARTED]")
    assert await page.inner_text("#detail-queue") == "mail"


async def test_a_queue_name_is_shown_as_text(stack: Stack, store: Store) -> None:
    # The API refuses such a name; a document written by hand may still hold one.
    hostile = '<img src=x onerror="window.__xss=1">q'
    task_id = await failed_task(store, queue=hostile)
    page = await open_dashboard(stack)
    await page.wait_for_selector(row(task_id))
    assert await page.inner_text(f"{row(task_id)} td.queue") == hostile
    await page.goto(f"{stack.api.url}/ui#task={task_id}")
    await page.wait_for_selector("#detail-fields[data-state=FAILED]")
    assert await page.inner_text("#detail-queue") == hostile
    options = await page.locator("#filter-queue option").all_inner_texts()
    assert hostile in options, options
    assert await page.locator("#tasks img, #detail img, #filter-queue img").count() == 0
    assert await page.evaluate("window.__xss") is None
