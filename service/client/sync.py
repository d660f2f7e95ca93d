"""Client: the same calls as AsyncClient, for code without an event loop.

It runs an AsyncClient on an event loop of its own, in a daemon thread it starts, and waits
for each call there: one implementation of the requests, retries and parsing for both
clients, no dependency beyond aiohttp, and it works from any thread (calls from several
threads share its connections) and from code that has an event loop of its own running
(a notebook). Close it (`with Client(...) as client:`, or `client.close()`) to stop the
thread; one left open is closed when it is garbage-collected.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
import weakref
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

from service.client.aio import AsyncClient
from service.client.fields import CreateFields, ListQuery, ScheduleFields, UpdateFields
from service.client.records import ItemError, Page, Queue, Schedule, Stats, Task, Worker
from service.client.transport import Retry

T = TypeVar("T")


class LoopThread:
    """An event loop run by a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="task-runner-client", daemon=True
        )
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result. Interrupted (Ctrl-C), the
        call is cancelled on the loop too."""
        if self.loop.is_closed():
            coroutine.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop, end the thread, close the loop."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _shut(loop: LoopThread, client: AsyncClient) -> None:
    if not loop.loop.is_closed():
        loop.run(client.close())
        loop.stop()


class Client:
    """The task-runner HTTP API from synchronous code; the same arguments, calls, records
    and exceptions as AsyncClient (see it for `token`, `timeout`, `retry`).

        with Client("http://127.0.0.1:3030", token="s3cret") as client:
            task = client.create("foo", args={}, priority=5)
            done = client.wait(task.id, timeout=600)
            print(done.state, done.output)
            for failed in client.list(state=State.FAILED):
                client.requeue(failed.id)
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: Retry | None = None,
    ) -> None:
        self._client = AsyncClient(url, token=token, timeout=timeout, retry=retry)
        self._loop = LoopThread()
        self._close = weakref.finalize(self, _shut, self._loop, self._client)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        self._close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coroutine)

    # -- tasks ------------------------------------------------------------------------------

    def create(self, type: str, **fields: Unpack[CreateFields]) -> Task:
        """Create a task; see AsyncClient.create for the fields."""
        return self._run(self._client.create(type, **fields))

    def create_many(self, items: Iterable[Mapping[str, Any]]) -> builtins.list[Task | ItemError]:
        """Create several tasks in one request; see AsyncClient.create_many."""
        return self._run(self._client.create_many(items))

    def get(self, task_id: str) -> Task:
        """One task; TaskNotFound if there is none with this id."""
        return self._run(self._client.get(task_id))

    def wait(self, task_id: str, timeout: float | None = 60.0) -> Task:
        """The task once COMPLETE or FAILED; see AsyncClient.wait."""
        return self._run(self._client.wait(task_id, timeout))

    def page(self, *, cursor: str | None = None, **query: Unpack[ListQuery]) -> Page:
        """One page of GET /tasks; see AsyncClient.page."""
        return self._run(self._client.page(cursor=cursor, **query))

    def list(self, **query: Unpack[ListQuery]) -> Iterator[Task]:
        """Every task with this state, type and tag (each optional), page after page, each
        page fetched as the iteration reaches it.

            for task in client.list(type="bar", order="desc"):
                ...
        """
        cursor: str | None = None
        while True:
            page = self.page(cursor=cursor, **query)
            yield from page.tasks
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def update(self, task_id: str, **changes: Unpack[UpdateFields]) -> Task:
        """Change a task that has not started; see AsyncClient.update."""
        return self._run(self._client.update(task_id, **changes))

    def delete(self, task_id: str) -> None:
        """Delete a task; TaskNotFound if there is none."""
        self._run(self._client.delete(task_id))

    def requeue(self, task_id: str) -> Task:
        """Put a FAILED task back in the queue; see AsyncClient.requeue."""
        return self._run(self._client.requeue(task_id))

    def requeue_where(self, **filter: Any) -> int:
        """Requeue every FAILED task the filter matches; how many. See AsyncClient."""
        return self._run(self._client.requeue_where(**filter))

    def delete_where(self, **filter: Any) -> int:
        """Delete every task the filter matches; how many. See AsyncClient."""
        return self._run(self._client.delete_where(**filter))

    # -- schedules --------------------------------------------------------------------------

    def create_schedule(self, type: str, **fields: Unpack[ScheduleFields]) -> Schedule:
        """Create a recurring schedule; see AsyncClient.create_schedule for the fields."""
        return self._run(self._client.create_schedule(type, **fields))

    def list_schedules(self) -> builtins.list[Schedule]:
        """Every schedule, oldest first."""
        return self._run(self._client.list_schedules())

    def get_schedule(self, schedule_id: str) -> Schedule:
        """One schedule; ScheduleNotFound if there is none with this id."""
        return self._run(self._client.get_schedule(schedule_id))

    def pause_schedule(self, schedule_id: str) -> Schedule:
        """Pause a schedule."""
        return self._run(self._client.pause_schedule(schedule_id))

    def resume_schedule(self, schedule_id: str) -> Schedule:
        """Resume a paused schedule."""
        return self._run(self._client.resume_schedule(schedule_id))

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule."""
        self._run(self._client.delete_schedule(schedule_id))

    # -- queues -----------------------------------------------------------------------------

    def list_queues(self) -> builtins.list[Queue]:
        """Every queue that has settings or tasks, by name."""
        return self._run(self._client.list_queues())

    def get_queue(self, name: str) -> Queue:
        """One queue; QueueNotFound if it has neither settings nor tasks."""
        return self._run(self._client.get_queue(name))

    def put_queue(self, name: str, settings: Mapping[str, Any]) -> Queue:
        """Change some of a queue's settings (None clears a rate or a concurrency)."""
        return self._run(self._client.put_queue(name, settings))

    def delete_queue(self, name: str) -> None:
        """Delete a queue's settings (its tasks stay); QueueNotFound if it has none."""
        self._run(self._client.delete_queue(name))

    def pause_queue(self, name: str) -> Queue:
        """Pause a queue: none of its tasks starts until resumed."""
        return self._run(self._client.pause_queue(name))

    def resume_queue(self, name: str) -> Queue:
        """Resume a paused queue."""
        return self._run(self._client.resume_queue(name))

    # -- the operator's view ----------------------------------------------------------------

    def stats(self) -> Stats:
        """The queue at a glance (GET /stats)."""
        return self._run(self._client.stats())

    def workers(self) -> builtins.list[Worker]:
        """Every registered worker process, alive or gone (GET /workers)."""
        return self._run(self._client.workers())
