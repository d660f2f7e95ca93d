"""`task-runner db` (the embedded local database alone) and `task-runner dev` (the local
database unless MONGODB_URL is set, the API and workers, on one terminal)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from service.cli.servers import cannot_listen
from service.cli.supervisor import Signals, Stack, Stop
from service.config import Settings, declared, env_name, env_value, is_known_variable, redact

logger = logging.getLogger(__name__)


def run_db(settings: Settings, args: argparse.Namespace) -> int:
    """Run the embedded local database until stopped."""
    from service.localdb import LocalDatabase, LocalDatabaseError, StartInterrupted

    signals = Signals()
    stack = Stack(signals, grace=0)
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


def run_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Everything on one terminal; Ctrl-C stops the children gracefully, then the database."""
    from service.localdb import LocalDatabaseError, StartInterrupted

    signals = Signals()
    stack = Stack(signals, grace=settings.shutdown_grace)
    try:
        _start(settings, args, stack)
    except Stop as stop:
        stack.stop()
        return stop.status
    except StartInterrupted:
        stack.stop()
        return 0
    except (LocalDatabaseError, CannotListen) as exc:
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


class CannotListen(Exception):
    """The API's address is taken (or not ours to take)."""


def _start(settings: Settings, args: argparse.Namespace, stack: Stack) -> None:
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
    env = child_env(settings, args)
    logger.info("dev: starting the API and %d worker(s)", settings.workers)
    stack.spawn("api", ["api"], env)
    metrics = _metrics_ports(settings)
    for number, port in enumerate(metrics, start=1):
        stack.check()
        stack.spawn(f"worker {number}", ["worker"], {**env, env_name("metrics_port"): str(port)})
    _wait_listening(settings, stack)
    shown_host = _reachable_host(settings)
    for number, port in enumerate(metrics, start=1):
        logger.info("dev: worker %d metrics on http://%s:%d/metrics", number, shown_host, port)
    where = "this machine only" if settings.host.startswith("127.") else "every interface"
    logger.info(
        "dev: API on http://%s:%d (%s), %d worker(s), database %s; Ctrl-C stops",
        shown_host,
        settings.port,
        where,
        settings.workers,
        redact(settings.effective_mongodb_url),
    )


def _reachable_host(settings: Settings) -> str:
    """Where this machine reaches the API: 127.0.0.1 when it listens on every interface."""
    return "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host


def _metrics_ports(settings: Settings) -> list[int]:
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
            raise CannotListen(cannot_listen(settings, exc)) from None


def _wait_listening(settings: Settings, stack: Stack, timeout: float = 60.0) -> None:
    host = _reachable_host(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check()
        try:
            with socket.create_connection((host, settings.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    logger.warning("dev: the API is not answering after %gs; still waiting", timeout)


def child_env(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    """The environment of dev's children: ours, with the flags given and dev's defaults as
    variables, and the database's URL."""
    # Unknown TASK_RUNNER_* variables were reported once, here; the children need not repeat it.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TASK_RUNNER_") or is_known_variable(k)
    }
    env["MONGODB_URL"] = settings.effective_mongodb_url
    for spec in declared():
        value = getattr(args, spec.name, None)
        if spec.dev_default is not None:
            value = getattr(settings, spec.name)
        if value is not None:
            env[spec.env] = env_value(value)
    return env
