"""What the HTTP API and the CLI both do: recover stale tasks, requeue a failed one (or every
task a filter matches, or delete them: batch by batch, within a time budget), and count the
tasks by state and type.

Each function takes the store and returns plain records; the callers turn them into JSON
(service.web.operations) or a table (service.cli.printers). The records' attribute names are
the fields of the API's answers, so its schemas dump them as they are.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from service.errors import InvalidFilter
from service.models import State, Task, TaskFilter

if TYPE_CHECKING:
    from service.store import Store
    from service.store.bulk import Batch
    from service.store.figures import Stats


class Outcome(StrEnum):
    """What a recovery pass did to one stale task (the lists of POST /recover's answer)."""

    REQUEUED = "requeued"
    FAILED = "failed"
    NOT_RECOVERED = "not_recovered"


@dataclass(frozen=True, kw_only=True)
class Recovered:
    """One stale task as found, and as read back after the recovery update (None: deleted)."""

    before: Task
    after: Task | None

    @property
    def id(self) -> str:
        return self.before.id

    @property
    def outcome(self) -> Outcome:
        """Judged from the task's state now: another worker may have claimed it since, or its
        own worker may have been heard from before the update."""
        now = self.after
        if now is None or (now.state == State.STARTED and now.lease == self.before.lease):
            return Outcome.NOT_RECOVERED
        if now.state == State.STARTED:  # recovered, then claimed again at once
            return Outcome.REQUEUED
        if now.state == State.FAILED and now.finished_at != self.before.finished_at:
            return Outcome.FAILED
        if now.state == State.NOTSTARTED:
            return Outcome.REQUEUED
        return Outcome.NOT_RECOVERED

    @property
    def reason(self) -> str:
        """Why it was not recovered ("" when it was)."""
        now = self.after
        if now is None:
            return "deleted meanwhile"
        if self.outcome is not Outcome.NOT_RECOVERED:
            return ""
        if now.state == State.STARTED:
            return "its worker was heard from again"
        return f"{now.state} meanwhile"

    def describe(self) -> str:
        """What happened to it, in words (`task-runner recover` prints one line per task)."""
        outcome = self.outcome
        if self.after is None:
            return self.reason
        if outcome is Outcome.NOT_RECOVERED:
            return f"not recovered: {self.reason}"
        if outcome is Outcome.FAILED:
            return "-> FAILED: attempts used up"
        if self.after.state == State.STARTED:
            return f"-> NOTSTARTED, and already claimed again by {self.after.worker}"
        return "-> NOTSTARTED: back in the queue"


@dataclass(frozen=True, kw_only=True)
class Recovery:
    """One recovery pass: the threshold, how many tasks the update moved, and each stale
    task's fate. `stale_after`, `found`, `requeued`, `failed` and `not_recovered` (each with
    `id` and `reason`) are the fields of POST /recover's answer."""

    stale_after: float
    moved: int
    tasks: tuple[Recovered, ...]

    @property
    def found(self) -> int:
        return len(self.tasks)

    @property
    def requeued(self) -> list[str]:
        """Back to NOTSTARTED (some perhaps claimed again already)."""
        return [task.id for task in self.tasks if task.outcome is Outcome.REQUEUED]

    @property
    def failed(self) -> list[str]:
        """FAILED: their attempts were used up."""
        return [task.id for task in self.tasks if task.outcome is Outcome.FAILED]

    @property
    def not_recovered(self) -> list[Recovered]:
        return [task for task in self.tasks if task.outcome is Outcome.NOT_RECOVERED]


async def find_stale(store: Store, stale_after: float) -> list[Task]:
    """STARTED tasks whose worker has been silent for `stale_after` seconds, oldest first."""
    return await store.claims.find_stale(stale_after)


async def recover(
    store: Store, *, stale_after: float, stale: Sequence[Task] | None = None
) -> Recovery:
    """Recover the stale tasks once: back to NOTSTARTED, or FAILED when out of attempts.

    `stale` is the list `find_stale` returned a moment ago (found again when None): only
    those tasks are moved, with the store's single conditional update, so a task that turned
    stale since it was shown is left for the next pass. Each one is then read back, in one
    query, to tell what happened to it.
    """
    if stale is None:
        stale = await store.claims.find_stale(stale_after)
    ids = [task.id for task in stale]
    moved = await store.claims.recover_stale(stale_after, only=ids) if ids else 0
    after = await store.tasks.get_many(ids)
    tasks = tuple(Recovered(before=task, after=after.get(task.id)) for task in stale)
    return Recovery(stale_after=stale_after, moved=moved, tasks=tasks)


async def requeue(store: Store, task_id: str) -> Task:
    """A FAILED task back to NOTSTARTED, due now, with its attempts reset (its errors kept).

    Raises InvalidTaskId for an id no task can have, TaskNotFound when no task has it, and
    TaskNotRequeueable (with the task's `state`) when it is not FAILED.
    """
    return await store.tasks.requeue(task_id)


# Ids read per batch of a bulk action: one write to this many tasks is short, and a million
# matches take a thousand of them.
BATCH_SIZE = 1000
FILTER_FIELDS = ("state", "type", "tag", "finished_before", "finished_after")


@dataclass(frozen=True)
class Bulk:
    """What a bulk action did in one call: `count` tasks changed; `more`: it stopped for time
    with matches perhaps left, so call it again (with the same filter) to go on."""

    count: int
    more: bool


def requeue_states(task_filter: TaskFilter) -> frozenset[State]:
    """The states a bulk requeue with this filter takes: FAILED, or COMPLETE when the filter
    asks for it. Raises InvalidFilter for an empty filter or another state."""
    problems = _problems(task_filter)
    if task_filter.state not in (None, State.FAILED, State.COMPLETE):
        problems["state"] = (
            f"a requeue takes FAILED tasks, or COMPLETE ones when asked; not {task_filter.state}"
        )
    _refuse(problems)
    return frozenset({task_filter.state or State.FAILED})


def delete_states(task_filter: TaskFilter) -> frozenset[State]:
    """The states a bulk delete with this filter takes: the filter's, or every state but
    STARTED. Raises InvalidFilter for an empty filter or STARTED."""
    problems = _problems(task_filter)
    if task_filter.state is State.STARTED:
        problems["state"] = "a bulk delete never takes a STARTED task; delete one by its id"
    _refuse(problems)
    if task_filter.state is not None:
        return frozenset({task_filter.state})
    return frozenset(State) - {State.STARTED}


def _problems(task_filter: TaskFilter) -> dict[str, str]:
    problems: dict[str, str] = {}
    if task_filter.empty:
        fields = ", ".join(FILTER_FIELDS)
        problems["filter"] = f"give at least one of {fields}; an empty filter would take every task"
    after, before = task_filter.finished_after, task_filter.finished_before
    if after is not None and before is not None and after >= before:
        problems["finished_after"] = "must be before finished_before"
    return problems


def _refuse(problems: dict[str, str]) -> None:
    if problems:
        raise InvalidFilter(problems)


async def requeue_matching(
    store: Store, task_filter: TaskFilter, *, within: float, batch_size: int | None = None
) -> Bulk:
    """Every FAILED task the filter matches (COMPLETE ones if it names that state) back to
    NOTSTARTED, due now, attempts reset, as `requeue` does one; `batch_size` (default
    BATCH_SIZE) at a time, starting no batch that would likely end past `within` seconds (the
    first always runs). Raises InvalidFilter before any write for a filter it cannot take."""
    states = requeue_states(task_filter)
    return await _in_batches(
        lambda limit: store.bulk.requeue_batch(task_filter, states=states, limit=limit),
        within=within,
        batch_size=batch_size or BATCH_SIZE,
    )


async def delete_matching(
    store: Store, task_filter: TaskFilter, *, within: float, batch_size: int | None = None
) -> Bulk:
    """Delete every task the filter matches but the STARTED ones, a batch at a time, as
    `requeue_matching` goes."""
    states = delete_states(task_filter)
    return await _in_batches(
        lambda limit: store.bulk.delete_batch(task_filter, states=states, limit=limit),
        within=within,
        batch_size=batch_size or BATCH_SIZE,
    )


async def _in_batches(
    batch: Callable[[int], Awaitable[Batch]], *, within: float, batch_size: int
) -> Bulk:
    """Batches until one comes back short (nothing left) or the next would likely end past
    `within` seconds (judged by the slowest batch so far)."""
    deadline = time.monotonic() + within
    count, slowest = 0, 0.0
    while True:
        began = time.monotonic()
        done = await batch(batch_size)
        ended = time.monotonic()
        count += done.done
        slowest = max(slowest, ended - began)
        if done.found < batch_size:
            return Bulk(count, more=False)
        if ended + slowest > deadline:
            return Bulk(count, more=True)


@dataclass(frozen=True, kw_only=True)
class Count:
    """How many tasks are in one state and of one type, as stored (odd values as text)."""

    state: str
    type: str
    count: int


@dataclass(frozen=True, kw_only=True)
class Summary:
    """The queue at a glance: counts ordered by state, then type, with their totals."""

    counts: tuple[Count, ...]
    oldest_due: Task | None  # the NOTSTARTED task due first, if any is due
    stale: int  # STARTED tasks with no heartbeat within the stale threshold
    unreadable: int  # documents no worker can claim or recover
    unusable_schedules: int = 0  # schedules left alone for what they hold

    @property
    def by_state(self) -> dict[str, int]:
        """Every state (0 when none), then any other value stored as a state."""
        totals = {state.value: 0 for state in State}
        for count in self.counts:
            totals[count.state] = totals.get(count.state, 0) + count.count
        return totals

    @property
    def by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for count in self.counts:
            totals[count.type] = totals.get(count.type, 0) + count.count
        return totals

    @property
    def total(self) -> int:
        return sum(count.count for count in self.counts)


def summarize(stats: Stats) -> Summary:
    """The store's Stats with its counts in one order: by state, then by type, as text."""
    ordered = sorted(stats.by_state_and_type.items(), key=lambda item: tuple(map(str, item[0])))
    counts = tuple(
        Count(state=str(state), type=str(task_type), count=count)
        for (state, task_type), count in ordered
    )
    return Summary(
        counts=counts, oldest_due=stats.oldest_due, stale=stats.stale, unreadable=stats.unreadable
    )


async def stats(store: Store, stale_after: float) -> Summary:
    """Counts by state and type, the oldest due task, the stale and unreadable tasks, and
    the schedules that cannot be used as stored."""
    summary = summarize(await store.figures.stats(stale_after))
    return dataclasses.replace(summary, unusable_schedules=await store.schedules.unusable())
