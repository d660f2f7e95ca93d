"""Queues: their settings (rate, burst, concurrency, paused), the rate's token bucket, and
their tasks counted by state.

One document per queue with settings, `_id` its name: {rate, burst, concurrency, paused,
tokens, refilled_ms}. A queue needs no creating: one without a document has no settings. The
token bucket lives in the document and is taken with one atomic pipeline update that
refills it from the database's own clock (`$$NOW`): nothing is held in memory, nothing
needs recovering after a crash. A queue's concurrency slots are per-type limits' slots
(SlotTable), under the key `queue:<name>` in `limits`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from pymongo import ReturnDocument

from service.models import DEFAULT_QUEUE
from service.store.base import Database, in_queue, label, unavailable

logger = logging.getLogger(__name__)

# What PUT /queues/{name} may set; None clears rate or concurrency.
SETTINGS = ("rate", "burst", "concurrency", "paused")
# A queue's concurrency slots in `limits`: a key no task type has (types have no ':').
SLOT_PREFIX = "queue:"
BUCKET = {"tokens": 1, "rate": 1, "burst": 1, "taken": 1}


def slot_key(queue: str) -> str:
    """The key of a queue's concurrency slots in the slot table."""
    return SLOT_PREFIX + queue


@dataclass(frozen=True)
class QueueSettings:
    """A queue's stored settings, read defensively: a value of another shape is no setting."""

    name: str
    rate: float | None = None  # tasks a second
    burst: int = 1
    concurrency: int | None = None
    paused: bool = False
    tokens: float | None = None  # the bucket as last taken from (for operators)

    @property
    def limited(self) -> bool:
        """Whether its tasks are claimed through a token or a slot."""
        return self.rate is not None or self.concurrency is not None

    @property
    def gated(self) -> bool:
        """Whether the plain claim leaves its tasks out (paused, or limited)."""
        return self.paused or self.limited

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> QueueSettings:
        """Read a stored queue document of any shape; never raises."""
        rate = doc.get("rate")
        burst = doc.get("burst")
        concurrency = doc.get("concurrency")
        tokens = doc.get("tokens")
        return cls(
            name=label(doc.get("_id")),
            rate=float(rate) if _number(rate) and rate > 0 else None,
            burst=int(burst) if _whole(burst) and burst >= 1 else 1,
            concurrency=int(concurrency) if _whole(concurrency) and concurrency >= 1 else None,
            paused=doc.get("paused") is True,
            tokens=float(tokens) if _number(tokens) else None,
        )


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> TypeGuard[float]:
    return _number(value) and value == int(value)


def _number_or(
    field: str, default: Any, *, least: float | None = None, whole: bool = False
) -> dict[str, Any]:
    """A stored field as a number when it is one (and at least `least`; `whole`: a finite
    whole number), else `default`: a document of another shape (written by hand) must not
    fail the update."""
    fits: list[Any] = [{"$isNumber": f"${field}"}]
    if least is not None:
        fits.append({"$gte": [f"${field}", least]})
    if whole:
        fits.append({"$lt": [f"${field}", math.inf]})
        fits.append({"$eq": [{"$floor": f"${field}"}, f"${field}"]})
    return {"$cond": [{"$and": fits}, f"${field}", default]}


# As QueueSettings reads it: an infinite or fractional burst is none (1), not a bucket
# that fills without bound.
BURST = _number_or("burst", 1, least=1, whole=True)


def take_pipeline() -> list[dict[str, Any]]:
    """The token take as one pipeline update: refill from the time elapsed on the database's
    clock since the last refill (up to `burst`), then take one if a whole one is there.
    `taken` says whether this update took one."""
    # Milliseconds since the epoch on the database's clock. Stored as a number, not a date:
    # SecantusDB fails to subtract a stored date from $$NOW (it can subtract numbers).
    now = {"$toLong": "$$NOW"}
    # A new bucket starts full; so does one whose tokens no take could have left (negative,
    # NaN, minus infinity: written by hand), which would otherwise never refill.
    tokens = _number_or("tokens", BURST, least=0)
    elapsed = {"$divide": [{"$subtract": [now, _number_or("refilled_ms", now)]}, 1000]}
    refilled = {"$add": [tokens, {"$multiply": [{"$max": [elapsed, 0]}, "$rate"]}]}
    whole = {"$gte": ["$tokens", 1]}
    return [
        {"$set": {"tokens": {"$min": [BURST, refilled]}, "refilled_ms": now}},
        {
            "$set": {
                "taken": whole,
                "tokens": {"$cond": [whole, {"$subtract": ["$tokens", 1]}, "$tokens"]},
            }
        },
    ]


class QueueTable:
    """The queues' settings and token buckets, and their tasks' counts."""

    def __init__(self, db: Database) -> None:
        self.queues = db.queues
        self.tasks = db.tasks
        self.limits = db.limits

    @unavailable
    async def all(self) -> list[QueueSettings]:
        """Every queue with settings (a handful of small documents), by name; a document
        whose _id is not a string (written by hand) names no queue and is left out."""
        docs = [
            doc
            async for doc in self.queues.find({}, projection={"refilled_ms": 0})
            if isinstance(doc.get("_id"), str)
        ]
        return sorted((QueueSettings.from_document(d) for d in docs), key=lambda q: q.name)

    @unavailable
    async def get(self, name: str) -> QueueSettings | None:
        """The queue's settings, or None when it has none."""
        doc = await self.queues.find_one({"_id": name})
        return None if doc is None else QueueSettings.from_document(doc)

    @unavailable
    async def put(self, name: str, changes: Mapping[str, Any]) -> QueueSettings:
        """Change some of the queue's settings (None clears one) in one upsert; the result."""
        unknown = set(changes) - set(SETTINGS)
        if unknown or not changes:
            raise ValueError(f"changes must be some of {SETTINGS}, not {sorted(unknown)}")
        sets = {k: v for k, v in changes.items() if v is not None}
        unsets = {k: "" for k, v in changes.items() if v is None}
        update: dict[str, Any] = {}
        if sets:
            update["$set"] = sets
        if unsets:
            update["$unset"] = unsets
        doc = await self.queues.find_one_and_update(
            {"_id": name}, update, upsert=True, return_document=ReturnDocument.AFTER
        )
        return QueueSettings.from_document(doc or {"_id": name})

    @unavailable
    async def delete(self, name: str) -> bool:
        """Remove the queue's settings (its tasks stay, in a queue without settings); False
        when it had none. Its slots' document goes too if no task holds a slot: running
        tasks give theirs back as usual, into a document the next take would recreate."""
        deleted = await self.queues.delete_one({"_id": name})
        if deleted.deleted_count == 0:
            return False
        unheld = {"$or": [{"holders": {"$size": 0}}, {"holders": {"$exists": False}}]}
        await self.limits.delete_one({"_id": slot_key(name), **unheld})
        return True

    @unavailable
    async def take(self, name: str) -> tuple[bool, float] | None:
        """Take one token of the queue's rate in one update: (whether one was taken, the
        seconds until the bucket holds a whole token again); None if the queue has no rate
        now or is paused."""
        doc = await self.queues.find_one_and_update(
            {"_id": name, "rate": {"$gt": 0}, "paused": {"$ne": True}},
            take_pipeline(),
            projection=BUCKET,
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        rate, tokens = doc.get("rate"), doc.get("tokens")
        if not (_number(rate) and _number(tokens)):
            return None
        return doc.get("taken") is True, max(0.0, (1 - float(tokens)) / float(rate))

    @unavailable
    async def give_back(self, name: str) -> None:
        """Return a token a claim did not use (up to `burst`): one update."""
        await self.queues.update_one(
            {"_id": name, "tokens": {"$type": "number"}},
            [{"$set": {"tokens": {"$min": [BURST, {"$add": ["$tokens", 1]}]}}}],
        )

    @unavailable
    async def counts(self, name: str | None = None) -> dict[str, dict[str, int]]:
        """Tasks by queue, then by state (all queues, or only `name`), in one aggregation."""
        pipeline: list[dict[str, Any]] = [] if name is None else [{"$match": in_queue(name)}]
        queue = {"$ifNull": ["$queue", DEFAULT_QUEUE]}
        pipeline.append({"$group": {"_id": {"queue": queue, "state": "$state"}, "n": {"$sum": 1}}})
        found: dict[str, dict[str, int]] = {}
        async for row in await self.tasks.aggregate(pipeline):
            key = row.get("_id") or {}
            by_state = found.setdefault(label(key.get("queue")), {})
            state = label(key.get("state"))
            by_state[state] = by_state.get(state, 0) + int(row.get("n", 0))
        return found
