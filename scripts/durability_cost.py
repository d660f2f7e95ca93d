"""What `--sync-on-commit` costs the embedded database (SecantusDB) in throughput.

Starts SecantusDB twice on a free port over a fresh data directory (on disk: the flag syncs
the write-ahead log there), once without the flag and once with it, as `task-runner db`
does, and measures with acknowledged writes (the driver's default write concern):

- inserts/s: one `insert_one` per document;
- claims/s: a claim as the workers make it (`find_one_and_update` NOTSTARTED -> STARTED,
  sorted by run_at, over the claim index) followed by the fenced completing `update_one`.

Prints both rates for both servers and their ratio (with the flag / without), with the
command line that reproduces it:

    .venv/bin/python scripts/durability_cost.py [--inserts 2000] [--claims 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, MongoClient, ReturnDocument

from service.localdb import LocalDatabase, free_port

Collection = Any


def _inserts(tasks: Collection, count: int) -> float:
    started = time.perf_counter()
    for number in range(count):
        tasks.insert_one({"n": number, "state": "DONE"})
    return count / (time.perf_counter() - started)


def _claims(tasks: Collection, count: int) -> float:
    now = datetime.now(UTC)
    tasks.create_index([("state", ASCENDING), ("run_at", ASCENDING), ("_id", ASCENDING)])
    tasks.insert_many(
        [
            {"state": "NOTSTARTED", "run_at": now - timedelta(seconds=n + 1), "attempts": 0}
            for n in range(count)
        ]
    )
    started = time.perf_counter()
    for _ in range(count):
        lease = uuid.uuid4().hex
        task = tasks.find_one_and_update(
            {"state": "NOTSTARTED", "run_at": {"$lte": now}},
            {"$set": {"state": "STARTED", "lease": lease}, "$inc": {"attempts": 1}},
            sort=[("run_at", ASCENDING), ("_id", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        assert task is not None
        tasks.update_one(
            {"_id": task["_id"], "lease": lease}, {"$set": {"state": "COMPLETE", "lease": None}}
        )
    return count / (time.perf_counter() - started)


def measure(*, sync_on_commit: bool, inserts: int, claims: int) -> tuple[float, float]:
    """(inserts/s, claims/s) on a fresh on-disk server."""
    directory = tempfile.mkdtemp(prefix="durability-cost-")
    db = LocalDatabase(port=free_port(), path=directory, sync_on_commit=sync_on_commit)
    db.start()
    client: MongoClient[dict[str, Any]] = MongoClient(db.url)
    try:
        database = client["durability_cost"]
        return _inserts(database["inserts"], inserts), _claims(database["tasks"], claims)
    finally:
        client.close()
        db.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _median(runs: list[tuple[float, float]], index: int) -> float:
    return statistics.median(run[index] for run in runs)


def main() -> None:
    """Measure both servers and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inserts", type=int, default=2000, help="documents inserted per run")
    parser.add_argument("--claims", type=int, default=500, help="claims per run")
    parser.add_argument("--runs", type=int, default=1, help="runs per server (median shown)")
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.runs):
        for flag in (False, True):  # alternate, so drifting load on the machine hits both
            results[flag].append(
                measure(sync_on_commit=flag, inserts=args.inserts, claims=args.claims)
            )
    print(f"$ python scripts/durability_cost.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"SecantusDB on disk, {args.runs} run(s) each, median; acknowledged writes (w:1)")
    print(f"| {'':<22} | {'without flag':>12} | {'--sync-on-commit':>16} | {'ratio':>6} |")
    print(f"| {'-' * 22} | {'-' * 11}: | {'-' * 15}: | {'-' * 5}: |")
    for label, index in (("inserts/s", 0), ("claim+complete/s", 1)):
        plain = _median(results[False], index)
        synced = _median(results[True], index)
        print(f"| {label:<22} | {plain:>12.0f} | {synced:>16.0f} | {synced / plain:>6.2f} |")


if __name__ == "__main__":
    main()
