"""Claiming, fencing and recovery.

Each state change is one conditional update. Every write a worker makes after claiming a
task is fenced on `{_id, lease}`: if the task was recovered, re-claimed or deleted in
the meantime, the write matches nothing and the caller is told so."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo
from pymongo import ReturnDocument, UpdateOne

from service.models import DEFAULT_QUEUE, CallbackState, State, Task
from service.store.base import (
    CLAIM_SORT,
    TIME_SORT,
    Database,
    DocCollection,
    id_filter,
    in_queue,
    stale_filter,
    storable,
    type_names,
    unavailable,
)

logger = logging.getLogger(__name__)

WORKER_LOST = "worker lost: no heartbeat within the stale threshold"


def claimable(
    types: Collection[str] | None,
    *,
    due_by: datetime,
    queue: str | None = None,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """The claim's filter: due, and of a type the worker runs (None: any type); of `queue`
    only, or else of no queue in `exclude` (paused or limited queues; none: any queue)."""
    query: dict[str, Any] = {"state": State.NOTSTARTED.value, "run_at": {"$lte": due_by}}
    if types is not None:
        query["type"] = {"$in": type_names(types)}
    if queue is not None:
        query.update(in_queue(queue))
    elif exclude:
        # A document without `queue` is in the default queue: null stands for it.
        names: list[str | None] = [*sorted(exclude)]
        if DEFAULT_QUEUE in exclude:
            names.append(None)
        query["queue"] = {"$nin": names}
    return query


def claim_update(worker_id: str, lease: str) -> list[dict[str, Any]]:
    """The claim's update, a pipeline: STARTED under a new lease, times stamped by the
    server's own clock (what staleness is judged on), one more attempt. An `attempts` of
    another type (written by hand) counts as 0 rather than failing the claim, as `$inc`
    would: the filter need not rule such documents out, which would cost it the index."""
    counted = {"$cond": [{"$isNumber": "$attempts"}, "$attempts", 0]}
    return [
        {
            "$set": {
                "state": State.STARTED.value,
                "lease": lease,
                "worker": worker_id,
                "started_at": "$$NOW",
                "heartbeat_at": "$$NOW",
                "attempts": {"$add": [counted, 1]},
            }
        }
    ]


def _fence(task: Task) -> dict[str, Any]:
    """The filter of every write under a claim: this task, still STARTED under our lease."""
    return {"_id": task.key, "lease": task.lease, "state": State.STARTED.value}


def pending_callback(now: datetime | str) -> dict[str, Any]:
    """A callback to deliver from `now` on (a date, or "$$NOW" in a pipeline): the outbox
    entry a task's final write carries (see service.store.callbacks)."""
    return {"state": CallbackState.PENDING.value, "attempts": 0, "next_at": now}


@dataclass(frozen=True)
class Finish:
    """A task's result as one fenced write: the update, and the state it leads to (where a
    write that landed shows its lease)."""

    task: Task
    update: dict[str, Any]
    state: State


class Claims:
    """A worker's claim on a task and every write it makes under that claim, fenced
    on the lease; recovery of claims whose worker went silent."""

    def __init__(self, db: Database, *, claim_tasks: DocCollection | None = None) -> None:
        self.tasks = db.tasks
        # The claim's own handle on the tasks: a worker's is on a client without retryable
        # writes. The driver's automatic retry of a claim whose reply was lost is not
        # idempotent where the server forgets its retryable-write records (SecantusDB keeps
        # them in memory: after a restart the retry runs again and claims a second task
        # under the same lease, the first left STARTED and never run until recovery). The
        # claimer asks claimed(lease) itself after a failed claim instead.
        self.claim_tasks = db.tasks if claim_tasks is None else claim_tasks
        self.clock = db.clock

    @unavailable
    async def claim(
        self,
        worker_id: str,
        *,
        lease: str,
        types: Collection[str] | None = None,
        within: float | None = None,
        queue: str | None = None,
        exclude: Collection[str] = (),
    ) -> Task | None:
        """Atomically take the next due task of one of `types`: one find_one_and_update.

        The caller picks the lease, so that if the reply is lost it can ask with
        `claimed(lease)` whether the claim landed. Only the types the caller can run are
        taken (None: any type): in a rolling upgrade, an older worker leaves a newer type to
        newer workers.
        `types=None` leaves the type out of the filter, for a caller that knows every
        waiting task is of a type it runs (see Claimer.claims_any_type: SecantusDB uses the claim
        index only for a filter of equalities and one range). `within` bounds the call (a
        claim under a slot must land while the slot is young).
        `queue`: a task of that queue only; else none of the queues in `exclude`.
        """
        with pymongo.timeout(within):
            doc = await self.claim_tasks.find_one_and_update(
                claimable(types, due_by=self.clock.surely_now(), queue=queue, exclude=exclude),
                claim_update(worker_id, lease),
                sort=CLAIM_SORT,
                return_document=ReturnDocument.AFTER,
            )
        return None if doc is None else Task.from_document(doc)

    @unavailable
    async def due_queue(self, queues: Collection[str], types: Collection[str]) -> str | None:
        """One of `queues` that has a task of `types` due now, or None: one find (the
        claim index with `queue` first serves it on MongoDB)."""
        names: list[str | None] = [*sorted(queues)]
        if DEFAULT_QUEUE in queues:
            names.append(None)
        query = claimable(types, due_by=self.clock.surely_now())
        query["queue"] = {"$in": names}
        doc = await self.tasks.find_one(query, projection={"queue": 1, "_id": 0})
        if doc is None:
            return None
        queue = doc.get("queue")
        return queue if isinstance(queue, str) else DEFAULT_QUEUE

    @unavailable
    async def give_back(self, task: Task) -> bool:
        """Undo a claim of a task this worker cannot run (a type it does not have): back to
        NOTSTARTED as it was, the attempt not counted, no lease or worker left on it."""
        fence = _fence(task)
        update = {
            "$set": {"state": State.NOTSTARTED.value},
            "$inc": {"attempts": -1},
            "$unset": {"lease": "", "worker": "", "heartbeat_at": "", "started_at": ""},
        }
        result = await self.tasks.update_one(fence, update)
        return result.modified_count == 1

    @unavailable
    async def claimed(self, lease: str) -> Task | None:
        """The task a claim with this lease took, if it landed and still holds."""
        doc = await self.tasks.find_one({"lease": lease, "state": State.STARTED.value})
        return None if doc is None else Task.from_document(doc)

    @unavailable
    async def heartbeat(self, leases: Iterable[str]) -> set[str]:
        """Refresh every listed lease in one write; return the leases that are gone."""
        leases = set(leases)
        if not leases:
            return set()
        fence = {"state": State.STARTED.value, "lease": {"$in": list(leases)}}
        result = await self.tasks.update_many(fence, {"$currentDate": {"heartbeat_at": True}})
        if result.matched_count == len(leases):
            return set()
        alive = {doc["lease"] async for doc in self.tasks.find(fence, projection={"lease": True})}
        return leases - alive

    def completion(self, task: Task, output: str) -> Finish:
        """The write that marks the task COMPLETE with `output` (and its callback pending)."""
        update = {
            "$set": {
                "state": State.COMPLETE.value,
                "output": storable(output),
                **self._callback(task),
            },
            "$currentDate": {"finished_at": True},
        }
        return Finish(task, update, State.COMPLETE)

    def _callback(self, task: Task) -> dict[str, Any]:
        """What a final write sets for the task's callback: a pending delivery (the outbox
        entry, written with the final state) when the task has a callback_url."""
        if task.callback_url is None:
            return {}
        return {"callback": pending_callback(self.clock.surely_now())}

    def failure(self, task: Task, error: str, *, retry_at: datetime | None) -> Finish:
        """The write that records a failed attempt: back to NOTSTARTED at `retry_at`, or
        FAILED if None."""
        now = self.clock.now()
        error = storable(error)
        entry = {"attempt": task.attempts, "error": error, "at": now, "worker": task.worker}
        if retry_at is None:
            state = State.FAILED
            update: dict[str, Any] = {
                "$set": {"state": state.value, **self._callback(task)},
                "$currentDate": {"finished_at": True},
            }
        else:
            state = State.NOTSTARTED
            update = {
                "$set": {"state": state.value, "run_at": retry_at},
                "$unset": {"worker": "", "heartbeat_at": ""},
            }
        update["$set"]["error"] = error
        if "errors" in task.malformed:
            update["$set"]["errors"] = [entry]  # what was there is not a list to push onto
        else:
            update["$push"] = {"errors": entry}
        return Finish(task, update, state)

    @unavailable
    async def complete(self, task: Task, output: str) -> bool:
        """Mark COMPLETE; False if the lease was lost (the result is then dropped)."""
        finish = self.completion(task, output)
        return await self._fenced(task, finish.update, finish.state)

    @unavailable
    async def fail(self, task: Task, error: str, *, retry_at: datetime | None) -> bool:
        """Record a failed attempt: back to NOTSTARTED at `retry_at`, or FAILED if None."""
        finish = self.failure(task, error, retry_at=retry_at)
        return await self._fenced(task, finish.update, finish.state)

    @unavailable
    async def finish_many(self, finishes: Sequence[Finish]) -> list[bool]:
        """Write several results in one bulk_write of fenced updates (unordered); for each,
        whether it landed (False: its lease was lost and the result dropped).

        When fewer than all were modified, one read of the batch's ids tells which: a write
        landed if its lease is on the document in its target state (see _fenced), which
        also counts the writes of an earlier try of this batch whose reply was lost.
        """
        if not finishes:
            return []
        ops = [UpdateOne(_fence(f.task), f.update) for f in finishes]
        result = await self.tasks.bulk_write(ops, ordered=False)
        if result.modified_count == len(finishes):
            return [True] * len(finishes)
        keys = [f.task.key for f in finishes]
        cursor = self.tasks.find({"_id": {"$in": keys}}, projection={"lease": 1, "state": 1})
        # Leases are unique to a claim; a document of another shape may hold anything.
        states = {
            lease: doc.get("state")
            async for doc in cursor
            if isinstance(lease := doc.get("lease"), str)
        }
        return [states.get(f.task.lease or "") == f.state.value for f in finishes]

    @unavailable
    async def release(self, task: Task) -> bool:
        """Give a task back unrun (graceful shutdown); the attempt does not count."""
        update = {
            "$set": {"state": State.NOTSTARTED.value},
            "$inc": {"attempts": -1},
            "$unset": {"worker": "", "heartbeat_at": "", "started_at": ""},
        }
        return await self._fenced(task, update, State.NOTSTARTED)

    async def _fenced(self, task: Task, update: dict[str, Any], state: State) -> bool:
        """Apply `update` only while this claim's lease holds the task STARTED.

        The lease stays on the document, so when a write is retried after its reply was lost
        (a database outage), finding our lease already in the target state shows it landed.
        Nobody else can put our lease there: recovery removes it, a new claim replaces it.
        """
        result = await self.tasks.update_one(_fence(task), update)
        if result.modified_count == 1:
            return True
        landed = {"_id": task.key, "lease": task.lease, "state": state.value}
        return await self.tasks.count_documents(landed, limit=1) == 1

    @unavailable
    async def find_stale(self, stale_after: float) -> list[Task]:
        """STARTED tasks whose worker has not been heard from within `stale_after` seconds."""
        cursor = self.tasks.find(stale_filter(self.clock, stale_after)).sort(TIME_SORT)
        return [Task.from_document(doc) async for doc in cursor]

    @unavailable
    async def recover_stale(
        self, stale_after: float, *, only: Iterable[str] | None = None, within: float | None = None
    ) -> int:
        """Stale tasks back to NOTSTARTED, or FAILED when their attempts are used up.

        One conditional update: safe to run from every worker and the ops CLI at once.
        Removing the lease fences off the lost worker even before anyone re-claims.
        `within` bounds the call (client-side timeout): a recovery decided just before a
        database outage must not land after it, when every heartbeat looks old.
        """
        query = stale_filter(self.clock, stale_after)
        if only is not None:
            query["_id"] = {"$in": [key for i in only for key in id_filter(i)["_id"]["$in"]]}
        # The server's own time of the recovery (what the stale cutoff was judged against),
        # not this process's estimate of it.
        now = "$$NOW"
        exhausted = {"$gte": ["$attempts", "$max_attempts"]}
        is_list = {"$isArray": "$errors"}  # a document of another shape must not fail this
        lost = {"attempt": "$attempts", "error": WORKER_LOST, "at": now, "worker": "$worker"}
        # A task that ends FAILED here with a callback_url gets its pending callback in the
        # same write (a STARTED task has none yet: a requeue removes the last one).
        calls_back = {"$and": [exhausted, {"$eq": [{"$type": "$callback_url"}, "string"]}]}
        pipeline: list[dict[str, Any]] = [
            {
                "$set": {
                    "state": {"$cond": [exhausted, State.FAILED.value, State.NOTSTARTED.value]},
                    "finished_at": {"$cond": [exhausted, now, "$$REMOVE"]},
                    "callback": {"$cond": [calls_back, pending_callback(now), "$$REMOVE"]},
                    "error": WORKER_LOST,
                    "errors": {"$concatArrays": [{"$cond": [is_list, "$errors", []]}, [lost]]},
                }
            },
            {"$unset": ["lease", "worker", "heartbeat_at"]},
        ]
        with pymongo.timeout(within):
            result = await self.tasks.update_many(query, pipeline)
        return result.modified_count
