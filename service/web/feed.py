"""TaskFeed: one watcher of task changes per API process, fanned out to every subscriber
(the dashboard's Server-Sent Events, GET /events) through asyncio queues, and to every
request waiting for a task to finish (GET /tasks/{id}?wait=).

The watcher is a change stream where the server has them (TaskWatch.task_events), else a
poll of cheap counts every few seconds (TaskWatch.fingerprint). It runs only while someone
listens or waits, and for `linger` seconds after the last one leaves, so that clients that
reconnect do not reopen it each time; with nobody listening it costs the database nothing.

Waiting costs the database per waited task, not per waiter or per second: when the stream
says a waited task finished or was deleted, one read (of every such task at once) serves all
its waiters; where there is no stream, one read of every waited task at once every
`wait_poll_interval`. A read of every waited task also follows each (re)opening of the
watcher, so that nothing that changed before it was open is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable, TaskNotFound
from service.models import TERMINAL, Task
from service.periodic import stop_task
from service.store.streams import TaskWatch
from service.store.tasks import Tasks

logger = logging.getLogger(__name__)

Event = dict[str, Any]
# Told to a subscriber once the watcher runs (and so nothing after it is missed).
OPEN: Event = {"op": "open"}
# Told in polling mode when the fingerprint moved: something changed, the feed cannot say what.
CHANGED: Event = {"op": "changed"}


class _Waiter:
    """One request waiting for one task: set once the feed has read it finished or gone
    (or the feed closes, with neither)."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.task: Task | None = None  # the finished task, as the feed read it
        self.deleted = False


def _never() -> bool:
    return False


class TaskFeed:
    """Fan-out of task changes to subscribers; see the module docstring."""

    def __init__(
        self,
        *,
        watch: TaskWatch,
        tasks: Tasks,
        change_streams: bool = True,
        poll_interval: float = 2.0,
        max_await: float = 1.0,
        linger: float = 60.0,
        queue_size: int = 256,
        retry_after: float = 1.0,
        wait_poll_interval: float = 0.5,
        wait_check: float = 0.5,
    ) -> None:
        self.watch = watch
        self.tasks = tasks
        self.change_streams = change_streams
        self.poll_interval = poll_interval
        self.max_await = max_await
        self.linger = linger
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.wait_poll_interval = wait_poll_interval
        self.wait_check = wait_check  # how often a waiter asks whether its client left
        self.mode: str | None = None  # "change stream" or "polling" while watching
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._waiting: dict[str, set[_Waiter]] = {}  # by task id (str(_id), as events say)
        self._unread: set[str] = set()  # waited ids to read: they changed, or may have
        self._reader: asyncio.Task[None] | None = None
        self._final_reads = BatchedReads(tasks)
        self._joined = asyncio.Event()  # a waiter joined: the poll plans its next read
        self._task: asyncio.Task[None] | None = None
        self._idle_since = time.monotonic()
        self._closed = False

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event | None]]:
        """A queue of events; None in it means the feed is closing (the app shuts down)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(self.queue_size)
        if self._closed:
            queue.put_nowait(None)
            yield queue
            return
        self._subscribers.add(queue)
        if self.mode is not None:
            queue.put_nowait(OPEN)
        self._start_watching()
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            self._note_idle()

    async def wait_for(
        self,
        task_id: str,
        *,
        within: float,
        read_within: float = 1.0,
        left: Callable[[], bool] = _never,
    ) -> Task:
        """The task as soon as it is COMPLETE or FAILED, else as it is after `within`
        seconds (counted from this call, its reads included) or when the feed closes (the
        app shuts down). TaskNotFound if it does not exist, or is deleted during the wait.
        When `left()` turns true (the client went away; asked every `wait_check` seconds),
        it ends early with the state first read.

        The read at the end of a wait is made with every other wait ending then, in one
        query; if it takes over `read_within` seconds (a flood of waits on a slow
        database), the answer is the state first read: a finish would have been seen.

        Race-free: the waiter joins before the task is read, so a change after that read is
        seen by the watcher, or by the read of every waited task that follows its opening.
        """
        deadline = asyncio.get_running_loop().time() + within
        if self._closed:
            return await self.tasks.get(task_id)
        key, waiter = task_id, self._join(task_id)
        try:
            task = await self.tasks.get(task_id)
            if task.id != key:  # another spelling of its id: join under the one events use
                self._leave(key, waiter)
                key, waiter = task.id, self._join(task.id)
                task = await self.tasks.get(task.id)
            if task.state in TERMINAL:
                return task
            # Started only now (a 404 opens nothing): what changes before the watcher is open
            # is read again once it is.
            self._start_watching()
            self._joined.set()
            if not await self._wait(waiter, deadline=deadline, left=left):
                return task  # nobody to answer
        finally:
            self._leave(key, waiter)
        if waiter.task is not None:
            return waiter.task
        if waiter.deleted:
            raise TaskNotFound(task_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(read_within):
                now = await self._final_reads.get(key)  # the wait is over: as it is now
                if now is None:
                    raise TaskNotFound(task_id)
                return now
        return task

    async def _wait(self, waiter: _Waiter, *, deadline: float, left: Callable[[], bool]) -> bool:
        """Until the waiter is settled or the deadline (loop time); False if the client left."""
        loop = asyncio.get_running_loop()
        while not waiter.done.is_set() and (remaining := deadline - loop.time()) > 0:
            if left():
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, self.wait_check)):
                    await waiter.done.wait()
        return True

    @property
    def waiters(self) -> int:
        """How many requests wait for a task now."""
        return sum(len(waiters) for waiters in self._waiting.values())

    @property
    def subscribers(self) -> int:
        """How many listen now."""
        return len(self._subscribers)

    @property
    def watching(self) -> bool:
        """True while the watcher runs."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Tell every subscriber to finish, end every wait, and stop the watcher (at app
        shutdown)."""
        self._closed = True
        for queue in self._subscribers:
            _offer(queue, None, force=True)
        for waiters in self._waiting.values():
            for waiter in waiters:
                waiter.done.set()
        reader, self._reader = self._reader, None
        if reader is not None:
            await stop_task(reader)
        watcher, self._task = self._task, None
        if watcher is not None:
            await stop_task(watcher)

    def publish(self, event: Event) -> None:
        """Hand an event to every subscriber; a subscriber that is far behind loses it
        (it reloads everything on the next event anyway)."""
        for queue in self._subscribers:
            _offer(queue, event)

    def _idle(self) -> bool:
        return (
            not self._subscribers
            and not self._waiting
            and time.monotonic() - self._idle_since >= self.linger
        )

    def _note_idle(self) -> None:
        if not self._subscribers and not self._waiting:
            self._idle_since = time.monotonic()

    def _start_watching(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="task-feed")

    def _join(self, task_id: str) -> _Waiter:
        waiter = _Waiter()
        self._waiting.setdefault(task_id, set()).add(waiter)
        return waiter

    def _leave(self, task_id: str, waiter: _Waiter) -> None:
        waiters = self._waiting.get(task_id, set())
        waiters.discard(waiter)
        if not waiters:
            self._waiting.pop(task_id, None)
            self._unread.discard(task_id)
        self._note_idle()

    def _notice(self, event: Event) -> None:
        """A waited task that finished or went away is read (once for all its waiters)."""
        if event["id"] in self._waiting and (event["op"] == "delete" or event["state"] in TERMINAL):
            self._read([event["id"]])

    def _read(self, task_ids: Iterable[str]) -> None:
        """Read these waited tasks soon: one read in flight at a time, for all of them."""
        self._unread.update(i for i in task_ids if i in self._waiting)
        if self._unread and not self._closed and (self._reader is None or self._reader.done()):
            self._reader = asyncio.create_task(self._read_unread(), name="task-feed-reads")

    async def _read_unread(self) -> None:
        while self._unread:
            task_ids, self._unread = self._unread, set()
            try:
                found = await self.tasks.get_many(task_ids)
            except DatabaseUnavailable as exc:
                logger.warning(
                    "event feed: %s; reading waited tasks again in %gs", exc, self.retry_after
                )
                self._unread.update(i for i in task_ids if i in self._waiting)
                await asyncio.sleep(self.retry_after)
                continue
            except Exception:  # the waiters still end: each reads its task at the deadline
                logger.exception("event feed: reading waited tasks failed")
                return
            for task_id in task_ids:
                self._settle(task_id, found.get(task_id))

    def _settle(self, task_id: str, task: Task | None) -> None:
        if task is not None and task.state not in TERMINAL:
            return  # requeued or started again meanwhile: keep waiting
        for waiter in self._waiting.get(task_id, ()):
            waiter.task, waiter.deleted = task, task is None
            waiter.done.set()

    async def _watch(self) -> None:
        try:
            while not self._idle():
                try:
                    if self.change_streams:
                        await self._stream()
                    else:
                        await self._poll()
                except ChangeStreamsUnavailable as exc:
                    logger.info("no change streams (%s); the event feed polls instead", exc)
                    self.change_streams = False
                except DatabaseUnavailable as exc:
                    logger.warning("event feed: %s; retrying in %gs", exc, self.retry_after)
                    self.mode = None
                    await asyncio.sleep(self.retry_after)
                except Exception:
                    # The API serves on without its feed's events rather than die; waits
                    # still end at their deadline. Say so, and open it again.
                    logger.exception("event feed failed; retrying in %gs", self.retry_after)
                    self.mode = None
                    await asyncio.sleep(self.retry_after)
        finally:
            self.mode = None

    def _opened(self, mode: str) -> None:
        self.mode = mode
        self.publish(OPEN)
        self._read(self._waiting)  # what changed before the watcher was open

    async def _stream(self) -> None:
        events = self.watch.task_events(max_await=self.max_await)
        try:
            async for event in events:
                if self.mode is None:  # the first None: the stream is open
                    self._opened("change stream")
                if event is not None:
                    self.publish(event)
                    self._notice(event)
                if self._idle():
                    return
        finally:
            self.mode = None
            await events.aclose()

    async def _poll(self) -> None:
        """Waited tasks every `wait_poll_interval` (one read for all), and the fingerprint
        every `poll_interval` while someone listens."""
        loop = asyncio.get_running_loop()
        last: tuple[Any, ...] | None = await self.watch.fingerprint()
        self._opened("polling")
        next_fingerprint = loop.time() + self.poll_interval
        next_read: float | None = None
        while not self._idle():
            if not self._waiting:
                next_read = None
            elif next_read is None:  # the first waiter: a read within one wait interval
                next_read = loop.time() + self.wait_poll_interval
            wake = next_fingerprint if next_read is None else min(next_fingerprint, next_read)
            await self._sleep_until(wake)
            if next_read is not None and loop.time() >= next_read:
                next_read = loop.time() + self.wait_poll_interval
                self._read(self._waiting)
            if loop.time() < next_fingerprint:
                continue
            next_fingerprint = loop.time() + self.poll_interval
            if not self._subscribers:
                last = None  # nobody to tell; the next listener hears "changed" once
                continue
            now = await self.watch.fingerprint()
            if now != last:
                last = now
                self.publish(CHANGED)

    async def _sleep_until(self, when: float) -> None:
        """Until `when` (loop time), or sooner when a waiter joins (the poll then plans
        its next read: a poll planned before anyone waited may be seconds away)."""
        self._joined.clear()
        delay = when - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, delay)):
                await self._joined.wait()


def _offer(queue: asyncio.Queue[Event | None], event: Event | None, *, force: bool = False) -> None:
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        if force:  # make room: the closing mark must arrive
            queue.get_nowait()
            queue.put_nowait(event)


class BatchedReads:
    """Reads of tasks asked for at about the same moment, made as one query: a thousand
    waits that end together cost one read, not a thousand in a row."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks
        self._asked: dict[str, list[asyncio.Future[Task | None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def get(self, task_id: str) -> Task | None:
        """The task as it is now, None if there is none."""
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._asked.setdefault(task_id, []).append(future)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="task-feed-batched-reads")
        return await future

    async def _read(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                found = await self.tasks.get_many(asked)
            except Exception as exc:
                for futures in asked.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for task_id, futures in asked.items():
                for future in futures:
                    if not future.done():
                        future.set_result(found.get(task_id))
