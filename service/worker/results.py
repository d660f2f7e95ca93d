"""Results written together: the tasks that finish while a result write is in flight go out
in one bulk_write of fenced updates (Claims.finish_many), each caller awaiting its own.

A result that finds no write in flight, nor one returned within the gathering window, is
written at once: a trickle of tasks waits for nothing. Those that finish meanwhile are
gathered, and after a write returns the worker waits for more (at most MOST to a batch),
unless the worker is full (every slot held: nothing more can be claimed, so nothing more
will finish until these are written).

The window is GATHER, or, while results keep coming at a steady pace, the time SPREAD more
of them take at that pace, up to HOLD: a worker's results come one claim round trip apart
when it drains a backlog, about a millisecond on MongoDB (GATHER gathers many) but 20 to
60 ms on a busy embedded SecantusDB (GATHER would gather none). A pace slower than HOLD /
SPREAD is a trickle, and waits only GATHER.

A crash before a batch is written is a crash before its writes: the tasks stay STARTED
under a lost lease, and recovery runs them again.
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

# Seconds a batch waits for more results after a write returned, at least.
GATHER = 0.02
# At most: a result held this long is written late by as much (its task stays STARTED
# under its heartbeat meanwhile).
HOLD = 0.25
SPREAD = 3  # results a steady pace's window waits for
PACE_WEIGHT = 0.2  # of the latest gap between two results in the running average
MOST = 100  # results to one bulk_write


class Pace:
    """How far apart results come (a running average), and so how long a write waits for
    more: `gather`, or SPREAD gaps at a steady pace, up to `hold` (see the module's
    docstring)."""

    def __init__(self, *, gather: float, hold: float) -> None:
        self.gather = gather
        self.hold = hold
        self.gap: float | None = None  # seconds; None: one result so far
        self._last: float | None = None  # when the latest result came

    def note(self, now: float) -> None:
        """A result came at `now` (seconds, on any steady clock)."""
        if self._last is not None:
            latest = min(now - self._last, self.hold)
            self.gap = latest if self.gap is None else self.gap + (latest - self.gap) * PACE_WEIGHT
        self._last = now

    def window(self) -> float:
        if self.gap is None:
            return self.gather
        spread = SPREAD * self.gap
        return spread if self.gather < spread <= self.hold else self.gather


class ResultWriter:
    """Batches the fenced result writes of one worker; see the module's docstring."""

    def __init__(
        self,
        claims: Claims,
        *,
        backoff_cap: float,
        gather: float = GATHER,
        hold: float = HOLD,
        most: int = MOST,
    ) -> None:
        self.claims = claims
        self.backoff_cap = backoff_cap
        self.pace = Pace(gather=gather, hold=hold)
        self.most = most
        self._pending: list[tuple[Finish, asyncio.Future[bool]]] = []
        self._more = asyncio.Event()  # a result joined the pending ones
        self._flusher: asyncio.Task[None] | None = None
        # Whether the worker can claim nothing more (the worker sets it): no use waiting.
        self.full: Callable[[], bool] = lambda: False

    async def write(self, finish: Finish) -> bool:
        """Write one result under its lease (through database outages, as part of a batch);
        whether it landed (False: the lease was lost and the result dropped)."""
        loop = asyncio.get_running_loop()
        self.pace.note(loop.time())
        done: asyncio.Future[bool] = loop.create_future()
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
        """Up to the pace's window, or until the batch or the worker is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pace.window()
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
