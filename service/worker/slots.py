"""A worker's side of the global per-type concurrency limits (TASK_RUNNER_TYPE_LIMITS).

Before claiming a task of a limited type the worker takes one of the type's slots with the
lease it will claim with (one atomic update of the type's document in `limits`), and gives
the slot back once the task has left STARTED. A type whose slots are all held is left out
of this worker's claims for a short back-off that doubles up to MAX_BACKOFF while it stays
full, so a task waiting for a slot never stops other types from being claimed. A slot this
worker gives back is retried at once: the next task of the type is claimed right away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from service.models import Task
from service.store import new_lease
from service.store.claims import Claims
from service.store.slots import SlotTable

if TYPE_CHECKING:
    from service.worker.queues import QueueGate

logger = logging.getLogger(__name__)

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 1.0
# While claims of unlimited types keep succeeding (a backlog), the limited types are tried
# first once they have not been tried for this long: a due task of a limited type waits at
# most this long behind other types, for at most a take, a claim and a give-back a second.
RECHECK = 1.0


class Slots:
    """The limits of the types this worker runs, and when each full type is tried again."""

    def __init__(
        self,
        table: SlotTable,
        claims: Claims,
        *,
        limits: Mapping[str, int],
        types: Iterable[str],
        worker_id: str,
        claim_within: float,
    ) -> None:
        self.table = table
        self.claims = claims
        own = set(types)
        self.limits = {name: n for name, n in limits.items() if name in own}
        self.unlimited = tuple(t for t in types if t not in self.limits)
        self.worker_id = worker_id
        self.claim_within = claim_within
        # Full types: (monotonic time to try again, the back-off that led there).
        self._full: dict[str, tuple[float, float]] = {}
        self._unconfirmed: tuple[str, str] | None = None
        self._tried_at = time.monotonic()
        # The queues' side (the worker sets it): claims here leave out paused and limited
        # queues, and a task may hold a slot of its queue too.
        self.queues: QueueGate | None = None

    def limited(self, task_type: str) -> bool:
        """Whether tasks of this type need a slot."""
        return task_type in self.limits

    def holds(self, task: Task) -> bool:
        """Whether `task` holds a slot (of its type, or of its queue) to give back."""
        return self.limited(task.type) or (self.queues is not None and self.queues.holds(task))

    def open_types(self) -> list[str]:
        """Limited types not known to be full: a claim round tries them."""
        return [t for t in self.limits if t not in self._full]

    def overdue(self) -> bool:
        """Whether the limited types have waited behind the others long enough to go first."""
        return bool(self.limits) and time.monotonic() - self._tried_at >= RECHECK

    async def claim_open(self) -> Task | None:
        """Claim a task of the first limited type not known to be full that has one due."""
        self._tried_at = time.monotonic()
        for task_type in self.open_types():
            task = await self.claim(task_type)
            if task is not None:
                return task
        return None

    def retry_types(self) -> list[str]:
        """Full types whose back-off is over: worth trying without a wake-up."""
        now = time.monotonic()
        return [t for t, (at, _) in self._full.items() if at <= now]

    def retry_in(self) -> float | None:
        """Seconds until a full type is worth trying again (None: none is full)."""
        if not self._full:
            return None
        return max(0.0, min(at for at, _ in self._full.values()) - time.monotonic())

    async def claim(self, task_type: str) -> Task | None:
        """Take a slot of `task_type`, then claim a task of it under the slot's lease.

        No slot: the type backs off. A slot but nothing due: the slot is given back and the
        type is no longer tried until a wake-up says a task of it may be due.
        """
        lease = new_lease()
        # The claim must land within claim_within of the take (recovery frees a slot that
        # old with no STARTED task): a worker frozen in between does not send it.
        deadline = time.monotonic() + self.claim_within
        taken = await self.table.take(
            task_type, limit=self.limits[task_type], lease=lease, worker_id=self.worker_id
        )
        if not taken:
            _, backoff = self._full.get(task_type, (0.0, FIRST_BACKOFF / 2))
            backoff = min(backoff * 2, MAX_BACKOFF)
            self._full[task_type] = (time.monotonic() + backoff, backoff)
            return None
        within = deadline - time.monotonic()
        if within <= 0:
            await self.table.free(task_type, lease)
            self._full[task_type] = (time.monotonic() + FIRST_BACKOFF, FIRST_BACKOFF)
            return None
        # A claim whose reply is lost may have landed: confirm() asks before the next claim.
        self._unconfirmed = (task_type, lease)
        task = await self.claims.claim(
            self.worker_id,
            lease=lease,
            types=(task_type,),
            within=within,
            exclude=self.queues.excluded() if self.queues is not None else (),
        )
        self._unconfirmed = None
        self._full.pop(task_type, None)
        if task is None:
            await self.table.free(task_type, lease)
        return task

    async def confirm(self) -> Task | None:
        """The task of a claim whose reply was lost, if it landed; else its slot is freed."""
        if self._unconfirmed is None:
            return None
        task_type, lease = self._unconfirmed
        task = await self.claims.claimed(lease)
        if task is None:
            await self.table.free(task_type, lease)
        self._unconfirmed = None
        return task

    async def free(self, task: Task) -> None:
        """Give back the slot `task` was claimed under, once it has left STARTED (or is no
        longer ours); its type (and queue) is tried again at once."""
        if task.type in self.limits and task.lease is not None:
            await self.table.free(task.type, task.lease)
            self._full[task.type] = (time.monotonic(), FIRST_BACKOFF / 2)
        if self.queues is not None:
            await self.queues.free(task)
