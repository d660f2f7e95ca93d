"""Settings: one frozen dataclass, read from the environment and checked at start-up."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


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
    clock_skew: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "bar_timeout",
            "heartbeat_interval",
            "stale_after",
            "max_poll_interval",
            "retry_base",
            "retry_max",
            "db_timeout",
            "request_timeout",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{env_name(name)} must be greater than 0")
        for name in ("concurrency", "max_attempts", "workers", "max_body_bytes", "max_page_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_name(name)} must be at least 1")
        if self.foo_seconds < 0 or self.shutdown_grace < 0:
            name = "foo_seconds" if self.foo_seconds < 0 else "shutdown_grace"
            raise SettingsError(f"{env_name(name)} must not be negative")
        if not 0 < self.port < 65536 or not 0 < self.local_db_port < 65536:
            name = "port" if not 0 < self.port < 65536 else "local_db_port"
            raise SettingsError(f"{env_name(name)} must be a TCP port (1-65535)")
        # A worker that misses two heartbeats in a row must not be declared dead.
        if self.stale_after < 3 * self.heartbeat_interval:
            raise SettingsError(
                f"TASK_RUNNER_STALE_AFTER ({self.stale_after:g}) must be at least three times "
                f"TASK_RUNNER_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g})"
            )
        if self.max_page_size > 1000:
            raise SettingsError("TASK_RUNNER_MAX_PAGE_SIZE must be at most 1000")
        if self.retry_max < self.retry_base:
            raise SettingsError("TASK_RUNNER_RETRY_MAX must be at least TASK_RUNNER_RETRY_BASE")
        if not self.bar_url.startswith(("http://", "https://")):
            raise SettingsError("TASK_RUNNER_BAR_URL must be an http:// or https:// URL")
        if self.mongodb_url is not None and not self.mongodb_url.startswith(
            ("mongodb://", "mongodb+srv://")
        ):
            raise SettingsError("MONGODB_URL must start with mongodb:// or mongodb+srv://")

    @property
    def local_db_url(self) -> str:
        """The URL of the embedded local server that `task-runner db` / `dev` start."""
        return f"mongodb://127.0.0.1:{self.local_db_port}/?directConnection=true"

    @property
    def effective_mongodb_url(self) -> str:
        """MONGODB_URL when set, else the embedded local server's URL."""
        return self.mongodb_url or self.local_db_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from the environment, then apply non-None overrides (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            raw = env.get(env_name(spec.name))
            if raw is not None and raw.strip() != "":
                values[spec.name] = _parse(spec.name, str(spec.type), raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


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
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "db_timeout": "seconds to wait for the database before giving up on a call",
    "max_body_bytes": "largest request body the API accepts",
    "clock_skew": "testing only: shift this process's clock by this many seconds",
    "max_page_size": "largest `limit` GET /tasks accepts",
    "request_timeout": "seconds an API request may take before it is answered 503",
    "api_tokens": "comma-separated bearer tokens; when set, writes need one",
    "auth_reads": "with API tokens set, reads need a token too",
    "change_streams": "wake idle workers through a change stream (else: poll only)",
}


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return "MONGODB_URL" if field == "mongodb_url" else f"TASK_RUNNER_{field.upper()}"


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "str": str,
    "str | None": str,
    "tuple[str, ...]": lambda raw: tuple(t.strip() for t in raw.split(",") if t.strip()),
}


def _parse(field: str, type_name: str, raw: str) -> Any:
    try:
        return _PARSERS[type_name](raw)
    except ValueError as exc:
        message = f"{env_name(field)}={raw!r} is not a valid {type_name}: {exc}"
        raise SettingsError(message) from exc
