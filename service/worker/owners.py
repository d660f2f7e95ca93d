"""Which worker tries an announced task first, so that a task created into N idle workers
costs one claim, not N.

Every listening worker hears of every new task. Each ranks the live workers with free
slots, as the registry lists them, by rendezvous (highest-random-weight) hashing of the
task's id and the worker's id: the first tries the task at once, the runner-up HANDOFF
seconds later, everyone else 2 x HANDOFF later, unless the change stream has said
meanwhile that the task was taken (its claim), in which case they never try. Every
worker computes the same ranks from the same list, without asking anyone: no look-up
per task. The list is read lazily, when an announcement comes and the one held is a
stale threshold old: an idle worker reads nothing, and a fleet of N workers, whatever the
rate of tasks, at most N reads per stale threshold.

A wrong guess costs time, never a task: the owner is busy (the registry's `running` is
at most a heartbeat old), frozen or dead (it stays listed until its record is stale), or
two workers' lists differ (a worker that just started or stopped): then the task starts
HANDOFF late (2 x HANDOFF if the runner-up is out too), or two workers try it at once and
one claim comes back empty. Either way the claim is the same single find_one_and_update
and the safety poll still looks for whatever waits.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

from service.errors import DatabaseUnavailable
from service.store.workers import WorkerRegistry, WorkerSeen
from service.worker import metrics

logger = logging.getLogger(__name__)

# How long the runner-up waits before trying a task its owner may not have claimed; the
# others wait twice as long. Long enough for the owner's claim to be announced back
# (a few ms), short enough that a frozen or dead owner costs a task little.
HANDOFF = 0.15
# The registry's list is read again, when next needed, after this share of the stale
# threshold (12 s by default: as long as a dead worker is listed alive anyway).
REFRESH_SHARE = 1.0


def weight(worker_id: str, task_id: str) -> int:
    """The worker's rendezvous weight for a task: the same in every process."""
    digest = hashlib.blake2b(f"{worker_id}\0{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(me: str, task_id: str, candidates: Sequence[str]) -> int:
    """Where `me` comes among `candidates` for `task_id` (0: first); len(candidates) when
    not among them."""
    if me not in candidates:
        return len(candidates)
    mine = weight(me, task_id)
    return sum(1 for other in candidates if other != me and weight(other, task_id) > mine)


class Owners:
    """The live workers with free slots, as last read from the registry, and how long
    this worker waits before trying an announced task."""

    def __init__(self, workers: WorkerRegistry, *, worker_id: str, stale_after: float) -> None:
        self.workers = workers
        self.worker_id = worker_id
        self.stale_after = stale_after
        self.refresh_every = stale_after * REFRESH_SHARE
        self._seen: list[WorkerSeen] = []
        self._read_at: float | None = None  # time.monotonic()

    async def refresh(self) -> None:
        """Read the registry if the list held is old (one find); keep the old list if the
        database does not answer (an empty one: every worker tries every task at once)."""
        now = time.monotonic()
        if self._read_at is not None and now - self._read_at < self.refresh_every:
            return
        self._read_at = now
        try:
            self._seen = [w for w in await self.workers.seen(self.stale_after) if w.alive]
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.inc()
            logger.info("workers' registry not read (%s); the list held stays", exc)

    def delay(self, task_id: str, task_type: str | None) -> float:
        """Seconds after it is due that this worker tries the task: 0 when it is the first
        (or nobody is known), HANDOFF for the runner-up, 2 x HANDOFF for the others."""
        candidates = [
            w.id
            for w in self._seen
            if (w.concurrency is None or w.running < w.concurrency)
            and (task_type is None or task_type in w.types)
        ]
        if not candidates:
            return 0.0
        return HANDOFF * min(2, rank(self.worker_id, task_id, candidates))
