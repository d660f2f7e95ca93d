"""Retention: finished tasks expire.

Only COMPLETE and FAILED tasks have `finished_at` (a requeue removes it), so a TTL
index on it expires finished work and nothing else."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from service.models import State
from service.store.base import Database, unavailable

logger = logging.getLogger(__name__)

RETENTION_INDEX = "retention"


# COMPLETE and FAILED, as a range a partial index may hold on every server ($in may not):
# only they expire, whatever a person or a migration left in finished_at elsewhere.
FINISHED_RANGE: dict[str, Any] = {
    "state": {"$gte": State.COMPLETE.value, "$lte": State.FAILED.value}
}


class Expiry:
    """Finished tasks expire: a TTL index, and a sweep for servers without one."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks

    @unavailable
    async def ensure(self, seconds: float) -> str:
        """Make the TTL index on finished_at expire after `seconds` (0: drop it, keep all).
        Returns what was done: "created", "changed", "kept", "dropped" or "none"."""
        existing = (await self.tasks.index_information()).get(RETENTION_INDEX)
        if existing is not None and existing.get("partialFilterExpression") != FINISHED_RANGE:
            await self.tasks.drop_index(RETENTION_INDEX)  # another shape: made anew below
            existing = None
        if seconds <= 0:
            if existing is None:
                return "none"
            await self.tasks.drop_index(RETENTION_INDEX)
            return "dropped"
        expire = max(int(seconds), 1)
        if existing is None:
            await self.tasks.create_index(
                "finished_at",
                name=RETENTION_INDEX,
                expireAfterSeconds=expire,
                partialFilterExpression=FINISHED_RANGE,
            )
            return "created"
        if existing.get("expireAfterSeconds") == expire:
            return "kept"
        # Another setting than the index holds: change it in place (what create_index
        # refuses to do), so the last process to start with a new value wins.
        index = {"name": RETENTION_INDEX, "expireAfterSeconds": expire}
        await self.tasks.database.command("collMod", self.tasks.name, index=index)
        return "changed"

    @unavailable
    async def delete_expired(self, *, finished_before: datetime, limit: int) -> int:
        """Delete at most `limit` COMPLETE or FAILED tasks that finished before the given
        time (for servers whose TTL monitor does not do it). One indexed read, one delete."""
        expired = {"finished_at": {"$lt": finished_before}, **FINISHED_RANGE}
        cursor = self.tasks.find(expired, projection={"_id": True}).limit(limit)
        keys = [doc["_id"] async for doc in cursor]
        if not keys:
            return 0
        result = await self.tasks.delete_many({"_id": {"$in": keys}, **expired})
        return result.deleted_count
