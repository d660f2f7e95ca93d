"""Idempotent creation: the Idempotency-Key header.

A unique index decides, never a read before the write: the key's record (its _id is
the key) is inserted first, holding the whole task document to insert, and only the
request whose record landed inserts that task. A request that finds the record with
the same request hash answers with the record's task; if the task is not there yet
(the first request is between its two writes, or stopped between them), it inserts
the very same document itself, and the tasks' unique _id lets one of the two land."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from service.clock import to_millis
from service.errors import DatabaseUnavailable, IdempotencyKeyReused, IdempotentTaskGone
from service.models import DEFAULT_QUEUE, Task
from service.store.base import Database, new_task_document, unavailable

logger = logging.getLogger(__name__)

IDEMPOTENCY_TURNS = 5


@dataclass(frozen=True, kw_only=True)
class IdempotentCreate:
    """A create under an Idempotency-Key: the key; the route it came by (the same key and
    body on another route is another request); how many seconds the key is remembered; and
    the id the task gets if this request is the first, chosen before anything is written."""

    key: str
    route: str
    ttl: float
    task_id: ObjectId = field(default_factory=ObjectId)

    def replayed(self, task: Task) -> bool:
        """Whether `task` is an earlier request's: this one created nothing."""
        return task.id != str(self.task_id)


def request_hash(route: str, fields: Mapping[str, Any]) -> str:
    """What identifies a create request: its route and what it asked for, `run_at` as given
    (None for "now"), normalised (sorted keys, the type in lower case, milliseconds)."""
    run_at = fields.get("run_at")
    described = {
        **fields,
        "route": route,
        "task_type": str(fields.get("task_type")).lower(),
        "run_at": None if run_at is None else to_millis(run_at).isoformat(),
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _live_record(record: Mapping[str, Any], now: datetime) -> bool:
    """An unexpired key record whose task can be read back; any other is replaced."""
    expires_at, task = record.get("expires_at"), record.get("task")
    fresh = isinstance(expires_at, datetime) and expires_at > now
    return fresh and isinstance(task, Mapping) and "_id" in task


class IdempotencyKeys:
    """Creates under an Idempotency-Key."""

    def __init__(self, db: Database) -> None:
        self.tasks = db.tasks
        self.idempotency_keys = db.idempotency_keys
        self.clock = db.clock

    @unavailable
    async def ensure_indexes(self) -> None:
        """Idempotency-Key records: the server deletes each once past its own expiry (about
        once a minute; create_once checks the time itself), so a changed
        TASK_RUNNER_IDEMPOTENCY_TTL needs no change of the index."""
        await self.idempotency_keys.create_index(
            [("expires_at", ASCENDING)], name="expired", expireAfterSeconds=0
        )

    @unavailable
    async def create_once(
        self,
        once: IdempotentCreate,
        *,
        task_type: str,
        run_at: datetime | None,
        max_attempts: int,
        args: Mapping[str, Any] | None = None,
        priority: int = 0,
        time_limit: float | None = None,
        tags: Sequence[str] = (),
        queue: str = DEFAULT_QUEUE,
        callback_url: str | None = None,
        traceparent: str | None = None,
    ) -> Task:
        """`create`, once per Idempotency-Key: the same key with the same request gives the
        task the first request created (`once.replayed(task)` tells); after `once.ttl`
        seconds the key is forgotten. Raises IdempotencyKeyReused when the key came with
        another request, IdempotentTaskGone when the key's task has been deleted since.
        """
        fields: dict[str, Any] = {
            "task_type": task_type,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "args": args,
            "priority": priority,
            "time_limit": time_limit,
        }
        if tags:
            # Only when given: a request without tags hashes as before tags existed, so a
            # key an earlier version recorded still replays during a rolling upgrade.
            fields["tags"] = list(tags)
        if queue != DEFAULT_QUEUE:
            fields["queue"] = queue  # likewise: the default queue hashes as before queues
        if callback_url is not None:
            fields["callback_url"] = callback_url  # as tags: only when given
        fingerprint = request_hash(once.route, fields)
        # The trace context is not the request's content: a retry may come in another trace.
        doc = new_task_document(self.clock, once.task_id, **fields, traceparent=traceparent)
        # A turn is lost only to another request's write on this key meanwhile (an expired
        # record replaced or swept): the next turn reads what that write left.
        for _ in range(IDEMPOTENCY_TURNS):
            now = self.clock.now()
            record = {
                "_id": once.key,
                "request": fingerprint,
                "task": doc,
                "created_at": now,
                "expires_at": now + timedelta(seconds=once.ttl),
            }
            try:
                await self.idempotency_keys.insert_one(record)
                return await self._insert_keyed(once.key, doc)
            except DuplicateKeyError:
                held = await self.idempotency_keys.find_one({"_id": once.key})
            if held is None:
                continue  # expired and deleted since
            if _live_record(held, now):
                if held.get("request") != fingerprint:
                    raise IdempotencyKeyReused(once.key)
                return await self._replay(once.key, held)
            # Expired: take the key over, unless another request did first.
            mine = await self.idempotency_keys.replace_one(
                {"_id": once.key, "expires_at": held.get("expires_at")}, record
            )
            if mine.matched_count == 1:
                return await self._insert_keyed(once.key, doc)
        raise DatabaseUnavailable(f"Idempotency-Key {once.key!r} is contended; retry")

    async def _insert_keyed(self, key: str, doc: dict[str, Any]) -> Task:
        """Insert the task of a key's record, then mark the record: its task was inserted."""
        with contextlib.suppress(DuplicateKeyError):
            # Else a retry of this request, finding the record unmarked, inserted it first.
            await self.tasks.insert_one(doc)
        # Tells a later replay that a missing task was deleted, not still to be inserted.
        await self.idempotency_keys.update_one(
            {"_id": key, "task._id": doc["_id"]}, {"$set": {"inserted": True}}
        )
        return Task.from_document(doc)

    async def _replay(self, key: str, record: dict[str, Any]) -> Task:
        """The task of a live record that has this request's hash, as it is now."""
        task = record["task"]
        if record.get("inserted") is not True:
            await self._insert_keyed(key, task)
        doc = await self.tasks.find_one({"_id": task["_id"]})
        if doc is None:
            raise IdempotentTaskGone(key, str(task["_id"]))
        return Task.from_document(doc)
