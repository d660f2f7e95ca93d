"""Settings: one frozen dataclass, read from the environment and checked at start-up."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("uvloop", "asyncio")
# TASK_RUNNER_* variables that are read but are not fields of Settings.
OTHER_VARIABLES: frozenset[str] = frozenset()


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


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the API, the workers and the ops tools can be told."""

    mongodb_url: str | None = None
    database: str = "task_runner"
    host: str = "0.0.0.0"
    port: int = 3030
    concurrency: int = 10
    bar_url: str = DEFAULT_BAR_URL
    bar_timeout: float = 10.0
    foo_seconds: float = 3.0
    heartbeat_interval: float = 2.0
    stale_after: float = 12.0
    max_attempts: int = 3
    retry_base: float = 1.0
    retry_max: float = 300.0
    max_poll_interval: float = 5.0
    shutdown_grace: float = 20.0
    allow_delete_all: bool = False
    local_db_port: int = 27018
    local_db_path: str = ".task-runner-data"
    workers: int = 2
    log_level: str = "INFO"
    db_timeout: float = 5.0
    max_body_bytes: int = 65536
    max_page_size: int = 1000
    request_timeout: float = 30.0
    # Secrets: kept out of repr so they never reach a log line or a traceback.
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    auth_reads: bool = False
    change_streams: bool = True
    schedule_interval: float = 5.0
    clock_skew: float = 0.0
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_cache: float = 5.0
    task_modules: tuple[str, ...] = ()
    task_timeout: float | None = None
    idempotency_ttl: float = 86400.0
    retention: float = 7 * 24 * 3600.0
    # "name=N" entries, normalised to a lowercase name; see `limits`.
    type_limits: tuple[str, ...] = ()
    event_loop: str = "uvloop"

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_ranges()
        self._check_choice("log_level", LOG_LEVELS)
        self._check_choice("log_format", LOG_FORMATS)
        self._check_choice("event_loop", EVENT_LOOPS)
        self._check_type_limits()
        if not self.bar_url.startswith(("http://", "https://")):
            raise SettingsError("{bar_url} must be an http:// or https:// URL", "bar_url")
        if self.mongodb_url is not None and not self.mongodb_url.startswith(
            ("mongodb://", "mongodb+srv://")
        ):
            raise SettingsError(
                "{mongodb_url} must start with mongodb:// or mongodb+srv://", "mongodb_url"
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """One of `choices` in any letter case; stored as the choice is spelt."""
        given = str(getattr(self, name))
        for choice in choices:
            if given.lower() == choice.lower():
                object.__setattr__(self, name, choice)
                return
        raise SettingsError(f"{{{name}}} must be one of {', '.join(choices)}, not {given!r}", name)

    def _check_type_limits(self) -> None:
        """Each entry `name=positive int`, each type once; stored as `name=N`, lowercase."""
        seen: dict[str, int] = {}
        for entry in self.type_limits:
            match = _TYPE_LIMIT.fullmatch(str(entry).strip())
            if match is None or int(match["limit"]) < 1:
                raise SettingsError(
                    f"{{type_limits}}: {entry!r} is not type=N with N a positive integer "
                    '(e.g. "bar=2,foo=10")',
                    "type_limits",
                )
            name = match["name"].lower()
            if name in seen:
                raise SettingsError(f"{{type_limits}} names {name!r} twice", "type_limits")
            seen[name] = int(match["limit"])
        object.__setattr__(self, "type_limits", tuple(f"{k}={v}" for k, v in seen.items()))

    @property
    def limits(self) -> dict[str, int]:
        """How many tasks of each limited type may run at once in the whole fleet."""
        return {name: int(n) for name, _, n in (e.partition("=") for e in self.type_limits)}

    def _check_numbers(self) -> None:
        # NaN passes every `<= 0` test and an infinite interval never fires: refuse both.
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if (
                spec.type in ("float", "int", "int | None", "float | None")
                and value is not None
                and not math.isfinite(value)
            ):
                raise SettingsError(f"{{{spec.name}}} must be a finite number", spec.name)
        for name in (
            "bar_timeout",
            "heartbeat_interval",
            "stale_after",
            "max_poll_interval",
            "retry_base",
            "retry_max",
            "db_timeout",
            "request_timeout",
            "metrics_cache",
            "idempotency_ttl",
            "schedule_interval",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{{{name}}} must be greater than 0", name)
        for name in ("concurrency", "max_attempts", "workers", "max_body_bytes", "max_page_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{{{name}}} must be at least 1", name)
        if self.task_timeout is not None and self.task_timeout <= 0:
            raise SettingsError("{task_timeout} must be greater than 0", "task_timeout")
        for name in ("foo_seconds", "shutdown_grace", "retention"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{{{name}}} must not be negative", name)
        for name in ("port", "local_db_port", "metrics_port"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < 65536:
                raise SettingsError(f"{{{name}}} must be a TCP port (1-65535)", name)

    def _check_ranges(self) -> None:
        # A worker that misses two heartbeats in a row must not be declared dead.
        if self.stale_after < 3 * self.heartbeat_interval:
            raise SettingsError(
                f"{{stale_after}} ({self.stale_after:g}) must be at least three times "
                f"{{heartbeat_interval}} ({self.heartbeat_interval:g})",
                "stale_after",
                "heartbeat_interval",
            )
        if self.max_page_size > 1000:
            raise SettingsError("{max_page_size} must be at most 1000", "max_page_size")
        if self.retry_max < self.retry_base:
            raise SettingsError(
                "{retry_max} must be at least {retry_base}", "retry_max", "retry_base"
            )

    def __repr__(self) -> str:
        # The URL may carry a password, and tokens never appear: a repr may reach a log.
        shown = {
            spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.repr
        }
        if self.mongodb_url is not None:
            shown["mongodb_url"] = redact(self.mongodb_url)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def local_db_url(self) -> str:
        """The URL of the embedded local server that `task-runner db` / `dev` start."""
        return f"mongodb://127.0.0.1:{self.local_db_port}/?directConnection=true"

    @property
    def effective_mongodb_url(self) -> str:
        """MONGODB_URL when set, else the embedded local server's URL."""
        return self.mongodb_url or self.local_db_url

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        names: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Read every setting from the environment, then apply non-None overrides (CLI flags).

        `names` maps fields to how the user gave them (a flag such as `--stale-after`), so
        a bad value is reported under the name the user typed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            raw = env.get(env_name(spec.name))
            if overrides.get(spec.name) is None and raw is not None and raw.strip() != "":
                values[spec.name] = _parse(spec.name, str(spec.type), raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except SettingsError as exc:
            raise exc.rename(names or {}) from None


HELP: dict[str, str] = {
    "mongodb_url": "MongoDB URL; unset means the embedded local server (task-runner db)",
    "database": "database name",
    "host": "address the API listens on",
    "port": "port the API listens on",
    "concurrency": "tasks one worker process runs at once",
    "bar_url": "URL the Bar task GETs",
    "bar_timeout": "seconds before the Bar task's request times out",
    "foo_seconds": "seconds the Foo task sleeps",
    "heartbeat_interval": "seconds between a worker's heartbeats",
    "stale_after": "seconds without a heartbeat before a task is recovered (>= 3 intervals)",
    "max_attempts": "default cap on attempts per task (a task may set its own)",
    "retry_base": "seconds before the first retry of a failed task (doubles each attempt)",
    "retry_max": "longest wait in seconds between retries",
    "max_poll_interval": "longest an idle worker sleeps before looking for due tasks",
    "shutdown_grace": "seconds running tasks get to finish after SIGTERM",
    "allow_delete_all": "let DELETE / remove every task (testing only)",
    "local_db_port": "port of the embedded local database server",
    "local_db_path": "directory where the embedded local database keeps its data",
    "workers": "worker processes `task-runner dev` starts",
    "log_level": "how much to log",
    "log_format": "text (one line per event) or json (one JSON object per line)",
    "metrics_port": "port a worker serves its Prometheus /metrics on (off when unset)",
    "metrics_cache": "seconds the API caches the queue figures it serves on /metrics",
    "task_modules": "comma-separated modules that define task types (see Writing a task type)",
    "task_timeout": "seconds a run may take unless the task or its type says (unset: no limit)",
    "idempotency_ttl": "seconds an Idempotency-Key is remembered",
    "retention": "seconds COMPLETE and FAILED tasks are kept after they finish (0: for ever)",
    "type_limits": "type=N,...: at most N tasks of the type run at once in the whole fleet",
    "schedule_interval": "seconds between a worker's looks for schedule occurrences to make",
    "db_timeout": "seconds to wait for the database before giving up on a call",
    "max_body_bytes": "largest request body the API accepts",
    "clock_skew": "testing only: shift this process's clock by this many seconds",
    "max_page_size": "largest `limit` GET /tasks accepts",
    "request_timeout": "seconds an API request may take before it is answered 503",
    "api_tokens": "comma-separated bearer tokens; when set, writes need one",
    "auth_reads": "with API tokens set, reads need a token too",
    "change_streams": "wake idle workers through a change stream (else: poll only)",
    "event_loop": "a worker's asyncio event loop: uvloop (faster) or asyncio (the standard one)",
}


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return "MONGODB_URL" if field == "mongodb_url" else f"TASK_RUNNER_{field.upper()}"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per TASK_RUNNER_* variable that is no setting, naming the closest one."""
    env = os.environ if environ is None else environ
    known = {env_name(spec.name) for spec in dataclasses.fields(Settings)} | OTHER_VARIABLES
    warnings = []
    for name in sorted(env):
        if not name.upper().startswith("TASK_RUNNER_") or name in known:
            continue
        # Compare what follows the prefix, which every name shares.
        suffixes = {k.removeprefix("TASK_RUNNER_"): k for k in known if k.startswith("TASK_")}
        close = [
            suffixes[match]
            for match in difflib.get_close_matches(
                name.upper().removeprefix("TASK_RUNNER_"), sorted(suffixes), n=1, cutoff=0.6
            )
        ]
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    if "MONGODB_URL" not in env:
        for alias in ("MONGODB_URI", "MONGO_URL", "MONGO_URI"):
            if alias in env:
                warnings.append(f"{alias} is ignored; did you mean MONGODB_URL?")
    return warnings


def is_known_variable(name: str) -> bool:
    """True for the environment variable of a setting (or one the service reads otherwise)."""
    known = {env_name(spec.name) for spec in dataclasses.fields(Settings)} | OTHER_VARIABLES
    return name in known


_TYPE_LIMIT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(?P<limit>[0-9]{1,9})")
_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/?#\s]*):[^@/?#\s]*@"
)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


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


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "int | None": int,
    "float": _parse_float,
    "float | None": _parse_float,
    "bool": _parse_bool,
    "str": str,
    "str | None": str,
    "tuple[str, ...]": lambda raw: tuple(t.strip() for t in raw.split(",") if t.strip()),
}


def _parse(field: str, type_name: str, raw: str) -> Any:
    try:
        return _PARSERS[type_name](raw)
    except ValueError:
        kind = {
            "int": "an integer",
            "int | None": "an integer",
            "float": "a finite number",
            "float | None": "a finite number",
            "bool": "true or false",
        }
        shown = redact(raw) if field == "mongodb_url" else raw
        message = f"{{{field}}}={shown!r} is not {kind.get(type_name, type_name)}"
        raise SettingsError(message, field) from None
