"""Errors to JSON: domain errors become 4xx/503, anything unexpected a logged 500.

Every error answer has one shape: {"error": {"code", "message", "details"}}.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from marshmallow import ValidationError

from service.errors import DatabaseUnavailable, DeleteAllDisabled, InvalidTask, TaskNotFound

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


def error_response(
    status: int, code: str, message: str, *, details: Any = None, headers: Any = None
) -> web.Response:
    """The one JSON error shape."""
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return web.json_response(body, status=status, headers=headers)


def _domain_error(exc: Exception) -> web.Response | None:
    if isinstance(exc, ValidationError):
        return error_response(
            400, "invalid_request", "the request is not valid; see details", details=exc.messages
        )
    if isinstance(exc, TaskNotFound):
        return error_response(404, "task_not_found", str(exc), details={"id": exc.task_id})
    if isinstance(exc, InvalidTask):
        return error_response(400, "invalid_task", str(exc))
    if isinstance(exc, DeleteAllDisabled):
        return error_response(403, "delete_all_disabled", str(exc))
    if isinstance(exc, DatabaseUnavailable):
        return error_response(
            503,
            "database_unavailable",
            "the database is not reachable; try again shortly",
            headers={"Retry-After": "1"},
        )
    return None


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
        return error_response(exc.status, code, exc.text or exc.reason, headers=headers)
    except Exception as exc:
        response = _domain_error(exc)
        if response is not None:
            return response
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; it has been logged")
