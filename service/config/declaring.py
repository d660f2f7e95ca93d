"""How a setting is declared and read: `setting()` with its Section, Bound and Kind, and
`Setting`, the view of one declaration that the env reader, the CLI and the docs read.

Standard library only: everything else builds on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Every command, in the order the docs list them; the ops commands, and those of them that
# judge which tasks are stale (they take the heartbeat settings too).
OPS = ("stats", "workers", "schedules", "queues", "recover", "requeue", "delete")
STALENESS = ("stats", "workers", "recover")
COMMANDS = ("api", "worker", "db", "dev", *OPS)
# `dev` runs the local database, the API and workers: it takes every flag they take.
DEV_RUNS = ("api", "worker", "db")


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable.

    The message is a template whose `{field}` placeholders are filled with each field's
    environment variable, or with the flag the user typed (see `rename`).
    """

    def __init__(self, template: str, *fields: str) -> None:
        super().__init__(template)
        self.template = template
        self.fields = fields
        self.names: dict[str, str] = {}

    def rename(self, names: Mapping[str, str]) -> SettingsError:
        """Name these fields differently (a flag instead of the variable); returns self."""
        self.names.update(names)
        return self

    def __str__(self) -> str:
        message = self.template
        for name in self.fields:
            message = message.replace("{" + name + "}", self.names.get(name, env_name(name)))
        return message


def shown(value: object) -> str:
    """A setting's value as a person (and its environment variable) writes it."""
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def env_value(value: object) -> str:
    """A value as its environment variable holds it, for the env reader to read it back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return "MONGODB_URL" if field == "mongodb_url" else f"TASK_RUNNER_{field.upper()}"


_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/?#\s]*):[^@/?#\s]*@"
)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


@dataclass(frozen=True)
class Bound:
    """A limit on a number; a value outside it is refused with `{field} <message>`."""

    holds: Callable[[float], bool]
    message: str
    shown: str  # in the docs' type column


POSITIVE = Bound(lambda value: value > 0, "must be greater than 0", "> 0")
AT_LEAST_ONE = Bound(lambda value: value >= 1, "must be at least 1", ">= 1")
NOT_NEGATIVE = Bound(lambda value: value >= 0, "must not be negative", ">= 0")
PORT = Bound(lambda value: 0 < value < 65536, "must be a TCP port (1-65535)", "1-65535")
# The order bounds are checked in: the first value out of bounds is the one reported.
BOUNDS = (POSITIVE, AT_LEAST_ONE, NOT_NEGATIVE, PORT)


@dataclass(frozen=True)
class Section:
    """A group of settings in docs/configuration.md, and the commands that take them."""

    title: str  # its heading
    intro: str
    commands: tuple[str, ...]  # (dev: see DEV_RUNS)


@dataclass(frozen=True, kw_only=True)
class Declaration:
    """What `setting()` records beside a field's default and type."""

    help: str
    section: Section
    commands: tuple[str, ...]  # the commands that take it as a flag (dev: see DEV_RUNS)
    choices: tuple[str, ...] = ()  # any letter case accepted, stored as spelt here
    bound: Bound | None = None  # checked when the value is not None
    dev_default: object = None  # what `dev` uses when neither variable nor flag is given


T = TypeVar("T")


def setting(
    default: T,
    section: Section,
    help: str,
    *,
    commands: tuple[str, ...] | None = None,
    choices: tuple[str, ...] = (),
    bound: Bound | None = None,
    dev_default: object = None,
    secret: bool = False,
) -> T:
    """Declare a field of Settings, taken as a flag by its section's commands unless
    `commands` says otherwise; `secret` keeps its value out of repr (and so out of logs)."""
    declared = Declaration(
        help=help,
        section=section,
        commands=section.commands if commands is None else commands,
        choices=choices,
        bound=bound,
        dev_default=dev_default,
    )
    return field(default=default, repr=not secret, metadata={"setting": declared})


@dataclass(frozen=True)
class Kind:
    """What a setting's value is: how its text is read and how the docs name it."""

    name: str  # in the docs' type column
    what: str  # in the message for a value that is not one: "is not <what>"
    parse: Callable[[str], Any]  # text -> value; ValueError when it is not one
    numeric: bool = False


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def comma_separated(raw: str) -> tuple[str, ...]:
    """`a, b,,c` -> ("a", "b", "c")."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


INTEGER = Kind("integer", "an integer", int, numeric=True)
NUMBER = Kind("number", "a finite number", _parse_float, numeric=True)
BOOLEAN = Kind("true or false", "true or false", _parse_bool)
TEXT = Kind("text", "text", str)
TEXTS = Kind("comma-separated list", "a list", comma_separated)
_KINDS: dict[object, Kind] = {int: INTEGER, float: NUMBER, bool: BOOLEAN, str: TEXT}


def kind_of(annotation: object) -> tuple[Kind, bool]:
    """The kind of an annotation such as `float | None`, and whether it may be unset."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return kind_of(inner)[0], True
    if annotation == tuple[str, ...]:
        return TEXTS, False
    if annotation in _KINDS:
        return _KINDS[annotation], False
    raise TypeError(f"no setting can be a {annotation}: declare its Kind here")


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting as declared: the field, its kind and its Declaration, and its names."""

    name: str
    kind: Kind
    optional: bool  # may be unset (None)
    default: object
    declaration: Declaration

    @property
    def env(self) -> str:
        """Its environment variable."""
        return env_name(self.name)

    @property
    def flag(self) -> str:
        """Its command-line flag (taken by the commands in `commands`)."""
        return "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        return self.declaration.help

    @property
    def section(self) -> Section:
        return self.declaration.section

    @property
    def choices(self) -> tuple[str, ...]:
        return self.declaration.choices

    @property
    def bound(self) -> Bound | None:
        return self.declaration.bound

    @property
    def commands(self) -> tuple[str, ...]:
        """Every command that takes its flag: the declared ones, and `dev` (see DEV_RUNS)."""
        declared = set(self.declaration.commands)
        if declared & set(DEV_RUNS):
            declared.add("dev")
        return tuple(command for command in COMMANDS if command in declared)

    @property
    def dev_default(self) -> object:
        """What `dev` uses when neither its variable nor its flag is given (None: the default)."""
        return self.declaration.dev_default

    def default_for(self, command: str) -> object:
        """Its default for `command`: `dev` changes a few (see `dev_default`)."""
        if command == "dev" and self.dev_default is not None:
            return self.dev_default
        return self.default

    def parse(self, raw: str) -> Any:
        """The value of its variable's text; SettingsError naming the variable when bad."""
        try:
            return self.kind.parse(raw)
        except ValueError:
            shown = redact(raw) if self.name == "mongodb_url" else raw
            message = f"{{{self.name}}}={shown!r} is not {self.kind.what}"
            raise SettingsError(message, self.name) from None


def declarations(settings: type[Any]) -> tuple[Setting, ...]:
    """Every setting of a dataclass of `setting()` fields, in the order of declaration."""
    hints = typing.get_type_hints(settings)
    found = []
    for spec in dataclasses.fields(settings):
        kind, optional = kind_of(hints[spec.name])
        found.append(
            Setting(
                name=spec.name,
                kind=kind,
                optional=optional,
                default=spec.default,
                declaration=spec.metadata["setting"],
            )
        )
    return tuple(found)
