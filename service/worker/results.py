"""Results written together: the tasks that finish while a result write is in flight go out
in one bulk_write of fenced updates (Claims.finish_many), each caller awaiting its own.

A result that finds no write in flight, nor one returned within GATHER, is written at once:
a trickle of tasks waits for nothing. Those that finish meanwhile are gathered, and after a
write returns the worker waits up to GATHER for more (at most MOST to a batch), unless the
worker is full (every slot held: nothing more can be claimed, so nothing more will finish
until these are written). A crash before a batch is written is a crash before its writes:
the tasks stay STARTED under a lost lease, and recovery runs them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.errors import DatabaseUnavailable
from service.store.claims import Claims, Finish
from service.worker import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a batch waits for more results after a write returned. In a burst on the local
# SecantusDB a worker's claims land about 10 ms apart (each task's result follows its claim):
# 5 ms gathered barely one more result, 20 ms gathers four to seven.
GATHER = 0.02
MOST = 100  # results to one bulk_write


class ResultWriter:
    """Batches the fenced result writes of one worker; see the module's docstring."""

    def __init__(
        self, claims: Claims, *, backoff_cap: float, gather: float = GATHER, most: int = MOST
    ) -> None:
        self.claims = claims
        self.backoff_cap = backoff_cap
        self.gather = gather
        self.most = most
        self._pending: list[tuple[Finish, asyncio.Future[bool]]] = []
        self._more = asyncio.Event()  # a result joined the pending ones
        self._flusher: asyncio.Task[None] | None = None
        # Whether the worker can claim nothing more (the worker sets it): no use waiting.
        self.full: Callable[[], bool] = lambda: False

    async def write(self, finish: Finish) -> bool:
        """Write one result under its lease (through database outages, as part of a batch);
        whether it landed (False: the lease was lost and the result dropped)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((finish, done))
        self._more.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="result-writer")
        return await done

    async def stop(self) -> None:
        """Stop writing: what is still pending is not written (as a task cancelled while
        its result was being written; recovery or release deals with it)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for _, done in self._pending:
            done.cancel()
        self._pending.clear()

    async def _flush(self) -> None:
        first = True
        while True:
            if not first:  # in a burst: wait for company (bounded), or end when none came
                await self._wait_for_more()
                if not self._pending:
                    return
            first = False
            batch, self._pending = self._pending[: self.most], self._pending[self.most :]
            self._more.clear()
            try:
                landed = await self._persist([finish for finish, _ in batch])
            except Exception as exc:  # each caller learns of it (and stops the worker)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), ok in zip(batch, landed, strict=True):
                if not done.done():  # its caller may have been cancelled meanwhile
                    done.set_result(ok)

    async def _wait_for_more(self) -> None:
        """Up to `gather` seconds, or until the batch or the worker is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather
        while (
            len(self._pending) < self.most
            and not self.full()
            and (left := deadline - loop.time()) > 0
        ):
            self._more.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that comes just as the event is set (see periodic.stop_task).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._more.wait()

    async def _persist(self, batch: list[Finish]) -> list[bool]:
        """Retry the batch through a database outage; the fence makes a retry safe (a write
        that landed shows its lease in its target state)."""
        return await persist(
            lambda: self.claims.finish_many(batch),
            what=f"writing {len(batch)} result(s)",
            backoff_cap=self.backoff_cap,
        )


async def persist(write: Callable[[], Awaitable[T]], *, what: str, backoff_cap: float) -> T:
    """`write()`, retried with a doubling backoff (up to `backoff_cap` seconds) for as long
    as the database is unavailable: for writes a retry cannot make wrong (fenced, or
    idempotent)."""
    backoff = 0.1
    while True:
        try:
            return await write()
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.inc()
            logger.warning("%s failed: %s; retrying in %.1fs", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, backoff_cap)
