"""The workers' registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING

from service.store.base import Database, unavailable

logger = logging.getLogger(__name__)

# How long a gone worker's record stays to be seen (who died, holding what) before the
# server's TTL monitor deletes it.
GONE_WORKERS_KEPT = 3600


@dataclass(frozen=True, kw_only=True)
class WorkerSeen:
    """A worker's record as read, and whether it is alive: heard from within the stale
    threshold. Read defensively: a field of another shape reads as empty."""

    id: str
    host: str | None
    pid: int | None
    started_at: datetime | None
    concurrency: int | None
    running: int
    tasks: tuple[str, ...]
    version: str | None
    types: tuple[str, ...]
    metrics_port: int | None
    last_seen: datetime | None
    alive: bool
    seconds_since_seen: float | None

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, now: datetime, stale_after: float) -> WorkerSeen:
        """Build from a stored record; never raises."""

        def of(kind: type, name: str) -> Any:
            value = doc.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        def strings(name: str) -> tuple[str, ...]:
            value = doc.get(name)
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        last_seen = of(datetime, "last_seen")
        since = None if last_seen is None else (now - last_seen).total_seconds()
        return cls(
            id=str(doc.get("_id")),
            host=of(str, "host"),
            pid=of(int, "pid"),
            started_at=of(datetime, "started_at"),
            concurrency=of(int, "concurrency"),
            running=of(int, "running") or 0,
            tasks=strings("tasks"),
            version=of(str, "version"),
            types=strings("types"),
            metrics_port=of(int, "metrics_port"),
            last_seen=last_seen,
            alive=since is not None and since <= stale_after,
            seconds_since_seen=since,
        )


class WorkerRegistry:
    """One record per worker process: who is alive and what each holds."""

    def __init__(self, db: Database) -> None:
        self.workers = db.workers
        self.clock = db.clock

    @unavailable
    async def ensure_indexes(self) -> None:
        """A TTL index: the server deletes a worker's record GONE_WORKERS_KEPT seconds after
        it was last seen (MongoDB and SecantusDB sweep once a minute); no client round trip."""
        await self.workers.create_index(
            [("last_seen", ASCENDING)], name="gone", expireAfterSeconds=GONE_WORKERS_KEPT
        )

    @unavailable
    async def register(self, worker_id: str, fields: dict[str, Any]) -> None:
        """Write this worker's record (one upsert); `last_seen` is the server's clock."""
        await self.workers.update_one(
            {"_id": worker_id}, {"$set": fields, "$currentDate": {"last_seen": True}}, upsert=True
        )

    @unavailable
    async def unregister(self, worker_id: str) -> None:
        """Remove this worker's record (a clean stop)."""
        await self.workers.delete_one({"_id": worker_id})

    @unavailable
    async def seen(self, stale_after: float, *, limit: int = 1000) -> list[WorkerSeen]:
        """Registered workers by id; one silent for over `stale_after` seconds (on the
        database clock) is gone."""
        now = self.clock.now()
        cursor = self.workers.find({}).sort("_id", ASCENDING).limit(limit)
        return [
            WorkerSeen.from_document(doc, now=now, stale_after=stale_after) async for doc in cursor
        ]
