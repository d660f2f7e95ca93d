#!/usr/bin/env python3
"""Where the embedded database stops serving: drain rate against collection size.

For each size, a fresh SecantusDB as `task-runner dev` runs it (on disk, syncing every
commit) holds that many task documents: `--due` Baz tasks due now and the rest finished
(COMPLETE, inside the retention period, so retention keeps them). `--workers` worker
processes with default settings then drain the due tasks; the figure is due tasks per
second between 10% and 90% done. Beside it, the claim's own latency with the same
documents (one client, claim + complete, --claims times). With MONGODB_URL set, that
server instead (then the storage is whatever it is).

    .venv/bin/python scripts/envelope.py                       # 1k, 10k, 100k documents
    .venv/bin/python scripts/envelope.py --sizes 1000 10000    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bson import ObjectId  # noqa: E402
from retention_cost import claim_latencies  # noqa: E402

from service.clock import DbClock  # noqa: E402
from service.localdb import LocalDatabase, free_port  # noqa: E402
from service.store import Store, open_client  # noqa: E402

BATCH = 5000


@contextlib.contextmanager
def embedded_url() -> Iterator[str]:
    """MONGODB_URL when set, else SecantusDB on disk with --sync-on-commit (the default)."""
    if os.environ.get("MONGODB_URL"):
        yield os.environ["MONGODB_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="envelope-") as path:
        db = LocalDatabase(port=free_port(), path=path, sync_on_commit=True)
        db.start()
        try:
            yield db.url
        finally:
            db.stop()


def task_doc(state: str, moment: Any, n: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": ObjectId(),
        "type": "baz",
        "state": state,
        "run_at": moment,
        "created_at": moment,
        "attempts": 0 if state == "NOTSTARTED" else 1,
        "max_attempts": 1,
        "priority": 0,
    }
    if state == "COMPLETE":
        doc.update(finished_at=moment, started_at=moment, output=f"Baz {n % 344}")
    return doc


async def fill(store: Store, *, finished: int, due: int) -> None:
    """`finished` tasks that finished an hour ago, then `due` tasks due now."""
    hour_ago = store.clock.surely_now() - timedelta(hours=1)
    for start in range(0, finished, BATCH):
        count = min(BATCH, finished - start)
        await store.db.tasks.insert_many(
            [task_doc("COMPLETE", hour_ago, start + i) for i in range(count)]
        )
    now = store.clock.surely_now()
    await store.db.tasks.insert_many([task_doc("NOTSTARTED", now, i) for i in range(due)])


def start_workers(url: str, database: str, count: int) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes with default settings, their output dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_RUNNER_")}
    env.update(MONGODB_URL=url, TASK_RUNNER_DATABASE=database, TASK_RUNNER_LOG_LEVEL="WARNING")
    command = [sys.executable, "-m", "service.cli", "worker"]
    return [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]


async def drain_rate(store: Store, url: str, *, workers: int, due: int) -> float:
    """Due tasks per second between 10% and 90% drained by `workers` worker processes."""
    children = start_workers(url, store.db.tasks.database.name, workers)
    marks: dict[int, float] = {}
    waiting = {"state": {"$in": ["NOTSTARTED", "STARTED"]}}
    try:
        while len(marks) < 2:
            done = due - await store.db.tasks.count_documents(waiting)
            for share in (10, 90):
                if share not in marks and done >= due * share / 100:
                    marks[share] = time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(60)
    return due * 0.8 / (marks[90] - marks[10])


async def measure(size: int, args: argparse.Namespace) -> tuple[float, float]:
    with embedded_url() as url:
        client = open_client(url, timeout=30.0, appname="envelope")
        store = Store(client, database=f"envelope_{uuid.uuid4().hex[:8]}", clock=DbClock())
        try:
            await store.sync_clock()
            await store.ensure_indexes()
            await fill(store, finished=max(0, size - args.due), due=args.due)
            rate = await drain_rate(store, url, workers=args.workers, due=args.due)
            latency = statistics.median(await claim_latencies(store, args.claims))
        finally:
            if os.environ.get("MONGODB_URL"):  # else the server and its files go as a whole
                await client.drop_database(store.db.tasks.database.name)
            await client.close()
    return rate, latency


async def main(args: argparse.Namespace) -> None:
    print(f"command: python scripts/envelope.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.workers} workers drain {args.due} due Baz tasks among finished ones")
    print("")
    print("| documents in `tasks` | due tasks drained /s | claim p50 (one client) |")
    print("| ---: | ---: | ---: |")
    for size in args.sizes:
        rate, latency = await measure(size, args)
        print(f"| {size:,} | {rate:.1f} | {latency:.1f} ms |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--due", type=int, default=300, help="due tasks drained per size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--claims", type=int, default=30, help="claims timed per size")
    asyncio.run(main(parser.parse_args()))
