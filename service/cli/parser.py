"""The command line: one subcommand per part, each with a flag for every setting it takes.

The flags, their types and their `--help` come from the settings' declarations
(service.config): a setting's variable, flag, default and help are written nowhere else.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, NoReturn

from service.cli import queues
from service.cli.bulk import add_filter_flags
from service.config import COMMANDS, Setting, Settings, declared, shown
from service.config.declaring import BOOLEAN, INTEGER, NUMBER, TEXT, TEXTS, Kind, comma_separated

DESCRIPTION = (
    f"`task-runner {'|'.join(COMMANDS)}`: every part. Settings come from environment "
    "variables; a command's flags override them. Every setting, its variable and its default "
    "are listed in docs/configuration.md."
)
SETTINGS_DOC = (
    "Each flag overrides its environment variable. Every setting, its variable and its "
    "default: docs/configuration.md."
)
# What each command does, in the order `task-runner --help` lists them (COMMANDS').
HELP = {
    "api": "serve the HTTP API",
    "worker": "run one worker process",
    "db": "run the embedded local database server (SecantusDB) alone",
    "dev": "local database (unless MONGODB_URL is set), API and workers together, for trying "
    "the service on this machine: the API listens on 127.0.0.1 and allows DELETE / unless "
    "told otherwise",
    "stats": "counts by state and type, oldest due task, stale tasks",
    "workers": "the worker processes, alive or gone, and the tasks each holds",
    "schedules": "the recurring schedules and their next occurrences",
    "queues": "the queues, their settings and counts; or set, pause, resume or delete the "
    "settings of one (docs/queues.md)",
    "recover": "list and recover tasks stuck in STARTED",
    "requeue": "put a FAILED task back in the queue, due now; or, with filter flags instead "
    "of an id, every task they match",
    "delete": "delete every task a filter matches, except STARTED ones",
}
REQUEUE_STATES = "FAILED (the default) or COMPLETE, any letter case"
DELETE_STATES = "NOTSTARTED, COMPLETE or FAILED, any letter case; default: all three"
# How a flag's text is read. Numbers are not checked for finiteness here: Settings refuses
# `nan` and `inf` with the other bounds, naming the flag.
FLAG_TYPES: dict[Kind, Callable[[str], Any]] = {
    INTEGER: int,
    NUMBER: float,
    TEXT: str,
    TEXTS: comma_separated,
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line that names the flag, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from service import version

    found = version()
    return "unknown (not installed)" if found == "unknown" else found


def _spelt(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A flag's text as its choice is spelt, in any letter case (else as given: refused)."""
    spelling = {choice.lower(): choice for choice in choices}
    return lambda raw: spelling.get(raw.lower(), raw)


def add_flag(parser: argparse.ArgumentParser, spec: Setting, *, command: str) -> None:
    """The flag of one setting, with its variable and its default for `command` in its help."""
    default = shown(spec.default_for(command))
    help_text = f"{spec.help} [{spec.env}; default {default}]".replace("%", "%%")
    if spec.kind is BOOLEAN:
        action = argparse.BooleanOptionalAction
        parser.add_argument(spec.flag, action=action, default=None, help=help_text)
    elif spec.choices:
        kind = _spelt(spec.choices)
        parser.add_argument(
            spec.flag, type=kind, choices=spec.choices, default=None, help=help_text
        )
    else:
        kind = FLAG_TYPES[spec.kind]
        parser.add_argument(
            spec.flag, type=kind, default=None, help=help_text, metavar=spec.name.upper()
        )


def build() -> argparse.ArgumentParser:
    """The parser of `task-runner`: every command with the flags of the settings it takes."""
    parser = _Parser(prog="task-runner", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"task-runner {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(
            command, help=HELP[command], description=HELP[command], epilog=SETTINGS_DOC
        )
        for spec in declared():
            if command in spec.commands:
                add_flag(sub, spec, command=command)
        if command == "recover":
            sub.add_argument("--dry-run", action="store_true", help="list only; change nothing")
        if command == "requeue":
            sub.add_argument("id", nargs="?", help="the task id (or give filter flags instead)")
            add_filter_flags(sub, states=REQUEUE_STATES)
        if command == "delete":
            add_filter_flags(sub, states=DELETE_STATES)
        if command == "queues":
            queues.add_arguments(sub)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings: the environment, overridden by the flags given; bad values are reported
    under the flag when that is how they were given. `dev` changes a few defaults."""
    overrides = {spec.name: getattr(args, spec.name, None) for spec in declared()}
    names = {spec.name: spec.flag for spec in declared() if overrides[spec.name] is not None}
    if args.command == "dev":
        for spec in declared():
            given = overrides[spec.name] is not None or os.environ.get(spec.env, "").strip()
            if spec.dev_default is not None and not given:
                overrides[spec.name] = spec.dev_default
    return Settings.from_env(names=names, **overrides)
