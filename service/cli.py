"""`task-runner api|worker|db|dev|stats|recover|requeue`: every part from one command.

Settings come from the environment (see service.config); each command's flags override them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.config import HELP, Settings, SettingsError, env_name

logger = logging.getLogger("service.cli")

DB_FIELDS = ("mongodb_url", "database", "db_timeout", "log_level")
TASK_FIELDS = ("max_attempts",)
API_FIELDS = (
    *DB_FIELDS,
    *TASK_FIELDS,
    "host",
    "port",
    "allow_delete_all",
    "max_body_bytes",
    "max_page_size",
    "request_timeout",
    "auth_reads",
)
WORKER_FIELDS = (
    *DB_FIELDS,
    "concurrency",
    "bar_url",
    "bar_timeout",
    "foo_seconds",
    "heartbeat_interval",
    "stale_after",
    "retry_base",
    "retry_max",
    "max_poll_interval",
    "shutdown_grace",
    "clock_skew",
    "change_streams",
)
LOCAL_DB_FIELDS = ("local_db_port", "local_db_path", "log_level")
OPS_FIELDS = (*DB_FIELDS, "stale_after")


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        if field.name not in names:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"{HELP[field.name]} [env {env_name(field.name)}; default {default}]"
        if field.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(
                flag, type=kind, default=None, help=help_text, metavar=field.name.upper()
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="task-runner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, fields: Sequence[str]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_setting_flags(sub, fields)
        return sub

    command("api", "serve the HTTP API", API_FIELDS)
    command("worker", "run one worker process", WORKER_FIELDS)
    command("db", "run the embedded local database server (SecantusDB) alone", LOCAL_DB_FIELDS)
    command(
        "dev",
        "local database (unless MONGODB_URL is set), API and workers together",
        (*API_FIELDS, *WORKER_FIELDS, *LOCAL_DB_FIELDS, "workers"),
    )
    command("stats", "counts by state and type, oldest due task, stale tasks", OPS_FIELDS)
    recover = command("recover", "list and recover tasks stuck in STARTED", OPS_FIELDS)
    recover.add_argument("--dry-run", action="store_true", help="list only; change nothing")
    requeue = command("requeue", "put a FAILED task back in the queue, due now", DB_FIELDS)
    requeue.add_argument("id", help="the task id")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    return Settings.from_env(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `task-runner` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        sys.exit(f"task-runner: bad setting: {exc}")
    _configure_logging(settings.log_level)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "api": _run_api,
        "worker": _run_worker,
        "db": _run_db,
        "dev": _run_dev,
        "stats": _ops(_stats),
        "recover": _ops(_recover),
        "requeue": _ops(_requeue),
    }
    sys.exit(handlers[args.command](settings, args))


def _run_api(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from service.app import create_app

    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda message: logger.info("%s", message.strip()),
    )
    return 0


def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    from service import worker

    asyncio.run(worker.serve(settings))
    return 0


def _run_db(settings: Settings, args: argparse.Namespace) -> int:
    from service.localdb import LocalDatabase

    db = LocalDatabase(port=settings.local_db_port, path=settings.local_db_path)
    db.start()
    print(f"local database listening: MONGODB_URL={db.url}", flush=True)
    try:
        assert db.process is not None
        return _supervise([db.process])
    finally:
        db.stop()


def _run_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on one terminal; Ctrl-C stops the children gracefully, then the database."""
    from service.localdb import LocalDatabase

    db = None
    env = dict(os.environ)
    if settings.mongodb_url is None:
        db = LocalDatabase(port=settings.local_db_port, path=settings.local_db_path)
        db.start()
    env["MONGODB_URL"] = settings.effective_mongodb_url
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            env[env_name(field.name)] = str(value)
    env.setdefault(env_name("allow_delete_all"), "true")
    children = [_spawn(["api"], env)] + [_spawn(["worker"], env) for _ in range(settings.workers)]
    logger.info(
        "dev: API on http://127.0.0.1:%d and %d worker(s); Ctrl-C stops",
        settings.port,
        settings.workers,
    )
    try:
        return _supervise(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if db is not None:
            db.stop()


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl-C reaches only this parent, which forwards one SIGTERM,
    # so workers drain gracefully instead of seeing two signals.
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command], env=env, start_new_session=True
    )


def _supervise(children: list[subprocess.Popen[bytes]]) -> int:
    """Forward SIGINT/SIGTERM to the children as SIGTERM; if one dies, stop the rest.

    Returns 0 after a requested stop, 1 when a child ended on its own.
    """
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        logger.info("stopping (%s)", "gracefully" if signals == 1 else "now")
        _terminate(children)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while any(child.poll() is None for child in children):
        if not signals and any(child.poll() is not None for child in children):
            logger.error("a process exited unexpectedly; stopping the others")
            signals = 1
            _terminate(children)
            _wait(children)
            return 1
        time.sleep(0.2)
    return 0 if signals else 1


def _terminate(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)


def _wait(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.wait()


def _ops(
    command: Callable[[Any, Settings, argparse.Namespace], Awaitable[int]],
) -> Callable[[Settings, argparse.Namespace], int]:
    """Run an ops command with a store; a database that does not answer exits 1 with a message."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        return asyncio.run(_with_store(command, settings, args))

    return run


async def _with_store(
    command: Callable[[Any, Settings, argparse.Namespace], Awaitable[int]],
    settings: Settings,
    args: argparse.Namespace,
) -> int:
    from service.clock import DbClock
    from service.errors import DatabaseUnavailable, TaskNotFound
    from service.store import TaskStore, open_client

    client = open_client(
        settings.effective_mongodb_url, timeout=settings.db_timeout, appname="task-runner-ops"
    )
    store = TaskStore(client, database=settings.database, clock=DbClock())
    try:
        await store.sync_clock()
        return await command(store, settings, args)
    except DatabaseUnavailable as exc:
        print(
            f"task-runner: cannot reach the database at {settings.effective_mongodb_url}: {exc}",
            file=sys.stderr,
        )
        return 1
    except TaskNotFound as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()


async def _stats(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    stats = await store.stats(settings.stale_after)
    print(f"{'state':<12}{'type':<6}{'count':>10}")
    for (state, task_type), count in sorted(stats.by_state_and_type.items()):
        print(f"{state:<12}{task_type:<6}{count:>10}")
    if stats.oldest_due is None:
        print("oldest due task: none")
    else:
        late = (store.clock.now() - stats.oldest_due.run_at).total_seconds()
        print(
            f"oldest due task: {stats.oldest_due.id} ({stats.oldest_due.type.value}), "
            f"due {late:.1f}s ago"
        )
    print(f"stale STARTED tasks (no heartbeat for {settings.stale_after:g}s): {stats.stale}")
    return 0


async def _recover(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    stale = await store.find_stale(settings.stale_after)
    if not stale:
        print(f"no stale tasks (threshold {settings.stale_after:g}s)")
        return 0
    for task in stale:
        silent = (store.clock.now() - task.heartbeat_at).total_seconds()
        print(
            f"{task.id} {task.type.value} attempt {task.attempts}/{task.max_attempts} "
            f"worker {task.worker} silent {silent:.1f}s"
        )
    if args.dry_run:
        print(f"{len(stale)} stale task(s); dry run, nothing changed")
        return 0
    moved = await store.recover_stale(settings.stale_after, only=[t.id for t in stale])
    print(f"recovered {moved} task(s): back to NOTSTARTED, or FAILED where attempts ran out")
    return 0


async def _requeue(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    from service.errors import TaskNotFound

    try:
        task = await store.requeue(args.id)
    except TaskNotFound:
        print(f"task-runner: no FAILED task with id {args.id!r}", file=sys.stderr)
        return 1
    print(f"{task.id} requeued: NOTSTARTED, due now, attempts reset")
    return 0


if __name__ == "__main__":
    main()
