"""Logging set-up for every command: text lines, or one JSON object per line on stderr.

JSON lines carry `time` (UTC, ISO 8601), `level`, `logger`, `message` and `pid`, plus the
`extra` fields of the call: task events add `task_id`, `type`, `attempt`, `duration`,
`worker`, `outcome`; the API's access log (service.middlewares.AccessLog) `method`,
`path`, `route`, `status`, `duration`, `remote`, `bytes`. What tasks print stays plain, on
stdout.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from pythonjsonlogger.json import JsonFormatter

from service.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for `text` or `json`."""
    if log_format != "json":
        return logging.Formatter(TEXT_FORMAT)
    return JsonFormatter(
        ["levelname", "name", "message", "process"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp="time",
    )


def configure(settings: Settings) -> None:
    """Log to stderr at the configured level and format (TASK_RUNNER_LOG_FORMAT)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    if settings.log_format == "json":
        # Warnings and a crash's traceback become log records too: every stderr line JSON.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("service").critical("uncaught exception", exc_info=(kind, exc, tb))
