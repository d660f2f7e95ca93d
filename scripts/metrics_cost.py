"""What scraping the API's /metrics costs the database, with many tasks stored.

Starts a throwaway SecantusDB on a free port (or uses MONGODB_URL), inserts `--tasks`
tasks directly (90% COMPLETE, 5% NOTSTARTED half of them due, 4% FAILED, 1% STARTED,
types foo/bar/baz), serves the API in this process with a command listener on its
database client, and scrapes /metrics every `--interval` seconds for `--seconds`
seconds. Prints the commands the database received per scrape and per query batch, and
the scrape latency (median, p95, max) for scrapes served from the cache and for those
that refreshed it:

    .venv/bin/python scripts/metrics_cost.py [--tasks 100000] [--seconds 30] [--interval 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

from aiohttp.test_utils import TestClient, TestServer
from bson import ObjectId
from pymongo import AsyncMongoClient, MongoClient

from service.config import Settings
from service.localdb import database_url
from service.store.tasks import INDEXES
from service.web import app as app_module
from service.web.app import create_app
from service.worker.metrics import CommandCounter


def fill(url: str, database: str, count: int) -> None:
    """Insert `count` tasks directly, in batches."""
    client: MongoClient[dict[str, Any]] = MongoClient(url, tz_aware=True)
    tasks = client[database].tasks
    for name, keys in INDEXES.items():
        tasks.create_index(keys, name=name)
    now = datetime.now(UTC)
    states = ["COMPLETE"] * 90 + ["NOTSTARTED"] * 5 + ["FAILED"] * 4 + ["STARTED"]
    batch: list[dict[str, Any]] = []
    for _ in range(count):
        state = random.choice(states)
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "type": random.choice(["foo", "bar", "baz"]),
            "state": state,
            "run_at": now + timedelta(seconds=random.randint(-3600, 3600)),
            "attempts": 1,
            "max_attempts": 3,
        }
        if state == "STARTED":
            doc["heartbeat_at"] = now - timedelta(seconds=random.randint(0, 30))
        batch.append(doc)
        if len(batch) == 5000:
            tasks.insert_many(batch)
            batch = []
    if batch:
        tasks.insert_many(batch)
    client.close()


def _summary(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return (
        f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms ({len(ordered)} scrapes)"
    )


async def scrape_for(url: str, database: str, args: argparse.Namespace) -> None:
    """Serve the API with a listener on its client; scrape; print the figures."""
    log = CommandCounter(export=False, collection="tasks")

    def listened(url: str, *, timeout: float, appname: str) -> AsyncMongoClient[dict[str, Any]]:
        # The service's client options, and a listener counting what the API sends.
        return AsyncMongoClient(
            url,
            tz_aware=True,
            datetime_conversion="DATETIME_AUTO",
            appname=appname,
            serverSelectionTimeoutMS=int(timeout * 1000),
            event_listeners=[log],
        )

    settings = Settings(mongodb_url=url, database=database, metrics_cache=args.cache)
    with mock.patch.object(app_module, "open_client", listened):
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
    log.reset()  # the start-up's index creation is not a scrape's
    try:
        cached: list[float] = []
        refreshed: list[float] = []
        per_scrape: list[int] = []
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            before = log.total
            started = time.perf_counter()
            response = await client.get("/metrics")
            await response.read()
            took = time.perf_counter() - started
            assert response.status == 200
            sent = log.total - before
            per_scrape.append(sent)
            (refreshed if sent else cached).append(took)
            await asyncio.sleep(max(args.interval - took, 0))
        batches = len(refreshed)
        kinds = log.counts
        print(f"tasks: {args.tasks}, scrapes: {len(per_scrape)}, every {args.interval:g}s")
        print(f"metrics_cache: {args.cache:g}s -> query batches: {batches}")
        print(f"commands: {sum(per_scrape)} ({dict(kinds)})")
        print(f"commands per batch: {sum(per_scrape) / max(batches, 1):.1f}")
        print(f"commands per scrape: {sum(per_scrape) / len(per_scrape):.2f}")
        print(f"scrape latency, from the cache: {_summary(cached)}")
        print(f"scrape latency, refreshing: {_summary(refreshed)}")
    finally:
        await client.close()


def main() -> int:
    """Parse the arguments, set up, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--cache", type=float, default=Settings().metrics_cache)
    args = parser.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    database = f"metrics_cost_{uuid.uuid4().hex[:8]}"
    with database_url() as url:
        started = time.perf_counter()
        fill(url, database, args.tasks)
        print(f"inserted {args.tasks} tasks in {time.perf_counter() - started:.0f}s")
        try:
            asyncio.run(scrape_for(url, database, args))
        finally:
            cleanup: MongoClient[dict[str, Any]] = MongoClient(url)
            cleanup.drop_database(database)
            cleanup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
