"""What retention does to claim latency when finished tasks pile up.

On a fresh in-memory SecantusDB (or MONGODB_URL): FINISHED tasks that finished eight days
ago (past the default 7-day retention) beside a few hundred due tasks; the latency of the
service's own claim + complete (Store.claim, Store.complete) is measured with the
finished tasks there, then again after retention deleted them (the sweep of
service/worker/retention.py, run until nothing is left, as it would on a server without a TTL
monitor; with one, the TTL index does the same within a minute or two).

    .venv/bin/python scripts/retention_cost.py [--finished 50000] [--claims 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bson import ObjectId

from service.clock import DbClock
from service.localdb import database_url
from service.models import TaskType
from service.store import Store, new_lease, open_client
from service.worker.retention import Retention

WEEK = 7 * 24 * 3600.0


async def claim_latencies(store: Store, count: int) -> list[float]:
    """Milliseconds per claim (+ its complete) over `count` due tasks created now."""
    due = store.clock.surely_now() - timedelta(seconds=1)
    for _ in range(count):
        await store.tasks.create(task_type=TaskType.BAZ, run_at=due, max_attempts=1)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        task = await store.claims.claim("bench:1", lease=new_lease())
        latencies.append((time.perf_counter() - started) * 1000)
        assert task is not None
        await store.claims.complete(task, "Baz 1")
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms"


async def main(args: argparse.Namespace) -> None:
    print(f"command: python scripts/retention_cost.py {' '.join(sys.argv[1:])}".rstrip())
    with database_url() as url:
        client = open_client(url, timeout=30.0, appname="retention-cost")
        store = Store(client, database=f"bench_{uuid.uuid4().hex[:8]}", clock=DbClock())
        try:
            await store.sync_clock()
            await store.ensure_indexes()
            old = store.clock.now() - timedelta(days=8)
            batch: list[dict[str, Any]] = []
            for n in range(args.finished):
                batch.append(
                    {
                        "_id": ObjectId(),
                        "type": "baz",
                        "state": "COMPLETE",
                        "run_at": old,
                        "created_at": old,
                        "finished_at": old,
                        "attempts": 1,
                        "max_attempts": 1,
                        "output": f"Baz {n % 344}",
                    }
                )
                if len(batch) == 5000:
                    await store.db.tasks.insert_many(batch)
                    batch = []
            if batch:
                await store.db.tasks.insert_many(batch)
            before = await claim_latencies(store, args.claims)
            print(f"{args.finished} finished tasks kept:   {summary(before)}")
            sweep = Retention(store.retention, clock=store.clock, retention=WEEK, grace=0)
            started = time.perf_counter()
            deleted = 0
            while moved := await sweep.run_once():
                deleted += moved
            took = time.perf_counter() - started
            print(f"retention deleted {deleted} finished tasks in {took:.1f}s")
            after = await claim_latencies(store, args.claims)
            print(f"after retention:            {summary(after)}")
            ratio = statistics.median(before) / statistics.median(after)
            print(f"claim p50 with the finished tasks / without: {ratio:.1f}x")
        finally:
            await client.drop_database(store.db.tasks.database.name)
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", type=int, default=50_000)
    parser.add_argument("--claims", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
