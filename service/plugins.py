"""Task types as plugins: the public API for writing one, and how the service loads them.

A task type is an `async def run(ctx, args) -> str` (or a plain `def run`, run in a
thread) registered with `@task_type(...)`:

    from marshmallow import Schema, fields
    from service.plugins import TaskContext, task_type

    class GreetArgs(Schema):
        name = fields.String(required=True)

    @task_type("greet", args=GreetArgs, timeout=30)
    async def greet(ctx: TaskContext, args: dict[str, Any]) -> str:
        return f"Hello {args['name']} from {ctx.task_id}"

The string returned is printed on the worker's stdout and stored as the task's output.
Types come from the built-ins (service.tasks), from installed packages' entry points in the
group `task_runner.task_types`, and from the modules in TASK_RUNNER_TASK_MODULES; the API and
the workers load them the same way (`load_registry`), and any problem stops start-up with
one line (PluginError).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import bson
from marshmallow import Schema, ValidationError

from service.config import Settings

ENTRY_POINT_GROUP = "task_runner.task_types"
BUILTIN_MODULE = "service.tasks"
# Lowercase (the API accepts any case and stores lowercase), and safe in a URL path.
NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# The service's own first path segments, now and planned: a type of one of these names would
# make the earlier version's `POST /{TYPE}/{unix_seconds}` read as, or shadow, the service's
# own paths (`POST /tasks/batch` as a "tasks" task due at "batch"). A test checks that every
# literal first segment of the API's routes is here.
RESERVED_NAMES = frozenset(
    {
        "api",
        "docs",
        "events",
        "health",
        "id",
        "limits",
        "metrics",
        "openapi",
        "queues",
        "recover",
        "schedules",
        "static",
        "stats",
        "tasks",
        "taskstate",
        "ui",
        "workers",
    }
)

# `async def run(ctx, args) -> str`, or a plain `def run(ctx, args) -> str` (run in a thread).
Run = Callable[["TaskContext", Any], Awaitable[str]] | Callable[["TaskContext", Any], str]
R = TypeVar("R", bound=Run)


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """What a task's `run` is given besides its arguments, fresh for every attempt."""

    task_id: str  # the task's id, as the API shows it
    attempt: int  # 1 on the first run, 2 on the first retry, ...
    settings: Settings  # the worker's settings
    # The worker's one HTTP client, shared by every task it runs; aiohttp's hidden resend
    # of a request is off (one attempt = one request).
    http: aiohttp.ClientSession
    # The worker's client for requests to addresses a task's arguments name: it reaches only
    # destinations the network rules allow (service.destinations). None outside a worker.
    outbound: aiohttp.ClientSession | None = None
    # The W3C traceparent of the request that created the task, if it had one.
    traceparent: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskDefinition:
    """One registered task type."""

    name: str
    run: Run
    args: type[Schema] | None  # None: the type takes no arguments
    timeout: float | None  # default seconds a run may take; None: TASK_RUNNER_TASK_TIMEOUT
    module: str  # where it was defined

    def accept_args(self, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The API's check: what to store for these arguments (the schema's dump of its
        load, so it is plain JSON-like data). Raises ValidationError with the messages."""
        if self.args is None:
            if given:
                raise ValidationError(f"type {self.name} takes no arguments")
            return None
        schema = self.args()
        stored: dict[str, Any] = schema.dump(schema.load(dict(given or {})))
        try:
            bson.encode({"args": stored})
        except (bson.errors.BSONError, OverflowError, TypeError, ValueError) as exc:
            raise ValidationError(f"cannot be stored: {exc}") from None
        return stored

    def load_args(self, stored: Mapping[str, Any] | None) -> Any:
        """The worker's step: the stored arguments as `run` receives them (the schema's
        load; None for a type without a schema). Raises ArgsUnloadable."""
        if self.args is None:
            if stored:
                raise ArgsUnloadable(f"type {self.name} takes no arguments, but has {stored!r}")
            return None
        try:
            return self.args().load(dict(stored or {}))
        except ValidationError as exc:
            raise ArgsUnloadable(f"args do not load as {self.name} args: {exc.messages}") from None


class ArgsUnloadable(Exception):
    """A task's stored arguments do not load with its type's schema (any more)."""


class Retry(Exception):
    """Raised by a run: this attempt failed (the message says why) and another may follow,
    not before `after` seconds (None: the task's usual backoff). Attempts still end at
    max_attempts."""

    def __init__(self, message: str, *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class Fail(Exception):
    """Raised by a run: the task failed for good (the message says why); no retry, whatever
    attempts are left."""


class TaskTimedOut(Exception):
    """A run took longer than its time limit and was cancelled."""


class PluginError(Exception):
    """Task types could not be loaded; the message is one line naming the module or type."""


# What @task_type has seen, in order; load_registry picks from it by module.
_declared: list[TaskDefinition] = []


def task_type(
    name: str, *, args: type[Schema] | None = None, timeout: float | None = None
) -> Callable[[R], R]:
    """Register `async def run(ctx, args) -> str` as the task type `name`, or a plain
    `def run(ctx, args) -> str`, which the worker runs in a thread of its own.

    An `async def run` runs on the worker's event loop, beside every other task the worker
    runs: it must await, never block (no time.sleep, no blocking client); what blocks goes
    in a plain `def run`, or in `await asyncio.to_thread(...)`. A plain `def run` cannot be
    cancelled: past its time limit the task fails, but its thread runs on to its end.

    `name`: lowercase letters, digits, _ or -, starting with a letter, at most 64
    characters, and none of RESERVED_NAMES (the service's own path segments).
    `args`: a marshmallow Schema class the API checks a task's arguments with and the
    worker loads them with before `run` (None: the type takes none). `timeout`: the seconds
    a run may take unless the task says (None: TASK_RUNNER_TASK_TIMEOUT, unset: no limit).
    """
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(
            f"task type name {name!r} must be lowercase letters, digits, _ or -, "
            "starting with a letter, at most 64 characters"
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"task type name {name!r} is reserved: it is one of the service's own paths "
            f"({', '.join(sorted(RESERVED_NAMES))})"
        )
    if args is not None and not (isinstance(args, type) and issubclass(args, Schema)):
        raise TypeError(f"task type {name}: args must be a marshmallow Schema class")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"task type {name}: timeout must be a number of seconds above 0")

    def register(run: R) -> R:
        if not callable(run) or inspect.isasyncgenfunction(run) or inspect.isclass(run):
            raise TypeError(f"task type {name}: {run!r} is not a function def run(ctx, args)")
        definition = TaskDefinition(
            name=name,
            run=run,
            args=args,
            timeout=None if timeout is None else float(timeout),
            module=run.__module__,
        )
        _declared.append(definition)
        run.task_type = definition  # type: ignore[union-attr]
        return run

    return register


class Registry:
    """The task types one process knows, by lowercase name, in the order they were loaded."""

    def __init__(self, definitions: Iterable[TaskDefinition]) -> None:
        self._types: dict[str, TaskDefinition] = {}
        for definition in definitions:
            known = self._types.get(definition.name)
            if known is not None and known is not definition:
                raise PluginError(
                    f"task type {definition.name!r} is defined twice: in {known.module} "
                    f"and in {definition.module}"
                )
            self._types[definition.name] = definition

    @property
    def names(self) -> tuple[str, ...]:
        """Every type's name, in load order (the built-ins first)."""
        return tuple(self._types)

    def get(self, name: str) -> TaskDefinition | None:
        """The type of this name in any letter case, or None."""
        return self._types.get(name.lower())

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)


def load_registry(modules: Sequence[str] = (), *, entry_points: bool = True) -> Registry:
    """The built-in types, then those of installed packages' entry points (group
    `task_runner.task_types`), then those of `modules` (TASK_RUNNER_TASK_MODULES).

    An entry point names a module (`pkg.tasks`: every type defined in it or its
    submodules) or one registered function (`pkg.tasks:resize`). Raises PluginError: a
    module that fails to import or defines no type, an entry point that names something
    else, two types with one name.
    """
    definitions = list(_from_module(BUILTIN_MODULE, "built-in task types"))
    if entry_points:
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            definitions.extend(_from_entry_point(point))
    for name in modules:
        definitions.extend(_from_module(name, "TASK_RUNNER_TASK_MODULES"))
    return Registry(definitions)


def _from_module(name: str, source: str) -> list[TaskDefinition]:
    module = _import(name, f"task module {name!r} ({source})")
    return _defined_in(module, f"task module {name!r} ({source})")


def _import(name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        hint = ""
        if exc.name is not None and name.startswith(exc.name):
            # The module itself, not one of its imports, is what Python could not find.
            hint = (
                "; is the directory that holds it on PYTHONPATH (an absolute path) in the "
                "environment of the api and every worker?"
            )
        raise PluginError(f"{what} could not be imported: {_one_line(exc)}{hint}") from None
    except Exception as exc:
        raise PluginError(f"{what} could not be imported: {_one_line(exc)}") from None


def _defined_in(module: ModuleType, what: str) -> list[TaskDefinition]:
    prefix = module.__name__ + "."
    found = [d for d in _declared if d.module == module.__name__ or d.module.startswith(prefix)]
    if not found:
        raise PluginError(f"{what} defines no task type (no @task_type in it)")
    return found


def _from_entry_point(point: importlib.metadata.EntryPoint) -> list[TaskDefinition]:
    dist = getattr(point, "dist", None)
    what = f"entry point {point.name} = {point.value}" + (
        f" (package {dist.name})" if dist is not None else ""
    )
    try:
        loaded = point.load()
    except Exception as exc:
        raise PluginError(f"{what} could not be loaded: {_one_line(exc)}") from None
    if isinstance(loaded, ModuleType):
        return _defined_in(loaded, what)
    definition = getattr(loaded, "task_type", None)
    if isinstance(definition, TaskDefinition):
        return [definition]
    raise PluginError(f"{what} names neither a module nor a function registered with @task_type")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_task(
    definition: TaskDefinition, ctx: TaskContext, args: Any, *, time_limit: float | None
) -> str:
    """Run one task within `time_limit` seconds (None: no limit), print its output on stdout
    (flushed) and return it. Raises TaskTimedOut when the limit passes."""
    try:
        async with asyncio.timeout(time_limit) as scope:
            if inspect.iscoroutinefunction(definition.run):
                output = await definition.run(ctx, args)
            else:
                output = await asyncio.to_thread(definition.run, ctx, args)
    except TimeoutError:
        if scope.expired():
            raise TaskTimedOut(f"timed out after {time_limit:g} s") from None
        raise
    if scope.expired():  # the run swallowed its cancellation and returned
        raise TaskTimedOut(f"timed out after {time_limit:g} s")
    if not isinstance(output, str):
        raise TypeError(f"task type {definition.name} returned {type(output).__name__}, not str")
    # What a run returns is text of any kind: printed and stored as valid UTF-8 (a lone
    # surrogate would make both the print and the database write fail).
    output = output.encode("utf-8", "replace").decode("utf-8")
    print(output, flush=True)
    return output
