"""`main`: the arguments and the settings checked, logging set up, then the command run."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from service.cli import bulk, dev, early, parser, printers, queues, servers
from service.config import Settings, SettingsError, redact, unknown_variables

logger = logging.getLogger(__name__)

Command = Callable[[Settings, argparse.Namespace], int]
# What runs each command of service.config.COMMANDS (the parser lists them in that order).
COMMANDS: dict[str, Command] = {
    "api": servers.run_api,
    "worker": servers.run_worker,
    "db": dev.run_db,
    "dev": dev.run_dev,
    "stats": printers.runner(printers.stats),
    "workers": printers.runner(printers.workers),
    "schedules": printers.runner(printers.schedules),
    "queues": printers.runner(queues.queues),
    "recover": printers.runner(printers.recover),
    "requeue": bulk.requeue_command,
    "delete": bulk.delete_command,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `task-runner` console script."""
    try:
        sys.exit(_main(argv))
    except KeyboardInterrupt:
        # Ctrl-C before a command took over its signals: nothing of ours is running yet.
        sys.exit(130)


def _main(argv: Sequence[str] | None) -> int:
    if early.NOTED:
        return 130
    # From here on a Ctrl-C raises KeyboardInterrupt (caught in `main`) until a command
    # installs its own handling.
    if not early.SIGINT_IGNORED:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if early.NOTED:
        return 130
    args = parser.build().parse_args(argv)
    try:
        settings = parser.settings_from(args)
    except SettingsError as exc:
        print(f"task-runner: bad setting: {exc}", file=sys.stderr)
        return 2
    if (problem := _url_problem(settings.mongodb_url)) is not None:
        flag = "--mongodb-url" if getattr(args, "mongodb_url", None) is not None else "MONGODB_URL"
        print(f"task-runner: bad setting: {flag}: {problem}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    for warning in unknown_variables():
        logger.warning("%s", warning)
    return COMMANDS[args.command](settings, args)


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
