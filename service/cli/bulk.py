"""`task-runner requeue --state/--type/--tag/...` and `task-runner delete ...`: the bulk
actions of service.ops on the tasks a filter matches, round after round until none is left.

The filter is checked before the database is opened: a usage error is exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from service import ops
from service.config import Settings
from service.errors import InvalidFilter
from service.models import State, TaskFilter

if TYPE_CHECKING:
    from service.store import Store

# Seconds each call to service.ops may go on starting batches before it reports: the
# command prints how far it got after each round, then goes on.
ROUND_SECONDS = 5.0
UNIX_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
FLAGS = {
    "state": "--state",
    "type": "--type",
    "tag": "--tag",
    "finished_before": "--finished-before",
    "finished_after": "--finished-after",
    "filter": "the filter",
}


def _time(raw: str) -> datetime:
    """ISO 8601 with a UTC offset, or Unix seconds in ASCII digits (as the API takes them)."""
    try:
        parsed = (
            datetime.fromtimestamp(float(raw), UTC)
            if UNIX_SECONDS.fullmatch(raw)
            else datetime.fromisoformat(raw)
        )
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not ISO 8601 (2026-01-31T12:00:00Z) or Unix seconds"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{raw!r} needs a UTC offset (Z or +02:00)")
    return parsed.astimezone(UTC)


def _name(raw: str) -> str:
    if not raw:
        raise argparse.ArgumentTypeError("must not be empty")
    return raw


def _state(raw: str) -> State:
    for state in State:
        if state.value == raw.upper():
            return state
    raise argparse.ArgumentTypeError(f"{raw!r}: choose from {', '.join(State)}")


def add_filter_flags(parser: argparse.ArgumentParser, *, states: str) -> None:
    """The filter's flags; `states` says which states the command takes."""
    group = parser.add_argument_group("filter (every flag given must match)")
    group.add_argument("--state", type=_state, metavar="STATE", help=states)
    group.add_argument("--type", type=_name, help="task type, any letter case")
    group.add_argument("--tag", type=_name, help="one of the task's tags")
    group.add_argument(
        "--finished-after",
        type=_time,
        metavar="TIME",
        help="finished at or after TIME (ISO 8601 with a UTC offset, or Unix seconds)",
    )
    group.add_argument("--finished-before", type=_time, metavar="TIME", help="finished before TIME")


def task_filter(args: argparse.Namespace) -> TaskFilter:
    """The filter the command's flags give."""
    return TaskFilter(
        state=args.state,
        type=args.type,
        tag=args.tag,
        finished_before=args.finished_before,
        finished_after=args.finished_after,
    )


def _described(task_filter: TaskFilter) -> str:
    given = {name: value for name, value in vars(task_filter).items() if value is not None}
    return " ".join(
        f"{name}={value.isoformat() if isinstance(value, datetime) else value}"
        for name, value in given.items()
    )


def _refused(command: str, exc: InvalidFilter) -> int:
    for field, problem in exc.problems.items():
        print(f"task-runner {command}: {FLAGS.get(field, field)}: {problem}", file=sys.stderr)
    return 2


def requeue_command(settings: Settings, args: argparse.Namespace) -> int:
    """`task-runner requeue ID` (one FAILED task), or with filter flags instead of an id,
    every task they match."""
    from service.cli import printers

    given = task_filter(args)
    if args.id is not None:
        if not given.empty:
            print("task-runner requeue: give a task id or filter flags, not both", file=sys.stderr)
            return 2
        return printers.runner(printers.requeue)(settings, args)
    if given.empty:
        print(
            "task-runner requeue: give a task id, or filter flags (--state, --type, --tag, "
            "--finished-before, --finished-after; see --help)",
            file=sys.stderr,
        )
        return 2
    try:
        ops.requeue_states(given)
    except InvalidFilter as exc:
        return _refused("requeue", exc)
    return printers.runner(requeue_matching)(settings, args)


def delete_command(settings: Settings, args: argparse.Namespace) -> int:
    """`task-runner delete` with filter flags: every task they match but the STARTED ones."""
    from service.cli import printers

    try:
        ops.delete_states(task_filter(args))
    except InvalidFilter as exc:
        return _refused("delete", exc)
    return printers.runner(delete_matching)(settings, args)


async def requeue_matching(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """Requeue what the filter matches, round after round; print the count."""
    given = task_filter(args)

    async def action() -> ops.Bulk:
        return await ops.requeue_matching(store, given, within=ROUND_SECONDS)

    total = await _rounds("requeued", action)
    print(f"requeued {total} task(s) ({_described(given)}): NOTSTARTED, due now, attempts reset")
    return 0


async def delete_matching(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    """Delete what the filter matches, round after round; print the count."""
    given = task_filter(args)

    async def action() -> ops.Bulk:
        return await ops.delete_matching(store, given, within=ROUND_SECONDS)

    total = await _rounds("deleted", action)
    print(f"deleted {total} task(s) ({_described(given)}); STARTED tasks are left alone")
    return 0


async def _rounds(verb: str, action: Callable[[], Awaitable[ops.Bulk]]) -> int:
    """Call `action` until it says nothing is left, printing how far each round got."""
    total = 0
    while True:
        done = await action()
        total += done.count
        if not done.more:
            return total
        print(f"{verb} {total} task(s) so far; going on", flush=True)
