"""Completion callbacks: each worker delivers the pending callbacks of finished tasks (the
outbox, service.store.callbacks): one POST of the task as `GET /tasks/{id}` shows it, signed
per Standard Webhooks with its own stable `webhook-id` (`callback_id`), retried with
the task's backoff until a 2xx or MAX_ATTEMPTS, then FAILED with its last error.

What it costs when there is nothing to send: the worker wakes this job itself when one of its
own tasks ends with a callback, so the database is asked only then, at the time of a retry
this worker set, and once per POLL_THRESHOLDS stale thresholds (48 s by default) for the
callbacks other workers left (they died before or during a delivery, or recovery failed their
task): one indexed find_one_and_update that finds nothing, well inside an idle worker's
budget of a command a second (tests/test_budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiohttp

from service import tracing, webhooks
from service.clock import DbClock
from service.config import Settings
from service.destinations import guarded_session
from service.errors import DatabaseUnavailable
from service.models import Task
from service.periodic import stop_task
from service.store import new_lease
from service.store.callbacks import Outbox
from service.task_view import TaskSchema
from service.worker import metrics
from service.worker.execution import retry_delay

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10  # deliveries of one callback before it is FAILED
TIMEOUT = 10.0  # seconds one delivery may take
CONCURRENT = 8  # deliveries one worker makes at once
# Stale thresholds between looks for callbacks other workers left: a look each threshold
# would cost an idle worker a twelfth of a command a second, more than its budget has left.
POLL_THRESHOLDS = 4
task_schema = TaskSchema()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def callback_id(task: Task) -> str:
    """The `webhook-id` of a task's callback: the same on every attempt, another each time
    the task ends (a requeued task's next ending is news, not a retry a receiver drops)."""
    if task.finished_at is None:
        return f"{task.id}-callback"
    ended = (task.finished_at - EPOCH) // timedelta(milliseconds=1)
    return f"{task.id}-callback-{ended}"


class CallbackSender:
    """Takes due callbacks under a lease and delivers them; `nudge()` when one is due."""

    def __init__(self, outbox: Outbox, *, clock: DbClock, settings: Settings) -> None:
        self.outbox = outbox
        self.clock = clock
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None  # while the worker runs
        self.poll = settings.stale_after * POLL_THRESHOLDS
        # A delivery that outlives its lease may be taken by another worker: the lease
        # outlasts the delivery's timeout by a stale threshold.
        self.hold = TIMEOUT + settings.stale_after
        self.on_crash: Callable[[BaseException], None] | None = None
        self._wake = asyncio.Event()
        self._retries: list[datetime] = []  # the retries set here (database time), a heap
        self._task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Close the guarded client start() opened (the worker does, once every task ended)."""
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    def nudge(self) -> None:
        """A callback may be due now (one of this worker's tasks ended with one)."""
        self._wake.set()

    def start(self) -> None:
        """Open the worker's guarded client (service.destinations; the http tasks use it
        too) and begin delivering in the background."""
        if self.session is None:
            self.session = guarded_session(self.settings.allowed_networks)
        self._task = asyncio.create_task(self._loop(), name=type(self).__name__)

    async def stop(self) -> None:
        """Stop; a delivery cut short is taken again when its lease runs out."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)

    async def _loop(self) -> None:
        while True:
            wait = self.poll
            if self._retries:
                # Judged as the take judges due-ness: on the time the database surely reached.
                left = (self._retries[0] - self.clock.surely_now()).total_seconds()
                wait = min(wait, max(0.0, left))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            while self._retries and self._retries[0] <= self.clock.surely_now():
                heapq.heappop(self._retries)
            try:
                await self.run_once()
            except DatabaseUnavailable as exc:
                metrics.DATABASE_ERRORS.inc()
                logger.warning("callbacks skipped: %s", exc)
            except Exception as exc:
                if self.on_crash is not None:
                    self.on_crash(exc)
                    return
                logger.exception("callbacks failed; will try again")

    async def run_once(self) -> int:
        """Deliver every due callback (CONCURRENT at once); how many deliveries were made."""
        made = 0
        inflight: set[asyncio.Task[None]] = set()
        drained = False
        try:
            while True:
                while not drained and len(inflight) < CONCURRENT:
                    lease = new_lease()
                    task = await self.outbox.take(lease, hold=self.hold)
                    if task is None:
                        drained = True
                    else:
                        inflight.add(asyncio.create_task(self._deliver(task, lease)))
                if not inflight:
                    return made
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for delivery in done:
                    delivery.result()
                    made += 1
        finally:
            # Stopped, or a write failed: the others' leases run out and they are taken again.
            for delivery in inflight:
                delivery.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _deliver(self, task: Task, lease: str) -> None:
        """POST the task to its callback_url; record the delivery, or its failure."""
        attempts = task.callback.attempts if task.callback is not None else 1
        error, after, final = await self._send(task)
        if error is None:
            landed = await self.outbox.delivered(task, lease)
            metrics.CALLBACKS.labels(outcome="delivered" if landed else "lease_lost").inc()
            if landed:
                logger.info("task %s callback delivered (attempt %d)", task.id, attempts)
            return
        retry_at = None
        if not final and attempts < MAX_ATTEMPTS:
            if after is None:
                after = retry_delay(
                    attempts, base=self.settings.retry_base, cap=self.settings.retry_max
                )
            retry_at = self.clock.now() + timedelta(seconds=after)
            self._retry_later(retry_at)
        landed = await self.outbox.failed(task, lease, error=error, retry_at=retry_at)
        outcome = "failed" if retry_at is None else "retry"
        metrics.CALLBACKS.labels(outcome=outcome if landed else "lease_lost").inc()
        if landed:
            logger.log(
                logging.WARNING if retry_at is None else logging.INFO,
                "task %s callback attempt %d failed: %s; %s",
                task.id,
                attempts,
                error,
                "FAILED" if retry_at is None else f"retry at {retry_at.isoformat()}",
            )

    async def _send(self, task: Task) -> tuple[str | None, float | None, bool]:
        """One delivery: (the error, or None when answered 2xx; the seconds a Retry-After
        asked for; whether the failure is final)."""
        if self.session is None or task.callback_url is None:
            return "no callback client or URL", None, True
        body = json.dumps(task_schema.dump(task), separators=(",", ":")).encode()
        attributes = tracing.task_attributes(task)
        with tracing.span(
            "task-runner callback",
            traceparent=task.traceparent,
            kind="CLIENT",
            attributes=attributes,
        ) as context:
            return await self._post(task, body, traceparent=context)

    async def _post(
        self, task: Task, body: bytes, *, traceparent: str | None
    ) -> tuple[str | None, float | None, bool]:
        assert self.session is not None and task.callback_url is not None
        try:
            async with asyncio.timeout(TIMEOUT):
                answer = await webhooks.send(
                    self.session,
                    method="POST",
                    url=task.callback_url,
                    headers={"Content-Type": "application/json"},
                    body=body,
                    webhook_id=callback_id(task),
                    secret=self.settings.signing_secret,
                    allowed=self.settings.allowed_networks,
                    traceparent=traceparent,
                )
        except webhooks.Refused as exc:
            return str(exc), None, True
        except TimeoutError:
            return f"no answer within {TIMEOUT:g} s", None, False
        except aiohttp.ClientError as exc:
            return webhooks.no_answer(exc), None, False
        if answer.ok:
            return None, None, False
        return f"HTTP {answer.describe()}", answer.retry_after, False

    def _retry_later(self, at: datetime) -> None:
        """Wake up for a retry set here (others' are found by the poll)."""
        heapq.heappush(self._retries, at)
