#!/usr/bin/env python3
"""Where a draining worker's CPU goes: a py-spy profile of one of `--workers` worker
processes while they drain `--tasks` Baz tasks due at once, on a fresh embedded SecantusDB
(or MONGODB_URL's server), split into the parts of a worker that docs/performance.md names.

Needs py-spy (the `dev` extra) and the right to read another process's memory (root, or
ptrace_scope 0).

    .venv/bin/python scripts/profile_drain.py                  # 1,500 tasks, two workers
    .venv/bin/python scripts/profile_drain.py --tasks 3000 --top 40
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import insert_due  # noqa: E402

from service.clock import DbClock  # noqa: E402
from service.localdb import database_url  # noqa: E402
from service.store import Store, open_client  # noqa: E402

# The parts, by the first of these frames found in a sample's stack (outermost first).
PARTS = {
    "Claims.claim": "the claim",
    "ResultWriter._flush": "the result writes",
    "WakeUps.watch": "the change stream",
    "Worker._execute": "running and logging tasks",
    "Periodic._loop": "the periodic rounds (registry, recovery, ...)",
    "QueueGate.refresh": "the queues' settings read",
    "AsyncPeriodicExecutor._run": "the driver's own monitor",
    # uvloop sends what a command wrote later in the same loop turn, outside its frames.
    "UVStream__initiate_write": "socket writes (the commands' bytes, sent by uvloop)",
}
IDLE = ("epoll_wait", "epoll_pwait")


def frame_name(frame: str) -> str:
    return re.sub(r"\s*\(.*?:\d+\)$", "", frame)


def split(raw: Path, top: int) -> None:
    """Print the busy samples of the worker's event-loop thread by part, then by frame."""
    parts: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, samples = line.rsplit(" ", 1)
        names = [frame_name(f) for f in stack.split(";")]
        if "run_worker" not in names or names[-1].split(" ")[0] in IDLE:
            continue  # another thread, or the loop waiting
        busy += int(samples)
        part = next((PARTS[n] for n in names if n in PARTS), "the event loop and the rest")
        parts[part] += int(samples)
        for name in set(names):
            frames[name] += int(samples)
    print(f"busy samples of the worker's event loop: {busy}")
    for part, count in parts.most_common():
        print(f"{100 * count / busy:5.1f}%  {part}")
    if top:
        print(f"\nthe {top} frames most often on the stack:")
        for name, count in frames.most_common(top):
            print(f"{100 * count / busy:5.1f}%  {name}")


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drain(url: str, args: argparse.Namespace, raw: Path) -> None:
    name = f"profile_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_RUNNER_")}
    env.update(MONGODB_URL=url, TASK_RUNNER_DATABASE=name)
    store = Store(open_client(url, timeout=10, appname="profile"), database=name, clock=DbClock())
    await store.sync_clock()
    await store.ensure_indexes()
    workers = [
        spawn([sys.executable, "-m", "service.cli", "worker"], env) for _ in range(args.workers)
    ]
    try:
        await asyncio.sleep(4)  # started and idle
        await insert_due(store, args.tasks, later=2.0)
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        spy = spawn(
            [py_spy, "record", "-p", str(workers[0].pid), "-r", "1000", "--native", "-f", "raw",
             "-o", str(raw)],
            env,
        )  # fmt: skip
        while await store.db.tasks.count_documents({"state": "COMPLETE"}) < args.tasks:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has
        spy.wait(60)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
        await store.client.drop_database(name)
        await store.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list this many frames")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw profile in this file")
    parser.add_argument("--read", type=Path, help="only split a profile kept before")
    args = parser.parse_args()
    if args.read:
        split(args.read, args.top)
        return
    with tempfile.TemporaryDirectory() as scratch, database_url() as url:
        raw = args.keep or Path(scratch) / "profile.txt"
        asyncio.run(drain(url, args, raw))
        split(raw, args.top)


if __name__ == "__main__":
    main()
