"""`task-runner api` and `task-runner worker`: one API instance, one worker process."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from service.config import Settings, redact
from service.errors import DatabaseRefused

if TYPE_CHECKING:
    from service.plugins import Registry

logger = logging.getLogger(__name__)


def task_types(settings: Settings, command: str) -> Registry | None:
    """The task types, or None after saying in one line why they could not be loaded."""
    from service.plugins import PluginError, load_registry

    try:
        registry = load_registry(settings.task_modules)
    except PluginError as exc:
        print(f"task-runner {command}: {exc}", file=sys.stderr)
        return None
    unknown = sorted(set(settings.limits) - set(registry.names))
    if unknown:
        print(
            f"task-runner {command}: TASK_RUNNER_TYPE_LIMITS names {', '.join(unknown)}, "
            f"which is no task type here (the types: {', '.join(registry.names)})",
            file=sys.stderr,
        )
        return None
    return registry


def run_api(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the HTTP API until stopped; 1 when its address cannot be listened on."""
    from aiohttp import web

    from service.web.app import create_app

    registry = task_types(settings, "api")
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
        print(f"task-runner api: {cannot_listen(settings, exc)}", file=sys.stderr)
        return 1
    except DatabaseRefused as exc:
        print(f"task-runner api: {refused(settings, exc)}", file=sys.stderr)
        return 1
    return 0


def refused(settings: Settings, exc: DatabaseRefused) -> str:
    """The database's refusal in one line, naming the URL without its password."""
    return f"{exc} at {redact(settings.effective_mongodb_url)}; check the user and password"


def cannot_listen(settings: Settings, exc: OSError) -> str:
    """Why the API's address cannot be listened on, and what to do about it."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return (
        f"cannot listen on {settings.host}:{settings.port}: {reason.lower()}; stop what holds "
        "the port, or choose another with --port (TASK_RUNNER_PORT)"
    )


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run one worker process until stopped, on the configured event loop."""
    import asyncio

    from service.worker.main import serve
    from service.worker.metrics import MetricsPortUnusable

    registry = task_types(settings, "worker")
    if registry is None:
        return 2
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if settings.event_loop == "uvloop":
        # libuv's loop: less CPU per task than asyncio's (docs/performance.md).
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
        run(serve(settings, registry=registry))
    except MetricsPortUnusable as exc:
        print(f"task-runner worker: {exc}", file=sys.stderr)
        return 1
    except DatabaseRefused as exc:
        print(f"task-runner worker: {refused(settings, exc)}", file=sys.stderr)
        return 1
    return 0
