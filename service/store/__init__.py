"""The store: every MongoDB call of the service, one small class per collection or concern.

`Store` opens the collections once and wires the parts; each component of the API and
the worker receives the parts it uses:

- `tasks` (Tasks): create, get, list, delete, requeue task documents
- `keys` (IdempotencyKeys): creates under an Idempotency-Key
- `claims` (Claims): the claim, the fenced writes after it, heartbeats, recovery
- `watch` (TaskWatch): change streams and look-ups that wake workers and feed the dashboard
- `schedules` (Schedules): recurring schedules and the tasks of their occurrences
- `slots` (SlotTable): per-type concurrency limits (and queues' concurrency)
- `queues` (QueueTable): queues' settings, their rates' token buckets, their counts
- `workers` (WorkerRegistry): the worker processes' records
- `figures` (Figures): counts for operators, the dashboard and /metrics
- `retention` (Expiry): finished tasks expire
- `bulk` (BulkTasks): requeue or delete the tasks a filter matches, a batch at a time
- `callbacks` (Outbox): finished tasks' pending completion callbacks, taken under a lease
"""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from service.clock import DbClock
from service.store.base import Database, new_lease, open_client, unavailable
from service.store.bulk import BulkTasks
from service.store.callbacks import Outbox
from service.store.claims import Claims
from service.store.figures import Figures
from service.store.idempotency import IdempotencyKeys
from service.store.queues import QueueTable
from service.store.retention import Expiry
from service.store.schedules import Schedules
from service.store.slots import SlotTable
from service.store.streams import TaskWatch
from service.store.tasks import Tasks
from service.store.workers import WorkerRegistry

__all__ = ["Database", "Store", "new_lease", "open_client"]


class Store:
    """The parts of the store over one database."""

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        *,
        database: str,
        clock: DbClock,
        claim_client: AsyncMongoClient[dict[str, Any]] | None = None,
    ) -> None:
        """`claim_client`: a client without retryable writes (open_client(retry_writes=False))
        that claims go through; see Claims."""
        self.db = Database.open(client, database=database, clock=clock)
        self.client = client
        self.clock = clock
        self.tasks = Tasks(self.db)
        self.keys = IdempotencyKeys(self.db)
        claim_db = claim_client and Database.open(claim_client, database=database, clock=clock)
        self.claims = Claims(self.db, claim_tasks=claim_db.tasks if claim_db else None)
        self.watch = TaskWatch(self.db)
        self.schedules = Schedules(self.db)
        self.slots = SlotTable(self.db)
        self.queues = QueueTable(self.db)
        self.workers = WorkerRegistry(self.db)
        self.figures = Figures(self.db)
        self.retention = Expiry(self.db)
        self.bulk = BulkTasks(self.db)
        self.callbacks = Outbox(self.db)

    @unavailable
    async def ensure_indexes(self) -> None:
        """Create the indexes of tasks, idempotency keys and schedules, and give tasks
        written before priorities existed the default priority; idempotent, safe for every
        process to run at start-up."""
        await self.tasks.ensure_indexes()
        await self.keys.ensure_indexes()
        await self.schedules.ensure_indexes()
        await self.callbacks.ensure_indexes()

    @unavailable
    async def sync_clock(self) -> None:
        """Measure the offset to the database clock."""
        await self.clock.sync(self.client.admin)

    @unavailable
    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the server answers."""
        await self.client.admin.command("ping")
