"""Running one claimed task: its arguments loaded, its code run within its time limit, and
its outcome (done, retry later, failed) written under its lease, together with the others
finished at about the same time (service/worker/results.py), and logged."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import aiohttp

from service import tracing
from service.clock import DbClock
from service.config import Settings
from service.destinations import allowing
from service.models import Task
from service.plugins import (
    ArgsUnloadable,
    Fail,
    Registry,
    Retry,
    TaskContext,
    TaskTimedOut,
    run_task,
)
from service.store.claims import Claims
from service.worker import metrics
from service.worker.results import ResultWriter, persist
from service.worker.slots import Slots

logger = logging.getLogger(__name__)


class _CannotRun(Exception):
    """A claimed task that this worker cannot run as stored (its message says why)."""


def retry_delay(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base * 2**(attempt-1), capped, then 50-100% of it."""
    # The exponent is bounded: a stored attempts count in the thousands must not overflow.
    delay: float = min(cap, base * 2.0 ** min(attempt - 1, 60))
    return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its output, or the error and whether another attempt may follow."""

    started: float  # time.monotonic() when the run began
    output: str | None = None
    error: str | None = None
    retry: bool = True
    retry_after: float | None = None  # seconds before the next attempt (None: the backoff)


class Executor:
    """Runs claimed tasks of the types in `registry`, each with the shared HTTP client
    `http`, and writes each one's outcome fenced on its lease (in batches: `results`)."""

    def __init__(
        self,
        claims: Claims,
        *,
        clock: DbClock,
        slots: Slots,
        registry: Registry,
        settings: Settings,
        http: aiohttp.ClientSession,
        worker_id: str,
    ) -> None:
        self.claims = claims
        self.clock = clock
        self.slots = slots
        self.registry = registry
        self.settings = settings
        self.http = http
        # The guarded client for tasks' own destinations, while the worker runs.
        self.outbound: Callable[[], aiohttp.ClientSession | None] = lambda: None
        self.worker_id = worker_id
        self.results = ResultWriter(claims, backoff_cap=settings.heartbeat_interval)
        # Told when a task this worker ran ended with a callback to deliver.
        self.callback_due: Callable[[], None] = lambda: None

    async def run(self, task: Task) -> Outcome:
        """Run the task; whatever it raises becomes the outcome (a cancellation propagates)."""
        started = time.monotonic()
        attributes = tracing.task_attributes(task)
        tracing.past_span(
            "task-runner claim",
            traceparent=task.traceparent,
            start=task.run_at,
            end=task.started_at,
            attributes=attributes,
        )
        with tracing.span(
            "task-runner run", traceparent=task.traceparent, kind="CONSUMER", attributes=attributes
        ) as context:
            return await self._run(task, started, traceparent=context)

    async def _run(self, task: Task, started: float, *, traceparent: str | None) -> Outcome:
        if task.unrunnable:
            # Claimed (the filter could not see it) but not runnable as stored: fail it for
            # good, once, saying why; retrying cannot make the document well formed.
            error = "malformed task: " + "; ".join(task.unrunnable)
            return Outcome(started, error=error, retry=False)
        try:
            output = await self._invoke(task, traceparent=traceparent)
        except _CannotRun as exc:
            # Retrying cannot make stored arguments load: fail it for good, saying why.
            return Outcome(started, error=str(exc), retry=False)
        except TaskTimedOut as exc:
            return Outcome(started, error=str(exc))
        except Retry as exc:
            return Outcome(started, error=str(exc), retry_after=exc.after)
        except Fail as exc:
            return Outcome(started, error=str(exc), retry=False)
        except Exception as exc:
            return Outcome(started, error=f"{type(exc).__name__}: {exc}")
        return Outcome(started, output=output)

    async def _invoke(self, task: Task, *, traceparent: str | None) -> str:
        """Load the task's arguments with its type's schema and run it within its time
        limit: the task's own, else its type's, else TASK_RUNNER_TASK_TIMEOUT. The run is
        given the trace context to pass on (its span's, else the task's)."""
        definition = self.registry.get(task.type)
        if definition is None:  # the claim's filter names only our types
            raise _CannotRun(f"no task type {task.type!r} in this worker")
        if "args" in task.malformed:
            raise _CannotRun(
                "malformed task: " + "; ".join(p for p in task.problems if p.startswith("args "))
            )
        try:
            # The networks opened to http tasks apply to loading their args too.
            with allowing(self.settings.allowed_networks):
                args = definition.load_args(task.args)
        except ArgsUnloadable as exc:
            raise _CannotRun(str(exc)) from None
        ctx = TaskContext(
            task_id=task.id,
            attempt=task.attempts,
            settings=self.settings,
            http=self.http,
            outbound=self.outbound(),
            traceparent=traceparent,
        )
        time_limit = task.timeout or definition.timeout or self.settings.task_timeout
        return await run_task(definition, ctx, args, time_limit=time_limit)

    async def finish(self, task: Task, outcome: Outcome) -> None:
        """Write the outcome under the task's lease (through database outages), give back
        its slot, count and log it; a lost lease drops the result."""
        written, said, kind = await self._write(task, outcome)
        if self.slots.holds(task):
            # Written or not, the task is no longer STARTED under our lease.
            await self._persist_none(lambda: self.slots.free(task))
        if written and kind != "retry" and task.callback_url is not None:
            self.callback_due()
        took = time.monotonic() - outcome.started
        metrics.finished(task.type, kind if written else "lease_lost", took)
        event = {  # the fields of a JSON log line (service/logs.py)
            "task_id": task.id,
            "type": task.type,
            "attempt": task.attempts,
            "duration": round(took, 6),
            "worker": self.worker_id,
            "outcome": said.split(" ")[0] if written else "lease_lost",
        }
        if written:
            # A task that failed for good is what someone must look at; a retry is not yet.
            logger.log(
                logging.WARNING if kind == "failed" else logging.INFO,
                "task %s type=%s attempt=%d %s in %.3fs%s",
                task.id,
                task.type,
                task.attempts,
                said,
                took,
                "" if outcome.error is None else f": {outcome.error}",
                extra=event,
            )
        else:
            logger.warning(
                "task %s type=%s attempt=%d: lease lost, result dropped",
                task.id,
                task.type,
                task.attempts,
                extra=event,
            )

    async def _write(self, task: Task, outcome: Outcome) -> tuple[bool, str, str]:
        """Complete, retry or fail the task; returns (written, the outcome as logged, the
        kind counted)."""
        error = outcome.error
        if error is None:
            written = await self.results.write(self.claims.completion(task, outcome.output or ""))
            return written, "COMPLETE", "complete"
        retry_at = None
        if outcome.retry and task.max_attempts is not None and task.attempts < task.max_attempts:
            delay = outcome.retry_after
            if delay is None:
                delay = retry_delay(
                    task.attempts, base=self.settings.retry_base, cap=self.settings.retry_max
                )
            retry_at = self.clock.now() + timedelta(seconds=delay)
        written = await self.results.write(self.claims.failure(task, error, retry_at=retry_at))
        if retry_at is None:
            return written, "FAILED", "failed"
        return written, f"retry at {retry_at.isoformat()}", "retry"

    async def _persist_none(self, write: Callable[[], Awaitable[None]]) -> None:
        """A write that answers nothing (a slot's give-back), retried through an outage."""
        await persist(
            write, what="giving back a slot", backoff_cap=self.settings.heartbeat_interval
        )
