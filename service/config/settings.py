"""Settings: every setting declared once, read from the environment, checked at start-up.

A setting is one field of `Settings` declared with `setting()` (service.config.declaring):
its type (the annotation), default, help, docs section and the commands that take it as a
flag. The environment reader (`Settings.from_env`), the commands' flags and `--help`
(service.cli.parser) and docs/configuration.md (service.config.docs) are generated from it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.config.declaring import (
    AT_LEAST_ONE,
    BOUNDS,
    NOT_NEGATIVE,
    OPS,
    PORT,
    POSITIVE,
    STALENESS,
    Section,
    Setting,
    SettingsError,
    declarations,
    redact,
    setting,
)

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("uvloop", "asyncio")
# POST /tasks/batch takes a body up to this many times TASK_RUNNER_MAX_BODY_BYTES.
BATCH_BODY_FACTOR = 16
# TASK_RUNNER_* variables that are read but are not fields of Settings.
OTHER_VARIABLES: frozenset[str] = frozenset()


DATABASE = Section("Database", "Where the tasks are kept.", ("api", "worker", *OPS))
API = Section("API", "The HTTP API, `task-runner api`.", ("api",))
WORKER = Section("Worker", "A worker process, `task-runner worker`.", ("worker",))
TASK_TYPES = Section(
    "Task types", "What the API and the workers both load and enforce.", ("api", "worker")
)
LOCAL_DATABASE = Section(
    "Local database", "The embedded local server that `task-runner db` starts.", ("db",)
)
DEV = Section(
    "Dev",
    "`task-runner dev` runs the local database, the API and workers together: it takes every "
    "flag they take, and these.",
    ("dev",),
)
LOGGING = Section("Logging", "What every command logs, and how.", ("api", "worker", "db", *OPS))


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the API, the workers and the ops tools can be told."""

    mongodb_url: str | None = setting(
        None, DATABASE, "MongoDB URL; unset means the embedded local server (`task-runner db`)"
    )
    database: str = setting("task_runner", DATABASE, "database name")
    db_timeout: float = setting(
        5.0, DATABASE, "seconds to wait for the database before a call gives up", bound=POSITIVE
    )

    host: str = setting("0.0.0.0", API, "address the API listens on", dev_default="127.0.0.1")
    port: int = setting(3030, API, "port the API listens on", bound=PORT)
    allow_delete_all: bool = setting(
        False, API, "let `DELETE /` remove every task (testing only)", dev_default=True
    )
    max_attempts: int = setting(
        3, API, "default cap on attempts per task (a task may set its own)", bound=AT_LEAST_ONE
    )
    max_body_bytes: int = setting(
        65536,
        API,
        "largest request body the API accepts (413 beyond); POST /tasks/batch takes "
        f"{BATCH_BODY_FACTOR} times this",
        bound=AT_LEAST_ONE,
    )
    max_page_size: int = setting(
        1000, API, "largest `limit` GET /tasks accepts (at most 1000)", bound=AT_LEAST_ONE
    )
    request_timeout: float = setting(
        30.0, API, "seconds an API request may take before it is answered 503", bound=POSITIVE
    )
    api_tokens: tuple[str, ...] = setting(
        (),
        API,
        "comma-separated bearer tokens; when set, writes need one",
        commands=(),
        secret=True,
    )
    auth_reads: bool = setting(False, API, "with API tokens set, reads need a token too")
    idempotency_ttl: float = setting(
        86400.0,
        API,
        "seconds an Idempotency-Key is remembered; after that the key creates anew",
        bound=POSITIVE,
    )
    metrics_cache: float = setting(
        5.0, API, "seconds the API caches the queue figures it serves on /metrics", bound=POSITIVE
    )

    concurrency: int = setting(
        10, WORKER, "tasks one worker process runs at once", bound=AT_LEAST_ONE
    )
    heartbeat_interval: float = setting(
        2.0,
        WORKER,
        "seconds between a worker's heartbeats (fractions allowed)",
        commands=("worker", *STALENESS),
        bound=POSITIVE,
    )
    stale_after: float = setting(
        12.0,
        WORKER,
        "seconds without a heartbeat before a task is recovered (>= 3 intervals)",
        commands=("worker", *STALENESS),
        bound=POSITIVE,
    )
    retry_base: float = setting(
        1.0,
        WORKER,
        "seconds before the first retry of a failed task (doubles each attempt, 50-100% jitter)",
        bound=POSITIVE,
    )
    retry_max: float = setting(
        300.0, WORKER, "longest wait in seconds between retries", bound=POSITIVE
    )
    max_poll_interval: float = setting(
        5.0, WORKER, "longest an idle worker sleeps before looking for due tasks", bound=POSITIVE
    )
    change_streams: bool = setting(
        True, WORKER, "wake idle workers through a change stream (else: poll only)"
    )
    shutdown_grace: float = setting(
        20.0, WORKER, "seconds running tasks get to finish after SIGTERM", bound=NOT_NEGATIVE
    )
    task_timeout: float | None = setting(
        None,
        WORKER,
        "seconds a run may take unless the task or its type says (unset: no limit)",
        bound=POSITIVE,
    )
    schedule_interval: float = setting(
        15.0,
        WORKER,
        "seconds between a worker's looks for schedule occurrences to make tasks for, a little "
        "ahead of them; the API makes those of a new or resumed schedule's first look "
        "(docs/schedules.md)",
        commands=("api", "worker"),
        bound=POSITIVE,
    )
    retention: float = setting(
        7 * 24 * 3600.0,
        WORKER,
        "seconds COMPLETE and FAILED tasks are kept after they finish (7 days); 0: for ever",
        bound=NOT_NEGATIVE,
    )
    metrics_port: int | None = setting(
        None,
        WORKER,
        "port a worker serves its Prometheus /metrics on, at TASK_RUNNER_HOST's address (unset: "
        "none; `dev` gives each worker one)",
        bound=PORT,
    )
    event_loop: str = setting(
        "uvloop",
        WORKER,
        "a worker's asyncio event loop: uvloop (libuv's, faster; docs/performance.md) or asyncio "
        "(the standard library's)",
        choices=EVENT_LOOPS,
    )
    bar_url: str = setting(DEFAULT_BAR_URL, WORKER, "URL the Bar task GETs")
    bar_timeout: float = setting(
        10.0, WORKER, "seconds before the Bar task's request times out", bound=POSITIVE
    )
    foo_seconds: float = setting(3.0, WORKER, "seconds the Foo task sleeps", bound=NOT_NEGATIVE)
    signing_secret: str | None = setting(
        None,
        WORKER,
        "whsec_ followed by base64: signs every request of http tasks and callbacks per "
        "Standard Webhooks (docs/calling-services.md); unset: requests go unsigned",
        commands=(),
        secret=True,
    )
    clock_skew: float = setting(
        0.0, WORKER, "testing only: shift this process's clock by this many seconds"
    )

    task_modules: tuple[str, ...] = setting(
        (),
        TASK_TYPES,
        "comma-separated modules that define task types, loaded after the built-ins and "
        "entry points (docs/task-types.md)",
    )
    # "name=N" entries, normalised to a lowercase name; see `limits`.
    type_limits: tuple[str, ...] = setting(
        (),
        TASK_TYPES,
        "type=N,... (e.g. bar=2,foo=10): at most N tasks of the type run at once in the whole "
        "fleet; types not listed are unlimited; give every worker the same value "
        "(docs/limits.md)",
    )
    http_allow_networks: tuple[str, ...] = setting(
        (),
        TASK_TYPES,
        "comma-separated CIDRs (e.g. 10.1.0.0/16,127.0.0.0/8) that http tasks and callbacks may "
        "reach although loopback, private, link-local or otherwise internal "
        "(docs/calling-services.md); give the API and every worker the same value",
    )

    local_db_port: int = setting(
        27018, LOCAL_DATABASE, "port of the embedded local database server", bound=PORT
    )
    local_db_path: str = setting(
        ".task-runner-data",
        LOCAL_DATABASE,
        "directory where the embedded local database keeps its data",
    )
    workers: int = setting(2, DEV, "worker processes `task-runner dev` starts", bound=AT_LEAST_ONE)

    log_level: str = setting("INFO", LOGGING, "how much to log", choices=LOG_LEVELS)
    log_format: str = setting(
        "text",
        LOGGING,
        "text (one line per event) or json (one JSON object per line, on stderr); `dev` passes "
        "it to its children",
        choices=LOG_FORMATS,
    )

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_ranges()
        for spec in declared():
            if spec.choices:
                self._check_choice(spec.name, spec.choices)
        self._check_type_limits()
        self._check_outbound()
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

    def _check_outbound(self) -> None:
        """The signing secret is whsec_ + base64; each allowed network a CIDR."""
        if self.signing_secret is not None:
            raw = self.signing_secret.removeprefix("whsec_")
            try:
                key = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if not self.signing_secret.startswith("whsec_") or not key:
                raise SettingsError(
                    "{signing_secret} must be whsec_ followed by base64 (as Standard Webhooks "
                    "defines it)",
                    "signing_secret",
                )
        for entry in self.http_allow_networks:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise SettingsError(
                    f"{{http_allow_networks}}: {entry!r} is not a network (e.g. 10.0.0.0/8)",
                    "http_allow_networks",
                ) from None

    @property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """TASK_RUNNER_HTTP_ALLOW_NETWORKS, parsed."""
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.http_allow_networks)

    @property
    def limits(self) -> dict[str, int]:
        """How many tasks of each limited type may run at once in the whole fleet."""
        return {name: int(n) for name, _, n in (e.partition("=") for e in self.type_limits)}

    def _check_numbers(self) -> None:
        # NaN passes every `<= 0` test and an infinite interval never fires: refuse both.
        numbers = [spec for spec in declared() if spec.kind.numeric]
        for spec in numbers:
            value = getattr(self, spec.name)
            if value is not None and not math.isfinite(value):
                raise SettingsError(f"{{{spec.name}}} must be a finite number", spec.name)
        for bound in BOUNDS:
            for spec in numbers:
                value = getattr(self, spec.name)
                if spec.bound is bound and value is not None and not bound.holds(value):
                    raise SettingsError(f"{{{spec.name}}} {bound.message}", spec.name)

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
    def max_batch_body_bytes(self) -> int:
        """The largest body POST /tasks/batch accepts."""
        return self.max_body_bytes * BATCH_BODY_FACTOR

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
        for spec in declared():
            raw = env.get(spec.env)
            if overrides.get(spec.name) is None and raw is not None and raw.strip() != "":
                values[spec.name] = spec.parse(raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except SettingsError as exc:
            raise exc.rename(names or {}) from None


@functools.cache
def declared() -> tuple[Setting, ...]:
    """Every setting, in the order of its declaration in Settings."""
    return declarations(Settings)


def _known() -> set[str]:
    return {spec.env for spec in declared()} | OTHER_VARIABLES


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per TASK_RUNNER_* variable that is no setting, naming the closest one."""
    env = os.environ if environ is None else environ
    known = _known()
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
    return name in _known()


_TYPE_LIMIT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(?P<limit>[0-9]{1,9})")
