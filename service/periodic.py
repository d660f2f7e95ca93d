"""A small base for the jobs a worker repeats: heartbeat, recovery."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from service.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)


# Stopping a background task: cancel it again this often, give up waiting after STOP_WITHIN.
RECANCEL_EVERY = 0.2
STOP_WITHIN = 5.0


async def stop_task(task: asyncio.Task[Any], *, within: float = STOP_WITHIN) -> bool:
    """Cancel `task` and wait for it to end, at most `within` seconds; True if it ended.

    A cancellation can be lost: on Python 3.11, `asyncio.wait_for` (which the driver uses
    around its network calls) returns normally when cancelled just as its operation
    completes, and the task then goes on as if nothing happened. So it is cancelled again
    until it ends, and given up on (with a warning) after the bound: a process must always
    be able to stop.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            logger.warning("%s not stopped after %.1fs; left behind", task.get_name(), within)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_EVERY, remaining))
    if not task.cancelled() and task.exception() is not None:
        task.exception()  # retrieved: its owner has reported it already
    return True


class Periodic:
    """Calls `run_once()` every `interval` seconds (with a little jitter) until stopped.

    A round that fails because the database did not answer is skipped. Any other exception
    is a bug or a state nobody planned for: with `on_crash` set (the worker), the loop ends
    and hands it over, so the process can exit rather than run on half-broken; without it
    (the API), it is logged and the next round tries again.
    """

    def __init__(
        self,
        *,
        interval: float,
        jitter: float = 0.1,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.interval = interval
        self.jitter = jitter
        self.on_crash = on_crash
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> object:
        """One round of the job; tests call it directly. Subclasses implement it."""
        raise NotImplementedError

    def on_unavailable(self) -> None:
        """Called when a round failed because the database did not answer."""

    def start(self) -> None:
        """Begin running in the background."""
        self._task = asyncio.create_task(self._loop(), name=type(self).__name__)

    async def stop(self) -> None:
        """Stop and wait for the background loop to end (within STOP_WITHIN seconds)."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval * (1 + random.uniform(-self.jitter, self.jitter)))
            try:
                await self.run_once()
            except DatabaseUnavailable as exc:
                logger.warning("%s skipped: %s", type(self).__name__, exc)
                self.on_unavailable()
            except Exception as exc:
                if self.on_crash is not None:
                    self.on_crash(exc)
                    return
                logger.exception("%s failed; will try again", type(self).__name__)
