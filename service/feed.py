"""TaskFeed: one watcher of task changes per API process, fanned out to every subscriber
(the dashboard's Server-Sent Events, GET /events) through asyncio queues.

The watcher is a change stream where the server has them (TaskStore.task_events), else a
poll of cheap counts every few seconds (TaskStore.fingerprint). It runs only while someone
listens, and for `linger` seconds after the last one leaves, so that clients that reconnect
do not reopen it each time; with nobody listening it costs the database nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from service.errors import ChangeStreamsUnavailable, DatabaseUnavailable
from service.store import TaskStore

logger = logging.getLogger(__name__)

Event = dict[str, Any]
# Told to a subscriber once the watcher runs (and so nothing after it is missed).
OPEN: Event = {"op": "open"}
# Told in polling mode when the fingerprint moved: something changed, the feed cannot say what.
CHANGED: Event = {"op": "changed"}


class TaskFeed:
    """Fan-out of task changes to subscribers; see the module docstring."""

    def __init__(
        self,
        store: TaskStore,
        *,
        change_streams: bool = True,
        poll_interval: float = 2.0,
        max_await: float = 1.0,
        linger: float = 60.0,
        queue_size: int = 256,
        retry_after: float = 1.0,
    ) -> None:
        self.store = store
        self.change_streams = change_streams
        self.poll_interval = poll_interval
        self.max_await = max_await
        self.linger = linger
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.mode: str | None = None  # "change stream" or "polling" while watching
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
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
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="task-feed")
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            if not self._subscribers:
                self._idle_since = time.monotonic()

    @property
    def subscribers(self) -> int:
        """How many listen now."""
        return len(self._subscribers)

    @property
    def watching(self) -> bool:
        """True while the watcher runs."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Tell every subscriber to finish and stop the watcher (at app shutdown)."""
        self._closed = True
        for queue in self._subscribers:
            _offer(queue, None, force=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def publish(self, event: Event) -> None:
        """Hand an event to every subscriber; a subscriber that is far behind loses it
        (it reloads everything on the next event anyway)."""
        for queue in self._subscribers:
            _offer(queue, event)

    def _idle(self) -> bool:
        return not self._subscribers and time.monotonic() - self._idle_since >= self.linger

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
        finally:
            self.mode = None

    def _opened(self, mode: str) -> None:
        self.mode = mode
        self.publish(OPEN)

    async def _stream(self) -> None:
        events = self.store.task_events(max_await=self.max_await)
        try:
            async for event in events:
                if self.mode is None:  # the first None: the stream is open
                    self._opened("change stream")
                if event is not None:
                    self.publish(event)
                if self._idle():
                    return
        finally:
            self.mode = None
            await events.aclose()

    async def _poll(self) -> None:
        last = await self.store.fingerprint()
        self._opened("polling")
        while not self._idle():
            await asyncio.sleep(self.poll_interval)
            now = await self.store.fingerprint()
            if now != last:
                last = now
                self.publish(CHANGED)


def _offer(queue: asyncio.Queue[Event | None], event: Event | None, *, force: bool = False) -> None:
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        if force:  # make room: the closing mark must arrive
            queue.get_nowait()
            queue.put_nowait(event)
