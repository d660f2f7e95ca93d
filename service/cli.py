# ruff: noqa: E402  (a Ctrl-C is caught before the other imports run; see _EARLY)
"""`task-runner api|worker|db|dev|stats|workers|schedules|recover|requeue`: every part.

Settings come from environment variables; a command's flags override them. Every setting,
its variable and its default are listed in the README, section "Running the parts".
"""

from __future__ import annotations

import signal
import sys

# From its first instant, the `task-runner` command only notes a Ctrl-C until a command
# takes over its signals: a KeyboardInterrupt while the modules below load would print a
# traceback, and nothing has been started yet. (Not when imported by other code.)
_EARLY: list[int] = []
# Started in the background by a shell script, SIGINT is ignored: it stays so.
_SIGINT_IGNORED = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
if not _SIGINT_IGNORED and (__name__ == "__main__" or sys.argv[0].endswith("task-runner")):
    signal.signal(signal.SIGINT, lambda signum, frame: _EARLY.append(signum))

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from service.config import (
    LOG_LEVELS,
    Settings,
    SettingsError,
    declared,
    env_name,
    is_known_variable,
    redact,
    unknown_variables,
)

if TYPE_CHECKING:
    from service.localdb import LocalDatabase

logger = logging.getLogger("service.cli")

DB_FIELDS = ("mongodb_url", "database", "db_timeout", "log_level", "log_format")
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
    "metrics_cache",
    "task_modules",
    "idempotency_ttl",
    "type_limits",
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
    "schedule_interval",
    "metrics_port",
    "task_modules",
    "task_timeout",
    "retention",
    "type_limits",
    "event_loop",
)
LOCAL_DB_FIELDS = ("local_db_port", "local_db_path", "log_level", "log_format")
OPS_FIELDS = (*DB_FIELDS, "stale_after", "heartbeat_interval")
# What `dev` changes from the defaults: it serves this machine only, for testing.
DEV_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "allow_delete_all": True}
SETTINGS_DOC = (
    "Each flag overrides its environment variable. Every setting, its variable and its "
    'default: README.md, section "Running the parts".'
)
# How long children get beyond their own grace period, and after a second Ctrl-C.
STOP_MARGIN = 10.0
HURRY = 5.0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line that names the flag, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _comma_separated(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _shown(value: object) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


HELP = {spec.name: spec.help for spec in declared()}


def _add_setting_flags(
    parser: argparse.ArgumentParser, names: Sequence[str], defaults: dict[str, Any]
) -> None:
    standard = Settings()
    for field in dataclasses.fields(Settings):
        if field.name not in names:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = defaults.get(field.name, getattr(standard, field.name))
        help_text = f"{HELP[field.name]} [{env_name(field.name)}; default {_shown(default)}]"
        help_text = help_text.replace("%", "%%")
        if field.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif field.name == "log_level":
            parser.add_argument(
                flag, type=str.upper, choices=LOG_LEVELS, default=None, help=help_text
            )
        else:
            kinds: dict[str, Callable[[str], Any]] = {
                "int": int,
                "int | None": int,
                "float": float,
                "float | None": float,
                "tuple[str, ...]": _comma_separated,
            }
            kind = kinds.get(str(field.type), str)
            parser.add_argument(
                flag, type=kind, default=None, help=help_text, metavar=field.name.upper()
            )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("task-runner")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="task-runner", description=__doc__)
    parser.add_argument("--version", action="version", version=f"task-runner {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help_text: str, fields: Sequence[str], defaults: dict[str, Any] | None = None
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=SETTINGS_DOC)
        _add_setting_flags(sub, fields, defaults or {})
        return sub

    command("api", "serve the HTTP API", API_FIELDS)
    command("worker", "run one worker process", WORKER_FIELDS)
    command("db", "run the embedded local database server (SecantusDB) alone", LOCAL_DB_FIELDS)
    command(
        "dev",
        "local database (unless MONGODB_URL is set), API and workers together, for trying "
        "the service on this machine: the API listens on 127.0.0.1 and allows DELETE / "
        "unless told otherwise",
        (*API_FIELDS, *WORKER_FIELDS, *LOCAL_DB_FIELDS, "workers"),
        DEV_DEFAULTS,
    )
    command("stats", "counts by state and type, oldest due task, stale tasks", OPS_FIELDS)
    command("workers", "the worker processes, alive or gone, and the tasks each holds", OPS_FIELDS)
    command("schedules", "the recurring schedules and their next occurrences", DB_FIELDS)
    recover = command("recover", "list and recover tasks stuck in STARTED", OPS_FIELDS)
    recover.add_argument("--dry-run", action="store_true", help="list only; change nothing")
    requeue = command("requeue", "put a FAILED task back in the queue, due now", DB_FIELDS)
    requeue.add_argument("id", help="the task id")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    names = {
        name: "--" + name.replace("_", "-")
        for name, value in overrides.items()
        if value is not None
    }
    if args.command == "dev":
        for name, value in DEV_DEFAULTS.items():
            if overrides[name] is None and not os.environ.get(env_name(name), "").strip():
                overrides[name] = value
    return Settings.from_env(names=names, **overrides)


def _url_problem(url: str | None) -> str | None:
    """What is wrong with a MongoDB URL (redacted), or None. SRV URLs need DNS: not here."""
    if url is None or url.startswith("mongodb+srv://"):
        return None
    from pymongo.errors import PyMongoError
    from pymongo.uri_parser import parse_uri

    try:
        parse_uri(url, warn=True)  # unknown options: a warning, as the client gives
    except (ValueError, PyMongoError) as exc:
        return redact(str(exc))
    return None


def _configure_logging(settings: Settings) -> None:
    from service import logs

    logs.configure(settings)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `task-runner` console script."""
    try:
        sys.exit(_main(argv))
    except KeyboardInterrupt:
        # Ctrl-C before a command took over its signals: nothing of ours is running yet.
        sys.exit(130)


def _main(argv: Sequence[str] | None) -> int:
    if _EARLY:
        return 130
    # From here on a Ctrl-C raises KeyboardInterrupt (caught in `main`) until a command
    # installs its own handling.
    if not _SIGINT_IGNORED:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _EARLY:
        return 130
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"task-runner: bad setting: {exc}", file=sys.stderr)
        return 2
    if (problem := _url_problem(settings.mongodb_url)) is not None:
        flag = "--mongodb-url" if args.mongodb_url is not None else "MONGODB_URL"
        print(f"task-runner: bad setting: {flag}: {problem}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    for warning in unknown_variables():
        logger.warning("%s", warning)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "api": _run_api,
        "worker": _run_worker,
        "db": _run_db,
        "dev": _run_dev,
        "stats": _ops(_stats),
        "workers": _ops(_workers),
        "schedules": _ops(_schedules),
        "recover": _ops(_recover),
        "requeue": _ops(_requeue),
    }
    return handlers[args.command](settings, args)


def _task_types(settings: Settings, command: str) -> Any:
    """The task types (service.plugins.Registry), or None after saying in one line why they
    could not be loaded."""
    from service.plugins import PluginError, load_registry

    try:
        return load_registry(settings.task_modules)
    except PluginError as exc:
        print(f"task-runner {command}: {exc}", file=sys.stderr)
        return None


def _run_api(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from service.app import create_app

    registry = _task_types(settings, "api")
    if registry is None:
        return 2
    try:
        web.run_app(
            create_app(settings, registry=registry),
            host=settings.host,
            port=settings.port,
            access_log=None,
            print=lambda message: logger.info("%s", message.strip()),
        )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        print(f"task-runner api: {_cannot_listen(settings, exc)}", file=sys.stderr)
        return 1
    return 0


def _cannot_listen(settings: Settings, exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return (
        f"cannot listen on {settings.host}:{settings.port}: {reason.lower()}; stop what holds "
        "the port, or choose another with --port (TASK_RUNNER_PORT)"
    )


def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from service import worker
    from service.worker_metrics import MetricsPortUnusable

    registry = _task_types(settings, "worker")
    if registry is None:
        return 2
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if settings.event_loop == "uvloop":
        # libuv's loop: up to 15% less CPU per task than asyncio's (README, Performance).
        try:
            import uvloop
        except ImportError:
            print(
                "task-runner worker: TASK_RUNNER_EVENT_LOOP is uvloop, which is not installed "
                "here; install it or set TASK_RUNNER_EVENT_LOOP=asyncio",
                file=sys.stderr,
            )
            return 2
        run = uvloop.run
    try:
        run(worker.serve(settings, registry=registry))
    except MetricsPortUnusable as exc:
        print(f"task-runner worker: {exc}", file=sys.stderr)
        return 1
    return 0


class _Signals:
    """SIGINT and SIGTERM, counted rather than raised: whatever `db` and `dev` are doing
    (starting a child, waiting for one), they look at the count at safe points and stop
    what they started, so an interruption never leaves a child without its parent."""

    def __init__(self) -> None:
        self.count = 0
        for signum in (signal.SIGTERM,) if _SIGINT_IGNORED else (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1

    def requested(self) -> bool:
        """True once a stop was asked for."""
        return self.count > 0


@dataclasses.dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]

    def __str__(self) -> str:
        return f"{self.name} (pid {self.process.pid})"


class _Stack:
    """The processes `db` or `dev` started: watched while they run, stopped in order."""

    def __init__(self, signals: _Signals, *, grace: float) -> None:
        self.signals = signals
        self.grace = grace
        self.children: list[_Child] = []
        self.db: LocalDatabase | None = None

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        # Own session: a terminal's Ctrl-C reaches only this parent, which stops the
        # children in order (clients first, the database last).
        process = subprocess.Popen([*_task_runner(), *command], env=env, start_new_session=True)
        self.children.append(_Child(name, process))

    def watched(self) -> list[_Child]:
        db = (
            []
            if self.db is None or self.db.process is None
            else [_Child("database", self.db.process)]
        )
        return db + self.children

    def check(self) -> None:
        """Raise _Stop when a stop was asked for or a child has ended."""
        if self.signals.requested():
            raise _Stop(0)
        for child in self.watched():
            if child.process.poll() is not None:
                from service.localdb import exit_description

                logger.error(
                    "%s exited unexpectedly (%s); stopping the others",
                    child,
                    exit_description(child.process),
                )
                raise _Stop(1)

    def supervise(self) -> int:
        """Wait until a stop is asked for (0) or a child ends on its own (1)."""
        try:
            while True:
                self.check()
                time.sleep(0.1)
        except _Stop as stop:
            return stop.status

    def stop(self) -> None:
        """Stop the children (SIGTERM, their grace period), then the database.

        A second signal asks the children to stop now, a third or the end of the grace
        period kills them; nothing started here outlives this call.
        """
        running = [c for c in self.children if c.process.poll() is None]
        if running or self.db is not None:
            logger.info("stopping%s", "; Ctrl-C again to stop now" if running else "")
        self._stop(running, self.grace + STOP_MARGIN)
        if self.db is not None and self.db.process is not None:
            self._stop([_Child("database", self.db.process)], 15.0)
            self.db.stop(kill=True)

    def _stop(self, children: list[_Child], patience: float) -> None:
        _send(children, signal.SIGTERM)
        seen = self.signals.count
        deadline = time.monotonic() + patience
        while any(c.process.poll() is None for c in children):
            if self.signals.count > seen:
                # Once more: a worker stops at once on its second signal; a third is SIGKILL.
                seen = self.signals.count
                logger.info("stopping now")
                _send(children, signal.SIGTERM)
                deadline = min(deadline, time.monotonic() + (0 if seen >= 3 else HURRY))
            if time.monotonic() >= deadline:
                for child in children:
                    if child.process.poll() is None:
                        logger.warning("%s did not stop in time; killing it", child)
                        _kill_group(child.process)
                break
            time.sleep(0.05)
        for child in children:
            child.process.wait()


class _Stop(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _send(children: list[_Child], signum: int) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signum)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _task_runner() -> list[str]:
    """The installed `task-runner` command: never a `service` folder of the working directory."""
    script = Path(sys.executable).with_name("task-runner")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-P", "-m", "service.cli"]


def _run_db(settings: Settings, args: argparse.Namespace) -> int:
    from service.localdb import LocalDatabase, LocalDatabaseError, StartInterrupted

    signals = _Signals()
    stack = _Stack(signals, grace=0)
    db = LocalDatabase(port=settings.local_db_port, path=settings.local_db_path)
    logger.info(
        "starting the local database on port %d, data in %s",
        settings.local_db_port,
        settings.local_db_path,
    )
    try:
        db.start(interrupted=signals.requested)
    except StartInterrupted:
        return 0
    except LocalDatabaseError as exc:
        print(f"task-runner db: {exc}", file=sys.stderr)
        return 1
    stack.db = db
    try:
        print(f"local database listening: MONGODB_URL={db.url}", flush=True)
        return stack.supervise()
    finally:
        stack.stop()


def _run_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on one terminal; Ctrl-C stops the children gracefully, then the database."""
    from service.localdb import LocalDatabaseError, StartInterrupted

    signals = _Signals()
    stack = _Stack(signals, grace=settings.shutdown_grace)
    try:
        _start_dev(settings, args, stack)
    except _Stop as stop:
        stack.stop()
        return stop.status
    except StartInterrupted:
        stack.stop()
        return 0
    except (LocalDatabaseError, _CannotListen) as exc:
        stack.stop()
        print(f"task-runner dev: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        stack.stop()
        raise
    try:
        return stack.supervise()
    finally:
        stack.stop()


class _CannotListen(Exception):
    """The API's address is taken (or not ours to take)."""


def _start_dev(settings: Settings, args: argparse.Namespace, stack: _Stack) -> None:
    from service.localdb import LocalDatabase

    _check_can_listen(settings)
    if settings.mongodb_url is None:
        logger.info(
            "dev: starting the local database on port %d, data in %s",
            settings.local_db_port,
            settings.local_db_path,
        )
        db = LocalDatabase(port=settings.local_db_port, path=settings.local_db_path)
        db.start(interrupted=stack.signals.requested)
        stack.db = db
    else:
        logger.info("dev: using the database at %s", redact(settings.mongodb_url))
    env = _child_env(settings, args)
    logger.info("dev: starting the API and %d worker(s)", settings.workers)
    stack.spawn("api", ["api"], env)
    metrics = _dev_metrics_ports(settings)
    for number, port in enumerate(metrics, start=1):
        stack.check()
        stack.spawn(f"worker {number}", ["worker"], {**env, env_name("metrics_port"): str(port)})
    _wait_listening(settings, stack)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    for number, port in enumerate(metrics, start=1):
        logger.info("dev: worker %d metrics on http://%s:%d/metrics", number, shown, port)
    where = "this machine only" if settings.host.startswith("127.") else "every interface"
    logger.info(
        "dev: API on http://%s:%d (%s), %d worker(s), database %s; Ctrl-C stops",
        "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host,
        settings.port,
        where,
        settings.workers,
        redact(settings.effective_mongodb_url),
    )


def _dev_metrics_ports(settings: Settings) -> list[int]:
    """A metrics port for each worker: from --metrics-port on, one each, or free ports."""
    from service.localdb import free_port

    if settings.metrics_port is not None:
        return [settings.metrics_port + n for n in range(settings.workers)]
    return [free_port() for _ in range(settings.workers)]


def _check_can_listen(settings: Settings) -> None:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise _CannotListen(_cannot_listen(settings, exc)) from None


def _wait_listening(settings: Settings, stack: _Stack, timeout: float = 60.0) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check()
        try:
            with socket.create_connection((host, settings.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    logger.warning("dev: the API is not answering after %gs; still waiting", timeout)


def _child_env(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    # Unknown TASK_RUNNER_* variables were reported once, here; the children need not repeat it.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TASK_RUNNER_") or is_known_variable(k)
    }
    env["MONGODB_URL"] = settings.effective_mongodb_url
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if field.name in DEV_DEFAULTS:
            value = getattr(settings, field.name)
        if value is not None:
            env[env_name(field.name)] = _shown(value)
    return env


def _ops(
    command: Callable[[Any, Settings, argparse.Namespace], Awaitable[int]],
) -> Callable[[Settings, argparse.Namespace], int]:
    """Run an ops command with a store; a database that does not answer exits 1 with a message."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        import asyncio

        return asyncio.run(_with_store(command, settings, args))

    return run


async def _with_store(
    command: Callable[[Any, Settings, argparse.Namespace], Awaitable[int]],
    settings: Settings,
    args: argparse.Namespace,
) -> int:
    from pymongo.errors import ConfigurationError

    from service.clock import DbClock
    from service.errors import DatabaseUnavailable, TaskNotFound, TaskRunnerError
    from service.store import TaskStore, open_client

    url = settings.effective_mongodb_url
    try:
        client = open_client(url, timeout=settings.db_timeout, appname="task-runner-ops")
    except ConfigurationError as exc:
        print(f"task-runner: bad setting: MONGODB_URL: {redact(str(exc))}", file=sys.stderr)
        return 2
    store = TaskStore(client, database=settings.database, clock=DbClock())
    try:
        await store.sync_clock()
        return await command(store, settings, args)
    except DatabaseUnavailable as exc:
        print(f"task-runner: cannot reach the database at {redact(url)}: {exc}", file=sys.stderr)
        return 1
    except (TaskNotFound, TaskRunnerError) as exc:
        print(f"task-runner: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()


def _ago(store: Any, moment: object) -> str:
    if not isinstance(moment, datetime):
        return "unknown"
    return f"{(store.clock.now() - moment).total_seconds():.1f}s"


async def _stats(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    stats = await store.stats(settings.stale_after)
    print(f"{'state':<12}{'type':<6}{'count':>10}")
    for (state, task_type), count in sorted(
        stats.by_state_and_type.items(), key=lambda item: tuple(map(str, item[0]))
    ):
        print(f"{state!s:<12}{task_type!s:<6}{count:>10}")
    oldest = stats.oldest_due
    if oldest is None:
        print("oldest due task: none")
    else:
        print(
            f"oldest due task: {oldest.id} ({oldest.type!s}), due {_ago(store, oldest.run_at)} ago"
        )
    print(f"unreadable documents: {stats.unreadable}")
    print(f"stale STARTED tasks (no heartbeat for {settings.stale_after:g}s): {stats.stale}")
    return 0


async def _workers(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    workers = await store.list_workers(settings.stale_after)
    if not workers:
        print("no workers registered")
        return 0
    width = max(len("worker"), *(len(w.id) for w in workers)) + 2
    print(
        f"{'worker':<{width}}{'state':<7}{'seen':>8}  {'running':>9}  {'version':<10}"
        f"{'metrics':<9}{'up since':<21}tasks held"
    )
    for w in workers:
        seen = "never" if w.seconds_since_seen is None else f"{w.seconds_since_seen:.1f}s"
        load = f"{w.running}/{'?' if w.concurrency is None else w.concurrency}"
        port = "-" if w.metrics_port is None else str(w.metrics_port)
        since = "unknown" if w.started_at is None else w.started_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{w.id:<{width}}{'alive' if w.alive else 'gone':<7}{seen:>8}  {load:>9}  "
            f"{w.version or '?':<10}{port:<9}{since:<21}{' '.join(w.tasks) or '-'}"
        )
    alive = sum(w.alive for w in workers)
    print(
        f"{len(workers)} worker(s): {alive} alive, {len(workers) - alive} gone "
        f"(silent for over {settings.stale_after:g}s)"
    )
    return 0


async def _schedules(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    schedules = await store.list_schedules(limit=settings.max_page_size)
    if not schedules:
        print("no schedules")
        return 0
    print(f"{'schedule':<26}{'type':<10}{'state':<9}{'missed':<8}{'next occurrence':<26}when")
    for s in schedules:
        when = f"every {s.every:g}s" if s.every is not None else f"cron {s.cron} {s.timezone}"
        state = "paused" if s.paused else ("active" if s.next_at is not None else "ended")
        following = "-" if s.next_at is None else s.next_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        print(f"{s.id:<26}{s.type:<10}{state:<9}{s.missed:<8}{following:<26}{when}")
    print(f"{len(schedules)} schedule(s)")
    return 0


async def _recover(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    stale = await store.find_stale(settings.stale_after)
    if not stale:
        print(f"no stale tasks (threshold {settings.stale_after:g}s)")
        return 0
    for task in stale:
        print(
            f"{task.id} {task.type!s} attempt {task.attempts}/{task.max_attempts} "
            f"worker {task.worker} silent {_ago(store, task.heartbeat_at)}"
        )
    if args.dry_run:
        print(f"{len(stale)} stale task(s); dry run, nothing changed")
        return 0
    moved = await store.recover_stale(settings.stale_after, only=[t.id for t in stale])
    outcomes = {"NOTSTARTED": 0, "FAILED": 0}
    for task in stale:
        outcome = await _outcome(store, task)
        print(f"{task.id} {outcome}")
        for state in outcomes:
            outcomes[state] += outcome.startswith(f"-> {state}")
    print(
        f"recovered {moved} task(s): {outcomes['NOTSTARTED']} back to NOTSTARTED, "
        f"{outcomes['FAILED']} FAILED (attempts used up)"
    )
    return 0


async def _outcome(store: Any, before: Any) -> str:
    """What recovery did to a task, judged from its state now."""
    from service.errors import TaskNotFound

    try:
        now = await store.get(before.id)
    except TaskNotFound:
        return "deleted meanwhile"
    state = str(now.state)
    if state == "STARTED" and now.lease == before.lease:
        return "not recovered: its worker was heard from again"
    if state == "STARTED":
        return f"-> NOTSTARTED, and already claimed again by {now.worker}"
    if state == "FAILED" and now.finished_at != before.finished_at:
        return "-> FAILED: attempts used up"
    if state == "NOTSTARTED":
        return "-> NOTSTARTED: back in the queue"
    return f"not recovered: {state} meanwhile"


async def _requeue(store: Any, settings: Settings, args: argparse.Namespace) -> int:
    from service.errors import InvalidTaskId, TaskNotFound, TaskNotRequeueable

    try:
        task = await store.requeue(args.id)
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


if __name__ == "__main__":
    main()
