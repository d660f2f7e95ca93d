"""A worker's side of queues: what it has seen of their settings, and the claims of the tasks
of rate- or concurrency-limited queues.

Settings are read from the small `queues` collection just before a claim, at most once every
REFRESH seconds (an idle worker reads nothing): every claim a worker makes is filtered with
settings at most that old, so a change takes effect on every worker within about a second.
The plain claim leaves out the tasks of paused and limited queues (`queue: {$nin: [...]}`);
a limited queue's tasks are claimed by a claim of their own, filtered on the queue, after
taking a token of its rate (one atomic update of its document) and a slot of its concurrency
(the per-type limits' slots, keyed `queue:<name>`). A claim that finds nothing gives both
back. A queue without a token backs off until the bucket holds one; a full queue backs off
as a full type does (Slots); neither ever holds up the claims of other queues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.models import Task
from service.store import new_lease
from service.store.claims import Claims
from service.store.queues import QueueSettings, QueueTable, slot_key
from service.store.slots import SlotTable
from service.worker.slots import FIRST_BACKOFF, MAX_BACKOFF, RECHECK, Slots

logger = logging.getLogger(__name__)

# How old the settings a claim is filtered with may be, at most (seconds), unless the
# change stream has told of every change to them since.
REFRESH = 1.0
# Read again this often whatever the stream says (seconds): a change it somehow did not
# tell of is seen this late at worst.
SAFETY_REFRESH = 60.0
# A token is whole a little after the bucket's arithmetic says: do not ask a hair too early.
TOKEN_MARGIN = 0.005


class QueueGate:
    """The settings of the queues this worker has seen, and the claims of limited queues."""

    def __init__(
        self,
        table: QueueTable,
        slot_table: SlotTable,
        claims: Claims,
        *,
        type_slots: Slots,
        worker_id: str,
        claim_within: float,
    ) -> None:
        self.table = table
        self.slot_table = slot_table
        self.claims = claims
        self.type_slots = type_slots
        self.worker_id = worker_id
        self.claim_within = claim_within
        self.settings: dict[str, QueueSettings] = {}  # queues that are paused or limited
        self._read_at: float | None = None  # time.monotonic() of the last read
        # Limited queues not to try before a time: (monotonic time, the back-off that led there).
        self._retry: dict[str, tuple[float, float]] = {}
        self._slotted: dict[str, str] = {}  # lease -> the queue whose slot it holds
        self._unconfirmed: tuple[str, str] | None = None  # (queue, lease) of a claim in flight
        self._tried_at = time.monotonic()
        # Called when a queue has a concurrency: recovery must then free lost slots.
        self.on_slots: Callable[[], None] | None = None
        # Up to when (time.monotonic()) the change stream has told of every change to the
        # settings (StreamProgress.told_until); None: no stream to go by.
        self.told_until: Callable[[], float | None] = lambda: None

    def stale(self) -> None:
        """The settings changed (the stream said so), or may have: read them before the
        next claim."""
        self._read_at = None

    async def refresh(self) -> None:
        """Read the queues' settings (one find) if the last read is REFRESH seconds old,
        unless the change stream has told of every change up to less than REFRESH ago
        (then a change would have made them stale()), or if they are stale(). So a worker
        woken by the stream claims without a read, and one draining a backlog (which does
        not read the stream meanwhile) reads once every REFRESH."""
        now = time.monotonic()
        if self._read_at is not None:
            age = now - self._read_at
            told = self.told_until()
            if age < REFRESH or (
                told is not None and now - told < REFRESH and age < SAFETY_REFRESH
            ):
                return
        found = await self.table.all()
        self._read_at = time.monotonic()
        before = self.settings
        self.settings = {q.name: q for q in found if q.gated}
        limited = set(self.limited())
        for name in set(self._retry):
            # A back-off set under other settings (a token due at the old rate) is void.
            if name not in limited or _changed(before.get(name), self.settings[name]):
                del self._retry[name]
        if self.on_slots is not None and any(q.concurrency for q in self.settings.values()):
            self.on_slots()

    def excluded(self) -> list[str]:
        """The queues the plain claim leaves out: paused or limited."""
        return sorted(self.settings)

    def limited(self) -> list[str]:
        """The queues claimed through a token or a slot (not paused)."""
        return [n for n, q in self.settings.items() if q.limited and not q.paused]

    def retry_queues(self) -> list[str]:
        """Limited queues whose back-off is over: worth trying without a wake-up."""
        now = time.monotonic()
        return [name for name, (at, _) in self._retry.items() if at <= now]

    def retry_in(self) -> float | None:
        """Seconds until a limited queue is worth trying again (None: none waits)."""
        if not self._retry:
            return None
        return max(0.0, min(at for at, _ in self._retry.values()) - time.monotonic())

    def overdue(self) -> bool:
        """Whether limited queues have waited behind a backlog of others long enough."""
        return bool(self.limited()) and time.monotonic() - self._tried_at >= RECHECK

    async def claim_open(self) -> Task | None:
        """Claim a task of the first limited queue not backing off that has one due."""
        self._tried_at = time.monotonic()
        candidates = [name for name in self.limited() if name not in self._retry]
        if len(candidates) <= 1:
            return await self.claim(candidates[0]) if candidates else None
        # Several: one look-up finds a queue with a task due rather than a take, a claim and
        # a give-back for each queue with nothing due (which held up other queues' tasks).
        types = (*self.type_slots.unlimited, *self.type_slots.limits)
        while candidates:
            name = await self.claims.due_queue(candidates, types)
            if name is None or name not in candidates:
                return None
            task = await self.claim(name)
            if task is not None:
                return task
            candidates.remove(name)
        return None

    async def claim(self, name: str) -> Task | None:
        """Take a token of the queue's rate and a slot of its concurrency, then claim a task
        of it; a claim that finds nothing gives both back. After a task, the queue is tried
        again at once; without a token it waits until the bucket has one; full, it backs off;
        empty, it waits for a wake-up."""
        settings = self.settings.get(name)
        if settings is None or settings.paused or not settings.limited:
            self._retry.pop(name, None)
            return None
        lease = new_lease()
        next_token = 0.0  # seconds until the bucket holds a token again
        if settings.rate is not None:
            took = await self.table.take(name)
            if took is None:  # paused or rate cleared since: read the settings again
                self._read_at = None
                self._retry.pop(name, None)
                return None
            taken, next_token = took
            if not taken:
                self._retry[name] = (time.monotonic() + next_token + TOKEN_MARGIN, next_token)
                return None
        deadline = None  # the claim must land by then: bounded from the slot's take
        if settings.concurrency is not None:
            key = slot_key(name)
            limit = settings.concurrency
            deadline = time.monotonic() + self.claim_within
            if not await self.slot_table.take(
                key, limit=limit, lease=lease, worker_id=self.worker_id
            ):
                if settings.rate is not None:
                    await self.table.give_back(name)
                self._back_off(name)
                return None
            self._slotted[lease] = name
        task, typed_full = await self._claim_in(name, lease, deadline)
        if task is None:
            await self._give_back(name, lease, token=settings.rate is not None)
            if typed_full:
                # Its tasks of a limited type may be waiting for a slot of their type (or
                # the claim was too late to send): no wake-up would tell, so try again
                # after a back-off.
                self._back_off(name)
            else:
                self._retry.pop(name, None)
        else:
            # Tried again at once, or when the bucket next holds a token: no take is spent
            # on finding it empty.
            at = time.monotonic() + (next_token + TOKEN_MARGIN if next_token else 0.0)
            self._retry[name] = (at, FIRST_BACKOFF / 2)
        return task

    def _back_off(self, name: str) -> None:
        _, backoff = self._retry.get(name, (0.0, FIRST_BACKOFF / 2))
        backoff = min(backoff * 2, MAX_BACKOFF)
        self._retry[name] = (time.monotonic() + backoff, backoff)

    def _left(self, *deadlines: float | None) -> float:
        """A claim's bound: what is left until the earliest deadline (a slot's take plus
        claim_within: recovery frees a slot that old with no STARTED task, so a claim that
        lands later, after a freeze, could run one task over the limit); 0: too late."""
        until = min((d for d in deadlines if d is not None), default=None)
        if until is None:
            return self.claim_within
        return max(0.0, until - time.monotonic())

    async def _claim_in(
        self, name: str, lease: str, deadline: float | None
    ) -> tuple[Task | None, bool]:
        """Claim a task of queue `name` under `lease`, landing by `deadline` (if any): of a
        type without a per-type limit in one claim, else of each limited type under one of
        its slots (with the same lease); and whether to try again after a back-off (a
        limited type was left out for want of a slot, or the claim was too late)."""
        self._unconfirmed = (name, lease)
        task = None
        typed_full = len(self.type_slots.open_types()) < len(self.type_slots.limits)
        unlimited = self.type_slots.unlimited
        if unlimited:
            within = self._left(deadline)
            if within <= 0:
                self._unconfirmed = None
                return None, True
            task = await self.claims.claim(
                self.worker_id, lease=lease, types=unlimited, queue=name, within=within
            )
        for task_type in [] if task is not None else self.type_slots.open_types():
            limit = self.type_slots.limits[task_type]
            typed_deadline = time.monotonic() + self.claim_within
            if not await self.slot_table.take(
                task_type, limit=limit, lease=lease, worker_id=self.worker_id
            ):
                typed_full = True
                continue
            within = self._left(deadline, typed_deadline)
            if within <= 0:
                await self.slot_table.free(task_type, lease)
                typed_full = True
                break
            task = await self.claims.claim(
                self.worker_id,
                lease=lease,
                types=(task_type,),
                queue=name,
                within=within,
            )
            if task is not None:
                break
            await self.slot_table.free(task_type, lease)
        self._unconfirmed = None
        return task, typed_full

    async def _give_back(self, name: str, lease: str, *, token: bool) -> None:
        if self._slotted.pop(lease, None) is not None:
            await self.slot_table.free(slot_key(name), lease)
        if token:
            await self.table.give_back(name)

    async def confirm(self) -> Task | None:
        """The task of a claim whose reply was lost, if it landed; else its slot is freed
        (its token is lost: a rate only ever errs on the slow side)."""
        if self._unconfirmed is None:
            return None
        name, lease = self._unconfirmed
        task = await self.claims.claimed(lease)
        if task is None:
            await self._give_back(name, lease, token=False)
        self._unconfirmed = None
        return task

    def holds(self, task: Task) -> bool:
        """Whether `task` was claimed under a slot of its queue's concurrency."""
        return task.lease is not None and task.lease in self._slotted

    async def free(self, task: Task) -> None:
        """Give back the queue slot `task` was claimed under, once it has left STARTED; the
        queue is tried again at once."""
        if task.lease is None:
            return
        name = self._slotted.get(task.lease)
        if name is not None:
            await self.slot_table.free(slot_key(name), task.lease)
            del self._slotted[task.lease]
            if name in self.limited():
                self._retry[name] = (time.monotonic(), FIRST_BACKOFF / 2)


def _changed(before: QueueSettings | None, now: QueueSettings) -> bool:
    """Whether a queue's settings differ (its bucket's tokens aside)."""
    if before is None:
        return True
    return (before.rate, before.burst, before.concurrency) != (now.rate, now.burst, now.concurrency)
