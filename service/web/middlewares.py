"""Errors to JSON: domain errors become 4xx/503, anything unexpected a logged 500.

Every error answer has one shape: {"error": {"code", "message", "details"}}; requests that
aiohttp's own HTTP parser refuses are logged in one short line (see ProtocolLog).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from marshmallow import ValidationError

from service.config import Settings
from service.destinations import allowing
from service.errors import (
    BatchInterrupted,
    DatabaseUnavailable,
    DeleteAllDisabled,
    IdempotencyKeyReused,
    IdempotentTaskGone,
    InvalidFilter,
    InvalidTask,
    QueueNotFound,
    ScheduleNotFound,
    TaskNotFound,
    TaskNotRequeueable,
    TaskNotWaiting,
)
from service.web.common import json_response
from service.web.metrics import UNMATCHED, ApiMetrics

logger = logging.getLogger(__name__)

# aiohttp's own HTTP errors (unknown route, wrong method, body too large...) by status.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_body(code: str, message: str, *, details: Any = None) -> dict[str, Any]:
    """The one error shape: {"error": {"code", "message", "details"}}."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int, code: str, message: str, *, details: Any = None, headers: Any = None
) -> web.Response:
    """The one JSON error shape."""
    return json_response(error_body(code, message, details=details), status=status, headers=headers)


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """How a domain error is answered: its status, code, message, details and headers."""

    status: int
    code: str
    message: str
    details: Any = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        """The error shape of this refusal (as a batch item's result shows it too)."""
        return error_body(self.code, self.message, details=self.details)


def refusal(exc: Exception) -> Refusal | None:
    """The answer a domain error (or a ValidationError) gets; None for anything else."""
    if isinstance(exc, ValidationError):
        return Refusal(
            status=400,
            code="invalid_request",
            message="the request is not valid; see details",
            details=exc.messages,
        )
    if isinstance(exc, InvalidFilter):
        return Refusal(
            status=400,
            code="invalid_request",
            message="the request is not valid; see details",
            details={field: [problem] for field, problem in exc.problems.items()},
        )
    if isinstance(exc, TaskNotFound):
        return Refusal(
            status=404, code="task_not_found", message=str(exc), details={"id": exc.task_id}
        )
    if isinstance(exc, ScheduleNotFound):
        return Refusal(
            status=404, code="schedule_not_found", message=str(exc), details={"id": exc.schedule_id}
        )
    if isinstance(exc, QueueNotFound):
        return Refusal(
            status=404, code="queue_not_found", message=str(exc), details={"name": exc.name}
        )
    if isinstance(exc, TaskNotRequeueable | TaskNotWaiting):
        code = "task_not_requeueable" if isinstance(exc, TaskNotRequeueable) else "task_not_waiting"
        details = {"id": exc.task_id, "state": exc.state}
        return Refusal(status=409, code=code, message=str(exc), details=details)
    if isinstance(exc, IdempotencyKeyReused):
        return Refusal(
            status=409, code="idempotency_key_reused", message=str(exc), details={"key": exc.key}
        )
    if isinstance(exc, IdempotentTaskGone):
        details = {"id": exc.task_id, "key": exc.key}
        return Refusal(status=410, code="task_deleted", message=str(exc), details=details)
    if isinstance(exc, InvalidTask):
        return Refusal(status=400, code="invalid_task", message=str(exc))
    if isinstance(exc, DeleteAllDisabled):
        return Refusal(status=403, code="delete_all_disabled", message=str(exc))
    return _unavailable(exc)


def _unavailable(exc: Exception) -> Refusal | None:
    retry = {"Retry-After": "1"}
    if isinstance(exc, BatchInterrupted):
        details = {"stored": exc.stored, "unknown": exc.unknown}
        return Refusal(
            status=503, code="batch_interrupted", message=str(exc), details=details, headers=retry
        )
    if isinstance(exc, DatabaseUnavailable):
        return Refusal(
            status=503,
            code="database_unavailable",
            message="the database is not reachable; try again shortly",
            headers=retry,
        )
    return None


def _domain_error(exc: Exception) -> web.Response | None:
    found = refusal(exc)
    if found is None:
        return None
    return json_response(found.body(), status=found.status, headers=found.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the JSON error shape; never leak a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")
        }
        code = HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, _http_message(request, exc), headers=headers)
    except Exception as exc:
        response = _domain_error(exc)
        if response is not None:
            return response
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; it has been logged")


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    """What went wrong, in words: aiohttp's own default texts ("404: Not Found") say less."""
    if exc.text and exc.text != f"{exc.status}: {exc.reason}":
        return exc.text
    path = _printable(request.path, limit=200)
    if exc.status == 404:
        return f"no route {request.method} {path}; the routes are listed at /docs"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {path}; allowed: {allowed or 'none'}"
    return exc.reason


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/ui"})
# Pages and their static files: what they show comes from the API, with its tokens.
OPEN_PREFIXES = ("/docs/", "/ui/static/")


def timeout_middleware(settings: Settings) -> Middleware:
    """Answer 503 rather than hold a client past TASK_RUNNER_REQUEST_TIMEOUT."""

    @web.middleware
    async def timeout(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            async with asyncio.timeout(settings.request_timeout):
                return await handler(request)
        except TimeoutError:
            logger.warning(
                "%s %s took over %.1fs", request.method, request.path, settings.request_timeout
            )
            return error_response(
                503,
                "request_timeout",
                "the request took too long; retry",
                headers={"Retry-After": "1"},
            )

    return timeout


def destinations_middleware(settings: Settings) -> Middleware:
    """Open TASK_RUNNER_HTTP_ALLOW_NETWORKS to the checks of the request's URLs (an http
    task's args, a callback_url): see service.destinations."""
    networks = settings.allowed_networks

    @web.middleware
    async def destinations(request: web.Request, handler: Handler) -> web.StreamResponse:
        with allowing(networks):
            return await handler(request)

    return destinations


def auth_middleware(settings: Settings) -> Middleware:
    """With TASK_RUNNER_API_TOKENS set, writes (and reads, if asked) need a bearer token."""
    tokens = [token.encode() for token in settings.api_tokens]

    def known(token: bytes) -> bool:
        # Compare against every token, in constant time each, so timing reveals nothing.
        return any([hmac.compare_digest(token, candidate) for candidate in tokens])

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        guarded = request.method in WRITE_METHODS or settings.auth_reads
        open_path = request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES)
        if tokens and guarded and not open_path:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # A header's bytes as sent: aiohttp keeps what is not UTF-8 as surrogates.
            raw = token.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not known(raw):
                raise web.HTTPUnauthorized(
                    text="send Authorization: Bearer <token>",
                    headers={"WWW-Authenticate": 'Bearer realm="task-runner"'},
                )
        return await handler(request)

    return auth


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's connection handler uses (create_app hands it over as
    `handler_args={"logger": ...}`, aiohttp's documented way to configure it).

    A request aiohttp's HTTP parser refuses (an over-long URL or header, bytes that are not
    HTTP, a bad chunk size, Content-Length beside Transfer-Encoding) is answered 400 by
    aiohttp before any middleware runs, and logged with `logger.exception`: an ERROR and a
    traceback per request, a flood any client can cause. Here it is one short line at INFO,
    without the traceback. Every other record passes through unchanged.
    """

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Log as given, unless it is aiohttp reporting a request its parser refused."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, tuple):
            exc = exc[1]
        if not isinstance(exc, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        level = min(level, logging.INFO)
        if self.isEnabledFor(level):
            where = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s: malformed HTTP, answered 400: %s", where, one_line(exc))


def one_line(exc: HttpProcessingError, *, limit: int = 160) -> str:
    """The parser's reason, on one line of printable ASCII, cut to `limit` characters: what
    it quotes comes from the client, so it must not forge log lines or fill them."""
    text = " ".join(str(exc.message).encode("ascii", "backslashreplace").decode().split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The request's route pattern, for the access log.
ROUTE_KEY = web.RequestKey("route", str)
# Methods outside this set are counted as "other": a client cannot invent label values.
COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(request: web.Request) -> str:
    """The route's pattern (`/tasks/{id}`), never the raw path; `unmatched` when no route
    matched (404, 405): the label's values are bounded by the route table."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


def metrics_middleware(metrics: ApiMetrics) -> Middleware:
    """Count every answer and time it, by route pattern, method and status. Installed
    outermost, so it sees the status the client gets, error answers included."""

    @web.middleware
    async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        request[ROUTE_KEY] = route = route_label(request)
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # what the error middleware lets through (< 400)
            status = exc.status
            raise
        finally:
            method = request.method if request.method in COUNTED_METHODS else "other"
            metrics.observe(
                route=route,
                method=method,
                status=status,
                seconds=time.perf_counter() - started,
            )

    return measure


ACCESS_LOGGER = "service.access"
# Longest request path an access line repeats: the path comes from the client.
PATH_LIMIT = 200


def _printable(text: str, *, limit: int = PATH_LIMIT) -> str:
    text = text.encode("ascii", "backslashreplace").decode()
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AccessLog(AbstractAccessLogger):
    """One line per answered request (aiohttp's access logger interface): at INFO, so a
    level of WARNING turns it off. The raw path is cut and made printable: it is the
    client's."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the line."""
        # Set by the metrics middleware; a request the HTTP parser refused has no route.
        route = request.get(ROUTE_KEY, UNMATCHED)
        path = _printable(request.rel_url.raw_path)
        self.logger.info(
            "%s %s %d %.3fs",
            request.method,
            path,
            response.status,
            time,
            extra={
                "method": request.method,
                "path": path,
                "route": route,
                "status": response.status,
                "duration": round(time, 6),
                "remote": request.remote,
                "bytes": response.body_length,
            },
        )

    @property
    def enabled(self) -> bool:
        """Skip the work when INFO is off."""
        return self.logger.isEnabledFor(logging.INFO)
