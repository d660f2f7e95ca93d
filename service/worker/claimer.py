"""What one claim round of a worker tries, and how long it waits when nothing is due."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.models import Task
from service.store import new_lease
from service.store.claims import Claims
from service.worker.queues import QueueGate
from service.worker.slots import Slots
from service.worker.wakeups import WakeUps

logger = logging.getLogger(__name__)

# After a task of a type this worker does not run was claimed and given back, claims list
# this worker's types for this long before trying without again.
NAME_TYPES_FOR = 300


class Claimer:
    """Claims the next task for a worker that runs `types`: a claim whose reply was lost
    first, then the limited types through `slots` and the others in one claim, as the
    wake-ups say something is due."""

    def __init__(
        self,
        claims: Claims,
        *,
        slots: Slots,
        queues: QueueGate,
        wakeups: WakeUps,
        worker_id: str,
        types: tuple[str, ...],
    ) -> None:
        self.claims = claims
        self.slots = slots
        self.queues = queues
        self.wakeups = wakeups
        self.worker_id = worker_id
        self.types = types
        self._unconfirmed_lease: str | None = None
        self._name_types_until = 0.0  # time.monotonic(): until then claims list our types

    async def claim_round(self) -> tuple[Task | None, bool]:
        """One try: (the task claimed or None, whether every type was looked at).

        A limited type whose back-off is over is tried first, without a wake-up (a slot
        freed by another worker is announced to nobody). Otherwise, when the wake-ups say
        something is due, the unlimited types are claimed in one claim as ever, then each
        limited type not known to be full under a slot of its own; the limited types go
        first when a backlog of the others has kept them waiting (Slots.overdue). Limited
        queues are tried alike (QueueGate), and every claim leaves out paused and limited
        queues, as settings read at most a second before say (QueueGate.refresh).
        """
        task = await self.slots.confirm() or await self.queues.confirm()
        if task is not None:
            logger.info("task %s: claim confirmed after reconnecting", task.id)
            return task, False
        task = await self._retry()
        if task is not None:
            return task, False
        if not self.wakeups.due() or await self.wakeups.nothing_due():
            return None, False
        await self.queues.refresh()
        first = self.slots.overdue()
        queues_first = self.queues.overdue()
        task = await self.slots.claim_open() if first else None
        if task is None and queues_first:
            task = await self.queues.claim_open()
        if task is None and self.slots.unlimited:
            task = await self._claim()
        if task is None and not first:
            task = await self.slots.claim_open()
        if task is None and not queues_first:
            task = await self.queues.claim_open()
        return task, task is None

    async def _retry(self) -> Task | None:
        """Full types and limited queues whose back-off is over, without a wake-up."""
        types, queues = self.slots.retry_types(), self.queues.retry_queues()
        if types or queues:
            await self.queues.refresh()
        for task_type in types:
            task = await self.slots.claim(task_type)
            if task is not None:
                return task
        for name in queues:
            task = await self.queues.claim(name)
            if task is not None:
                return task
        return None

    async def wait(self) -> None:
        """Wait for the wake-ups, or until a full limited type (or a limited queue) is worth
        trying again."""
        waits = [s for s in (self.slots.retry_in(), self.queues.retry_in()) if s is not None]
        seconds = min(waits) if waits else None
        if seconds is None:
            await self.wakeups.wait(free=True)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wakeups.wait(free=True)

    def claims_any_type(self) -> bool:
        """Whether a claim may leave the type out of its filter: no limited type to keep
        out, and no task of another type seen waiting lately."""
        # On MongoDB naming the types costs a claim nothing; SecantusDB uses the claim index
        # only for a filter of equalities and one range, and scans the collection for more.
        every_type = len(self.slots.unlimited) == len(self.types)
        return every_type and time.monotonic() >= self._name_types_until

    async def _claim(self) -> Task | None:
        # A claim whose reply was lost (the database went away mid-call) may have landed:
        # ask for its lease before claiming anew, or the task would sit STARTED, held by
        # nobody, until recovery.
        if self._unconfirmed_lease is not None:
            task = await self.claims.claimed(self._unconfirmed_lease)
            self._unconfirmed_lease = None
            if task is not None:
                logger.info("task %s: claim confirmed after reconnecting", task.id)
                return task
        open_claim = self.claims_any_type()
        types = None if open_claim else self.slots.unlimited
        task = await self._claim_as(types)
        if task is not None and open_claim and task.type not in self.types:
            # A type this worker does not run (a newer version's, or none at all): give it
            # back untouched for the workers that do, and name our types from now on.
            given = await self.claims.give_back(task)
            self._name_types_until = time.monotonic() + NAME_TYPES_FOR
            logger.info(
                "task %s is of type %r, which this worker does not run: %s; claims name "
                "this worker's types for %ds",
                task.id,
                task.type,
                "given back" if given else "already taken back",
                NAME_TYPES_FOR,
            )
            task = await self._claim_as(self.slots.unlimited)
        return task

    async def _claim_as(self, types: tuple[str, ...] | None) -> Task | None:
        lease = new_lease()
        self._unconfirmed_lease = lease
        excluded = self.queues.excluded()
        task = await self.claims.claim(self.worker_id, lease=lease, types=types, exclude=excluded)
        self._unconfirmed_lease = None
        return task
