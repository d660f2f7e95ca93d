"""What a worker process needs around its Worker: who it is, its version, its HTTP client,
the database at start-up and the stop signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Protocol

import aiohttp

from service.errors import DatabaseUnavailable
from service.store import Store

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    """Host and process id: who holds a task, for the people on call."""
    return f"{socket.gethostname()}:{os.getpid()}"


def http_session() -> aiohttp.ClientSession:
    """The worker's HTTP client, shared by its tasks: one request per attempt.

    aiohttp silently resends an idempotent request once when the connection drops. Our own
    retries already back off and record every failure, so that hidden retry is turned off
    (the same switch aiohttp's test client uses) to keep one attempt = one request.
    """
    session = aiohttp.ClientSession()
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


async def wait_for_database(store: Store) -> None:
    """Measure the database clock, retrying with backoff until the database answers."""
    backoff = 0.5
    while True:
        try:
            await store.sync_clock()
            return
        except DatabaseUnavailable as exc:
            logger.warning("database not reachable yet (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


class Stoppable(Protocol):
    """What the signals stop (Worker is one)."""

    def stop(self) -> None:
        """Stop gracefully."""

    def stop_now(self) -> None:
        """Stop at once."""


class Signals:
    """SIGTERM/SIGINT: the first stops gracefully, the second at once; before the worker
    exists, the first cancels the start-up (the task that created this)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.seen = 0
        self.worker: Stoppable | None = None
        self._main = asyncio.current_task()

    def install(self) -> None:
        """Handle SIGTERM and SIGINT on the running loop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self.seen += 1
        name = signal.Signals(signum).name
        if self.worker is None:
            logger.info("%s: stopping before the worker started", name)
            if self._main is not None:
                self._main.cancel()
        elif self.seen == 1:
            logger.info("%s: stopping; running tasks get %.1fs to finish", name, self.grace)
            self.worker.stop()
        else:
            logger.warning("%s again: stopping now", name)
            self.worker.stop_now()
