"""A small base for the jobs a worker repeats: heartbeat, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from service.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)


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
        """Stop and wait for the background loop to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

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
