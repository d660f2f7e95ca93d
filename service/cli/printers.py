"""The ops commands (`stats`, `workers`, `schedules`, `recover`, `requeue`): each opens the
store, asks service.ops or the store, and prints a table or one line per task."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from service import ops
from service.config import Settings, redact

if TYPE_CHECKING:
    from service.store import Store

Printer = Callable[["Store", Settings, argparse.Namespace], Awaitable[int]]


def runner(printer: Printer) -> Callable[[Settings, argparse.Namespace], int]:
    """Run an ops command with a store; a database that does not answer exits 1 with a message."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        import asyncio

        return asyncio.run(_with_store(printer, settings, args))

    return run


async def _with_store(printer: Printer, settings: Settings, args: argparse.Namespace) -> int:
    from pymongo.errors import ConfigurationError

    from service.clock import DbClock
    from service.errors import DatabaseRefused, DatabaseUnavailable, TaskNotFound, TaskRunnerError
    from service.store import Store, open_client

    url = settings.effective_mongodb_url
    try:
        client = open_client(url, timeout=settings.db_timeout, appname="task-runner-ops")
    except ConfigurationError as exc:
        print(f"task-runner: bad setting: MONGODB_URL: {redact(str(exc))}", file=sys.stderr)
        return 2
    store = Store(client, database=settings.database, clock=DbClock())
    try:
        await store.sync_clock()
        return await printer(store, settings, args)
    except DatabaseUnavailable as exc:
        print(f"task-runner: cannot reach the database at {redact(url)}: {exc}", file=sys.stderr)
        return 1
    except DatabaseRefused as exc:
        print(f"task-runner: {exc} at {redact(url)}", file=sys.stderr)
        return 1
    except (TaskNotFound, TaskRunnerError) as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()


def _ago(store: Store, moment: object) -> str:
    if not isinstance(moment, datetime):
        return "unknown"
    return f"{(store.clock.now() - moment).total_seconds():.1f}s"


async def stats(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """Counts by state and type, the oldest due task, unreadable and stale documents."""
    summary = await ops.stats(store, settings.stale_after)
    print(f"{'state':<12}{'type':<6}{'count':>10}")
    for count in summary.counts:
        print(f"{count.state:<12}{count.type:<6}{count.count:>10}")
    oldest = summary.oldest_due
    if oldest is None:
        print("oldest due task: none")
    else:
        print(f"oldest due task: {oldest.id} ({oldest.type}), due {_ago(store, oldest.run_at)} ago")
    print(f"unreadable documents: {summary.unreadable}")
    print(f"schedules left alone for what they hold: {summary.unusable_schedules}")
    print(f"stale STARTED tasks (no heartbeat for {settings.stale_after:g}s): {summary.stale}")
    return 0


async def workers(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """The worker processes, alive or gone, with the tasks each holds."""
    found = await store.workers.seen(settings.stale_after)
    if not found:
        print("no workers registered")
        return 0
    width = max(len("worker"), *(len(w.id) for w in found)) + 2
    types = max(len("types"), *(len(",".join(w.types)) for w in found)) + 2
    print(
        f"{'worker':<{width}}{'state':<7}{'seen':>8}  {'running':>9}  {'version':<10}"
        f"{'metrics':<9}{'up since':<21}{'types':<{types}}tasks held"
    )
    for w in found:
        seen = "never" if w.seconds_since_seen is None else f"{w.seconds_since_seen:.1f}s"
        load = f"{w.running}/{'?' if w.concurrency is None else w.concurrency}"
        port = "-" if w.metrics_port is None else str(w.metrics_port)
        since = "unknown" if w.started_at is None else w.started_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{w.id:<{width}}{'alive' if w.alive else 'gone':<7}{seen:>8}  {load:>9}  "
            f"{w.version or '?':<10}{port:<9}{since:<21}{','.join(w.types) or '?':<{types}}"
            f"{' '.join(w.tasks) or '-'}"
        )
    alive = sum(w.alive for w in found)
    print(
        f"{len(found)} worker(s): {alive} alive, {len(found) - alive} gone "
        f"(silent for over {settings.stale_after:g}s)"
    )
    return 0


async def schedules(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """The recurring schedules, their state and next occurrence."""
    found = await store.schedules.page(limit=settings.max_page_size)
    if not found:
        print("no schedules")
        return 0
    print(f"{'schedule':<26}{'type':<10}{'state':<9}{'missed':<8}{'next occurrence':<26}when")
    for s in found:
        when = f"every {s.every:g}s" if s.every is not None else f"cron {s.cron} {s.timezone}"
        state = "paused" if s.paused else ("active" if s.next_at is not None else "ended")
        following = "-" if s.next_at is None else s.next_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        print(f"{s.id:<26}{s.type:<10}{state:<9}{s.missed:<8}{following:<26}{when}")
    print(f"{len(found)} schedule(s)")
    return 0


async def recover(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """The stale tasks, then (unless --dry-run) what recovering each one did."""
    stale = await ops.find_stale(store, settings.stale_after)
    if not stale:
        print(f"no stale tasks (threshold {settings.stale_after:g}s)")
        return 0
    for task in stale:
        print(
            f"{task.id} {task.type} attempt {task.attempts}/{task.max_attempts} "
            f"worker {task.worker} silent {_ago(store, task.heartbeat_at)}"
        )
    if args.dry_run:
        print(f"{len(stale)} stale task(s); dry run, nothing changed")
        return 0
    recovery = await ops.recover(store, stale_after=settings.stale_after, stale=stale)
    for fate in recovery.tasks:
        print(f"{fate.id} {fate.describe()}")
    print(
        f"recovered {recovery.moved} task(s): {len(recovery.requeued)} back to NOTSTARTED, "
        f"{len(recovery.failed)} FAILED (attempts used up)"
    )
    return 0


async def requeue(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """A FAILED task back in the queue, or one line on why not."""
    from service.errors import InvalidTaskId, TaskNotFound, TaskNotRequeueable

    try:
        task = await ops.requeue(store, args.id)
    except InvalidTaskId as exc:
        print(f"task-runner requeue: {exc}", file=sys.stderr)
        return 1
    except TaskNotFound:
        print(
            f"task-runner requeue: no FAILED task with id {args.id}: no task has this id",
            file=sys.stderr,
        )
        return 1
    except TaskNotRequeueable as exc:
        print(
            f"task-runner requeue: no FAILED task with id {args.id}: it is {exc.state}; "
            "only a FAILED task can be requeued",
            file=sys.stderr,
        )
        return 1
    print(f"{task.id} requeued: NOTSTARTED, due now, attempts reset")
    return 0
