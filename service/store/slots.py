"""Per-type concurrency limits: slots.

One document per limited type, {_id: type, limit, holders: [{lease, worker, at}]}.
A worker takes a slot before it claims a task of the type, with the lease it then
claims with, and gives it back after the task left STARTED. Every change is one
atomic update of that document; the task's lease fences the slot: recovery frees a
slot only once no STARTED task holds its lease."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import pymongo
from bson import DatetimeMS
from pymongo.errors import DuplicateKeyError

from service.models import State
from service.store.base import Database, unavailable

logger = logging.getLogger(__name__)


class SlotTable:
    """The slots of limited types: one document per type, its holders' leases."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.limits = db.limits
        self.clock = db.clock

    @unavailable
    async def take(self, task_type: str, *, limit: int, lease: str, worker_id: str) -> bool:
        """Take one of the `limit` slots of `task_type` for `lease`; False when all are held.

        One update: it matches only while fewer than `limit` leases hold a slot (no element
        at index limit-1), so concurrent takers can never push past the limit. The first
        taker creates the document; a taker that finds it full collides on its _id, as does
        one that finds `holders` of another shape than a list (free_lost mends it).
        """
        holder = {"lease": lease, "worker": worker_id, "at": self.clock.now()}
        takeable = {
            "_id": task_type,
            "$or": [{"holders": {"$type": "array"}}, {"holders": {"$exists": False}}],
            f"holders.{limit - 1}": {"$exists": False},
        }
        try:
            result = await self.limits.update_one(
                takeable, {"$push": {"holders": holder}, "$set": {"limit": limit}}, upsert=True
            )
        except DuplicateKeyError:
            return False
        return result.modified_count == 1 or result.upserted_id is not None

    @unavailable
    async def free(self, task_type: str, lease: str) -> None:
        """Give back the slot `lease` holds (nothing if it holds none): one update."""
        await self.limits.update_one(
            {"_id": task_type, "holders": {"$type": "array"}},
            {"$pull": {"holders": {"lease": lease}}},
        )

    @unavailable
    async def free_lost(self, stale_after: float, *, within: float | None = None) -> int:
        """Free the slots taken over `stale_after` seconds ago whose lease holds no STARTED
        task (its worker died, or its task was recovered), and drop holders no worker could
        have written (see `mend`); returns how many slots were freed.

        A live holder is never freed: its task is STARTED under the slot's lease from the
        claim until its result is written, and its claim lands within a fraction of the
        stale threshold after the slot is taken (the claim is bounded), so a slot that old
        without a STARTED task is one whose claim found nothing or whose holder is gone.
        """
        cutoff = self.clock.surely_now() - timedelta(seconds=stale_after)
        freed = 0
        with pymongo.timeout(within):
            # One document per limited type: a handful, read whole so that any shape is seen.
            async for doc in self.limits.find({}):
                holders = doc.get("holders", [])
                readable = [h for h in holders if _holder(h)] if isinstance(holders, list) else []
                if "holders" in doc and len(readable) != _length(holders):
                    await self.mend(doc)
                freed += await self._free_old(doc["_id"], readable, cutoff)
        return freed

    async def _free_old(self, key: Any, holders: list[Any], cutoff: datetime) -> int:
        old = [h["lease"] for h in holders if isinstance(h["at"], datetime) and h["at"] < cutoff]
        if not old:
            return 0
        held = {"state": State.STARTED.value, "lease": {"$in": old}}
        alive = set(await self.tasks.distinct("lease", held))
        lost = [lease for lease in old if lease not in alive]
        if not lost:
            return 0
        gone = {"lease": {"$in": lost}, "at": {"$lt": cutoff}}
        result = await self.limits.update_one(
            {"_id": key, "holders": {"$type": "array"}}, {"$pull": {"holders": gone}}
        )
        return len(lost) if result.modified_count else 0

    async def mend(self, doc: Mapping[str, Any]) -> None:
        """Keep only the holders a worker could have written ({lease: string, at: date}):
        `holders` of another shape becomes an empty list, junk elements (a number, null, a
        holder without a lease or a time) go. One pipeline update, atomic against takers."""
        logger.warning(
            "limits document %r holds slot holders of another shape; dropping them: %s",
            doc.get("_id"),
            _short(doc.get("holders")),
        )
        holders = {"$cond": [{"$isArray": "$holders"}, "$holders", []]}
        readable = {
            "$and": [
                {"$eq": [{"$type": "$$this"}, "object"]},
                {"$eq": [{"$type": "$$this.lease"}, "string"]},
                {"$eq": [{"$type": "$$this.at"}, "date"]},
            ]
        }
        await self.limits.update_one(
            {"_id": doc["_id"]},
            [{"$set": {"holders": {"$filter": {"input": holders, "cond": readable}}}}],
        )

    @unavailable
    async def holders(self, task_type: str) -> list[dict[str, Any]]:
        """The holders of `task_type`'s slots as stored (for operators and tests)."""
        doc = await self.limits.find_one({"_id": task_type})
        holders = None if doc is None else doc.get("holders")
        return list(holders) if isinstance(holders, list) else []


def _holder(value: Any) -> bool:
    """Whether a holder is as workers write it: a lease string and a date."""
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("lease"), str)
        and isinstance(value.get("at"), datetime | DatetimeMS)
    )


def _length(value: Any) -> int:
    return len(value) if isinstance(value, list) else -1


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
