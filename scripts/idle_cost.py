"""What an idle worker costs the database, round by round.

One worker with every feature on (a type limit, a schedule not due for a day, retention,
the default intervals) runs idle on a fresh SecantusDB (or MONGODB_URL) with the clients a
worker process has: the main one (its lease keeper shares its listeners) and the claim
client. Every command they send is counted, by the round that sent it.

    .venv/bin/python scripts/idle_cost.py --seconds 60
    .venv/bin/python scripts/idle_cost.py --seconds 60 --queues  # with queue settings
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections import Counter
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from service.clock import DbClock
from service.config import Settings
from service.localdb import database_url
from service.plugins import load_registry
from service.store import Store
from service.store.occurrences import Timing
from service.worker.process import http_session
from service.worker.worker import Worker


def round_of(name: str, command: dict[str, Any]) -> str:
    """The worker round a command belongs to."""
    collection = command.get(name)
    if name == "hello" or name == "isMaster":
        return "clock sync (hello)"
    if name == "getMore":
        return "change stream getMore"
    if name == "aggregate":
        return "change stream open"
    if name == "findAndModify":
        if "callback.state" in command.get("query", {}):
            return "callbacks: take"
        return "safety poll: claim"
    if collection == "queues":
        return "queue settings read" if name == "find" else f"queues {name}"
    if collection == "workers":
        return "registry upsert"
    if collection == "schedules":
        return "schedule find"
    if collection == "limits":
        return "limits: slot take/free" if name == "update" else "recovery: free_lost find"
    if name == "update" and collection == "tasks":
        updates = command["updates"][0]["u"]
        return "recovery update" if isinstance(updates, list) else "heartbeat (leases)"
    if name == "find" and collection == "tasks":
        query = command.get("filter", {})
        if "finished_at" in query:
            return "retention find"
        if query.get("state") == "NOTSTARTED":
            return "safety poll: look-up"
        return "malformed scan"
    if name == "delete":
        return "retention delete"
    return f"{name} {collection}"


class Rounds(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.recording = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.recording:
            self.counts[round_of(event.command_name, dict(event.command))] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def measure(url: str, seconds: float, *, queues: bool = False) -> Counter[str]:
    rounds = Rounds()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, tz_aware=True, event_listeners=[rounds]
    )
    claim_client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        url, tz_aware=True, event_listeners=[rounds], retryWrites=False
    )
    database = f"idle_{uuid.uuid4().hex[:8]}"
    store = Store(client, database=database, clock=DbClock(), claim_client=claim_client)
    await store.sync_clock()
    await store.ensure_indexes()
    await store.workers.ensure_indexes()
    template = {"type": "baz", "max_attempts": 1}
    await store.schedules.create(template=template, timing=Timing(every=86_400.0))
    if queues:  # a paused queue and a limited one, without tasks
        await store.queues.put("held", {"paused": True})
        await store.queues.put("partner", {"rate": 4.0, "concurrency": 2})
    settings = Settings(
        mongodb_url=url,
        database=database,
        type_limits=("baz=2",),
        bar_url="http://127.0.0.1:9/",
        bar_timeout=1,
    )
    async with http_session() as http:
        worker = Worker(store, settings, registry=load_registry(), http=http, worker_id="idle")
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(2.0)  # started: the first looks are done
        rounds.recording = True
        await asyncio.sleep(seconds)
        rounds.recording = False
        worker.stop()
        await running
    await client.drop_database(database)
    await claim_client.close()
    await client.close()
    return rounds.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--queues", action="store_true", help="with queue settings")
    args = parser.parse_args()
    with database_url() as url:
        counts = asyncio.run(measure(url, args.seconds, queues=args.queues))
    total = sum(counts.values())
    print(f"| round ({args.seconds:g} s idle) | commands | commands/s |")
    print("| --- | ---: | ---: |")
    for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {count} | {count / args.seconds:.3f} |")
    print(f"| **total** | {total} | **{total / args.seconds:.2f}** |")


if __name__ == "__main__":
    main()
