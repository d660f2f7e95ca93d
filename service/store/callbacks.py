"""Completion callbacks: the outbox on each finished task that has a `callback_url`.

A task's final write (COMPLETE or FAILED: Claims.completion, Claims.failure, recovery) sets
`callback: {state: PENDING, attempts: 0, next_at}` in the same update as the state, so a
finished task's callback cannot be lost between the two. A worker takes a due one with one
find_one_and_update that leases it (a fresh `callback.lease`, `callback.next_at` moved past
the time a delivery may take): if that worker dies, the lease runs out and another worker
takes it. Every later write is fenced on the lease, as a claim's are.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo import ASCENDING, ReturnDocument

from service.models import CallbackState, Task
from service.store.base import Database, storable, unavailable

PENDING = CallbackState.PENDING.value
# Serves the take: equality on the state, then the time order. Sparse: only tasks that have
# a callback are in it, so it costs nothing to tasks without one.
CALLBACK_INDEX = [("callback.state", ASCENDING), ("callback.next_at", ASCENDING)]
CALLBACK_SORT = [("callback.next_at", ASCENDING)]


class Outbox:
    """Taking due callbacks under a lease, and recording how each delivery went."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.clock = db.clock

    @unavailable
    async def ensure_indexes(self) -> None:
        """The sparse index the take reads."""
        await self.tasks.create_index(CALLBACK_INDEX, name="callbacks", sparse=True)

    @unavailable
    async def take(self, lease: str, *, hold: float) -> Task | None:
        """The next due pending callback's task, leased to `lease` for `hold` seconds (after
        which another worker may take it) and its attempt counted; None when none is due."""
        now = self.clock.surely_now()
        doc = await self.tasks.find_one_and_update(
            {"callback.state": PENDING, "callback.next_at": {"$lte": now}},
            {
                "$set": {
                    "callback.lease": lease,
                    "callback.next_at": self.clock.now() + timedelta(seconds=hold),
                },
                "$inc": {"callback.attempts": 1},
            },
            sort=CALLBACK_SORT,
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else Task.from_document(doc)

    @unavailable
    async def delivered(self, task: Task, lease: str) -> bool:
        """The callback was answered 2xx; False if the lease was lost meanwhile."""
        result = await self.tasks.update_one(
            _fence(task, lease),
            {
                "$set": {"callback.state": CallbackState.DELIVERED.value},
                "$currentDate": {"callback.delivered_at": True},
                "$unset": {"callback.lease": "", "callback.next_at": ""},
            },
        )
        return result.modified_count == 1

    @unavailable
    async def failed(
        self, task: Task, lease: str, *, error: str, retry_at: datetime | None
    ) -> bool:
        """A delivery failed with `error`: pending again from `retry_at`, or FAILED for good
        when None. False if the lease was lost meanwhile."""
        update: dict[str, dict[str, object]] = {
            "$set": {"callback.last_error": storable(error)},
            "$unset": {"callback.lease": ""},
        }
        if retry_at is None:
            update["$set"]["callback.state"] = CallbackState.FAILED.value
            update["$unset"]["callback.next_at"] = ""
        else:
            update["$set"]["callback.next_at"] = retry_at
        result = await self.tasks.update_one(_fence(task, lease), update)
        return result.modified_count == 1

    @unavailable
    async def earliest(self) -> datetime | None:
        """When the earliest pending callback is due (None: none is pending)."""
        doc = await self.tasks.find_one(
            {"callback.state": PENDING},
            projection={"callback.next_at": True},
            sort=CALLBACK_SORT,
        )
        if doc is None:
            return None
        task = Task.from_document({"callback": doc.get("callback")})
        return None if task.callback is None else task.callback.next_at


def _fence(task: Task, lease: str) -> dict[str, object]:
    return {"_id": task.key, "callback.lease": lease, "callback.state": PENDING}
