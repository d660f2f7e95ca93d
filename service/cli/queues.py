"""`task-runner queues`: list the queues, or change one (set, pause, resume, delete its
settings), as the API's /queues routes do, checked by the same schema."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from service.config import Settings

if TYPE_CHECKING:
    from service.store import Store

ACTIONS = ("list", "set", "pause", "resume", "delete")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`queues [list | set NAME --rate R ... | pause NAME | resume NAME | delete NAME]`."""
    parser.add_argument("action", nargs="?", default="list", choices=ACTIONS)
    parser.add_argument("name", nargs="?", help="the queue (set, pause, resume, delete)")
    parser.add_argument("--rate", type=float, help="tasks a second, across every worker")
    parser.add_argument("--burst", type=int, help="starts allowed at once (default 1)")
    parser.add_argument("--concurrency", type=int, help="tasks STARTED at once at most")
    parser.add_argument("--no-rate", action="store_true", help="clear the rate")
    parser.add_argument("--no-concurrency", action="store_true", help="clear the concurrency")


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in ("rate", "burst", "concurrency"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_rate:
        changes["rate"] = None
    if args.no_concurrency:
        changes["concurrency"] = None
    if args.action in ("pause", "resume"):
        changes["paused"] = args.action == "pause"
    return changes


async def queues(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """Print every queue (settings and counts), after changing one if asked."""
    from marshmallow import ValidationError

    from service.models import QUEUE_NAME
    from service.web.schemas.queues import QueueSettingsSchema
    from service.web.schemas.tasks import QUEUE_RULE

    if args.action != "list":
        if args.name is None or not QUEUE_NAME.fullmatch(args.name):
            print(f"task-runner queues: give a queue name: it {QUEUE_RULE}")
            return 2
        if args.action == "delete":
            # As `task-runner delete`: no confirmation; the queue's tasks are not touched.
            if not await store.queues.delete(args.name):
                print(f"task-runner queues: queue {args.name!r} has no settings")
                return 1
            print(f"deleted the settings of queue {args.name!r}; its tasks stay")
        else:
            try:
                changes = QueueSettingsSchema().load(_changes(args))
            except ValidationError as exc:
                print(f"task-runner queues: {exc.messages}")
                return 2
            await store.queues.put(args.name, changes)
    settings_by_name = {q.name: q for q in await store.queues.all()}
    counts = await store.queues.counts()
    names = sorted(set(settings_by_name) | set(counts))
    if not names:
        print("no queues")
        return 0
    width = max(len("queue"), *(len(n) for n in names)) + 2
    print(
        f"{'queue':<{width}}{'state':<8}{'rate':>9}{'burst':>7}{'concurrency':>13}"
        f"{'waiting':>10}{'running':>9}{'complete':>10}{'failed':>8}"
    )
    for name in names:
        q = settings_by_name.get(name)
        by_state = counts.get(name, {})
        rate = "-" if q is None or q.rate is None else f"{q.rate:g}/s"
        burst = "-" if q is None or q.rate is None else str(q.burst)
        concurrency = "-" if q is None or q.concurrency is None else str(q.concurrency)
        state = "paused" if q is not None and q.paused else "active"
        print(
            f"{name:<{width}}{state:<8}{rate:>9}{burst:>7}{concurrency:>13}"
            f"{by_state.get('NOTSTARTED', 0):>10}{by_state.get('STARTED', 0):>9}"
            f"{by_state.get('COMPLETE', 0):>10}{by_state.get('FAILED', 0):>8}"
        )
    return 0
