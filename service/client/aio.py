"""AsyncClient: every call of the HTTP API, for asyncio code; here those about tasks, in
service.client.schedules those about schedules and the operator's view."""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Unpack
from urllib.parse import quote

from service.client.errors import UnexpectedResponse, WaitTimeout
from service.client.fields import ListQuery
from service.client.records import Fields, ItemError, Page, Task
from service.client.schedules import ScheduleCalls
from service.client.transport import Retry, RunAt, Transport, given

# The longest wait the API takes in one GET /tasks/{id}?wait= (it may cut it shorter).
MAX_WAIT = 60.0
# The shortest wait asked for: the API wants more than 0, written with three decimals.
MIN_WAIT = 0.01
# The paths of the API's bulk and batch calls.
BATCH_PATH = "/tasks/batch"
REQUEUE_WHERE_PATH = "/tasks/requeue"
DELETE_WHERE_PATH = "/tasks/delete"


def task_path(task_id: str, *rest: str) -> str:
    """/tasks/{id}, the id quoted (an id is 24 hex digits; anything else must still stay
    one path segment, and is answered 404)."""
    return "/".join(("/tasks", quote(task_id, safe=""), *rest))


def tag_list(tags: Iterable[str] | None) -> list[str] | None:
    """Tags as sent: a list. One string is refused rather than sent letter by letter."""
    if isinstance(tags, str):
        raise TypeError(f"tags must be a list of strings, not the string {tags!r}")
    return None if tags is None else list(tags)


class AsyncClient(ScheduleCalls):
    """The task-runner HTTP API from asyncio code (aiohttp). Use it on one event loop, and
    close it (`async with`, or `await client.close()`).

        async with AsyncClient("http://127.0.0.1:3030", token="s3cret") as client:
            task = await client.create("foo", run_at=datetime.now(UTC) + timedelta(minutes=5))
            done = await client.wait(task.id, timeout=600)
            async for failed in client.list(state=State.FAILED, type="bar"):
                print(failed.id, failed.error)

    `token`: sent as `Authorization: Bearer <token>`. `timeout`: seconds one request may
    take (a wait's request takes that long more than the wait). `retry`: see Retry; 503s and
    broken connections are retried for every call that is safe to repeat, and `create`
    sends one Idempotency-Key across its retries so a task is never created twice.
    Errors are raised as ApiError subclasses named after the API's codes (TaskNotFound,
    InvalidRequest, Unauthorized...), or ConnectionFailed when the API could not be reached.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: Retry | None = None,
    ) -> None:
        self.transport = Transport(url, token=token, timeout=timeout, retry=retry or Retry())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's connections."""
        await self.transport.close()

    # -- tasks ------------------------------------------------------------------------------

    async def create(
        self,
        type: str,
        *,
        args: Mapping[str, Any] | None = None,
        run_at: RunAt | None = None,
        priority: int | None = None,
        tags: Iterable[str] | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the task's time limit, sent to the API)
    ) -> Task:
        """Create a task of `type` and return it; only the arguments given are sent.

        `run_at`: an aware datetime, ISO 8601 text or Unix seconds (omitted: now).
        `timeout`: seconds one run of the task may take. `idempotency_key`: yours, to make
        a create you may send again (from another process) happen once; without one, the
        call makes its own (a uuid4), which covers its own retries. `queue`: the queue it
        belongs to (docs/queues.md). `callback_url`: where the task is POSTed when it ends
        (docs/calling-services.md).

            task = await client.create("greet", args={"name": "Ada"}, priority=5)
        """
        body = given(
            type=type,
            args=args,
            run_at=run_at,
            priority=priority,
            tags=tag_list(tags),
            queue=queue,
            callback_url=callback_url,
            max_attempts=max_attempts,
            timeout=timeout,
        )
        key = idempotency_key or str(uuid.uuid4())
        answer = await self.transport.call(
            "POST", "/tasks", body=body, headers={"Idempotency-Key": key}
        )
        return Task.from_json(answer.body, status=answer.status)

    async def create_many(
        self, items: Iterable[Mapping[str, Any]]
    ) -> builtins.list[Task | ItemError]:
        """Create several tasks in one request (POST /tasks/batch): each item holds what
        `create` takes (`{"type": "foo", "run_at": ..., "args": {...}}`). One result per
        item, in order: the Task, or an ItemError saying why the API refused that item.

            results = await client.create_many([{"type": "foo"}, {"type": "bar"}])
            refused = [r for r in results if isinstance(r, ItemError)]
        """
        body = {"tasks": [given(**dict(item)) for item in items]}
        # The batch carries no Idempotency-Key: it is not sent again once it may have landed.
        answer = await self.transport.call("POST", BATCH_PATH, body=body, repeatable=False)
        read = Fields(answer.body, what="a batch's answer", status=answer.status)
        entries = read.data.get("results", read.data.get("tasks"))
        if not isinstance(entries, list):
            raise UnexpectedResponse("a batch's answer without results", status=answer.status)
        results: builtins.list[Task | ItemError] = []
        for index, entry in enumerate(entries):
            # A task has an `error` field too (null, or its last error's text): an item
            # the API refused holds the error shape, an object.
            if isinstance(entry, Mapping) and isinstance(entry.get("error"), Mapping):
                results.append(ItemError.from_json(index, entry))
            elif isinstance(entry, Mapping) and isinstance(entry.get("task"), Mapping):
                results.append(Task.from_json(entry["task"], status=answer.status))
            else:
                results.append(Task.from_json(entry, status=answer.status))
        return results

    async def get(self, task_id: str) -> Task:
        """One task, whole; TaskNotFound if there is none with this id."""
        answer = await self.transport.call("GET", task_path(task_id))
        return Task.from_json(answer.body, status=answer.status)

    async def wait(
        self,
        task_id: str,
        timeout: float | None = 60.0,  # noqa: ASYNC109 (WaitTimeout carries the task as last seen)
    ) -> Task:
        """The task once it is COMPLETE or FAILED, waiting at most `timeout` seconds (None:
        as long as it takes); WaitTimeout (a TimeoutError, with the task as last seen) if
        it is not done by then, TaskNotFound if it does not exist or is deleted meanwhile.

        The API answers as soon as the task is done (GET /tasks/{id}?wait=, no polling);
        a long wait is asked for in turns of at most 60 seconds, as the API allows.

            done = await client.wait(task.id, timeout=300)
            print(done.state, done.output)
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        task: Task | None = None
        while True:
            left = MAX_WAIT if timeout is None else timeout - (loop.time() - started)
            if task is not None and left < MIN_WAIT:
                raise WaitTimeout(task, loop.time() - started)
            chunk = max(MIN_WAIT, min(left, MAX_WAIT))
            answer = await self.transport.call(
                "GET",
                task_path(task_id),
                params={"wait": f"{chunk:.3f}"},
                seconds=chunk + self.transport.timeout,
            )
            task = Task.from_json(answer.body, status=answer.status)
            if task.done:
                return task

    async def page(self, *, cursor: str | None = None, **query: Unpack[ListQuery]) -> Page:
        """One page of GET /tasks (ordered by run_at then id; `order="desc"`: the latest
        first), and the cursor of the next; `list()` follows the cursors for you."""
        params = given(
            state=query.get("state"),
            type=query.get("type"),
            tag=query.get("tag"),
            queue=query.get("queue"),
            order=query.get("order", "asc"),
            cursor=cursor,
        )
        params["limit"] = query.get("page_size", 100)
        answer = await self.transport.call(
            "GET", "/tasks", params={name: str(value) for name, value in params.items()}
        )
        return Page.from_json(answer.body, status=answer.status)

    async def list(self, **query: Unpack[ListQuery]) -> AsyncIterator[Task]:
        """Every task with this state, type and tag (each optional), page after page.

        async for task in client.list(state="FAILED", page_size=500):
            ...
        """
        cursor: str | None = None
        while True:
            page = await self.page(cursor=cursor, **query)
            for task in page.tasks:
                yield task
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def update(
        self,
        task_id: str,
        *,
        run_at: RunAt | None = None,
        priority: int | None = None,
        args: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Task:
        """Change a task that has not started (PATCH /tasks/{id}); only what is given is
        sent. TaskNotWaiting if it has started or finished.

            await client.update(task.id, priority=10, tags=["urgent"])
        """
        body = given(
            run_at=run_at,
            priority=priority,
            args=args,
            tags=tag_list(tags),
        )
        answer = await self.transport.call("PATCH", task_path(task_id), body=body)
        return Task.from_json(answer.body, status=answer.status)

    async def delete(self, task_id: str) -> None:
        """Delete a task (a worker running it stops); TaskNotFound if there is none. A
        retry answered 404 after an attempt whose answer was lost counts as deleted."""
        await self.transport.delete(task_path(task_id))

    async def requeue(self, task_id: str) -> Task:
        """Put a FAILED task back in the queue, due now, its attempts reset; the task.
        TaskNotRequeueable (`details["state"]`) if it is not FAILED, which is also what a
        retry after a lost answer gets, the first attempt having requeued it."""
        answer = await self.transport.call("POST", task_path(task_id, "requeue"))
        return Task.from_json(answer.body, status=answer.status)

    async def requeue_where(self, **filter: Any) -> int:
        """Requeue every FAILED task the filter matches (POST /tasks/requeue; the filter as
        GET /tasks takes it: `state=`, `type=`, `tag=`), as many rounds as the API asks
        for; how many were requeued.

            n = await client.requeue_where(type="bar", tag="nightly")
        """
        return await self._bulk(REQUEUE_WHERE_PATH, "requeued", filter)

    async def delete_where(self, **filter: Any) -> int:
        """Delete every task the filter matches (POST /tasks/delete), as many rounds as the
        API asks for; how many were deleted.

            n = await client.delete_where(state="COMPLETE", type="foo")
        """
        return await self._bulk(DELETE_WHERE_PATH, "deleted", filter)

    async def _bulk(self, path: str, counted: str, filter: Mapping[str, Any]) -> int:
        """POST the filter while the API answers `more` (and the last round did something:
        a round that changes nothing would only repeat); the sum of `counted`."""
        total = 0
        while True:
            answer = await self.transport.call("POST", path, body=given(**filter))
            read = Fields(answer.body, what=f"the answer of {path}", status=answer.status)
            done = read.integer(counted)
            if done is None:
                raise UnexpectedResponse(f"no {counted} count", status=answer.status)
            total += done
            if read.boolean("more") is not True or done == 0:
                return total
