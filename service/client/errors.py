"""What the client raises: one exception class per error code of the API (see
docs/http-api.md#errors), under `ApiError`, grouped by meaning (`NotFound`, `Conflict`,
`ServiceUnavailable`...); and the failures that are not an answer of the API:
`ConnectionFailed`, `UnexpectedResponse` and `WaitTimeout`.

    try:
        client.requeue(task_id)
    except TaskNotRequeueable as exc:
        print("not FAILED but", exc.details["state"])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.records import Task


class ClientError(Exception):
    """Base of everything the client raises on purpose."""


class ApiError(ClientError):
    """The API answered with an error: `code` (stable, for programs: `task_not_found`),
    `message` (for people), `details` (which input, and why) and the HTTP `status`."""

    def __init__(
        self, code: str, message: str, details: Mapping[str, Any] | None = None, status: int = 0
    ) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.status = status


class InvalidRequest(ApiError):
    """400 (`invalid_request`, `invalid_task`, or any other 400): the API refused the input;
    `details` names each field and what was expected (`{"type": ["must be one of ..."]}`)."""


class BodyTooLarge(InvalidRequest):
    """413 `body_too_large`: the body is over TASK_RUNNER_MAX_BODY_BYTES."""


class UnsupportedMediaType(InvalidRequest):
    """415 `unsupported_media_type`: the body is not application/json."""


class Unauthorized(ApiError):
    """401 `unauthorized`: this API wants a bearer token (`token=`), or another one."""


class Forbidden(ApiError):
    """403: the API does not allow this here."""


class DeleteAllDisabled(Forbidden):
    """403 `delete_all_disabled`: delete-all is off (TASK_RUNNER_ALLOW_DELETE_ALL)."""


class NotFound(ApiError):
    """404: no such thing."""


class TaskNotFound(NotFound):
    """404 `task_not_found`: no task has this id, or it was deleted."""


class ScheduleNotFound(NotFound):
    """404 `schedule_not_found`: no schedule has this id, or it was deleted."""


class QueueNotFound(NotFound):
    """404 `queue_not_found`: no queue has this name (neither settings nor tasks); to
    delete_queue, it has no settings."""


class RouteNotFound(NotFound):
    """404 `not_found`: the API has no such route (an older version of it, perhaps)."""


class MethodNotAllowed(ApiError):
    """405 `method_not_allowed`: the route exists, not with this method (an older API)."""


class Conflict(ApiError):
    """409 (or 410): the request does not fit the state of what it is about."""


class TaskNotRequeueable(Conflict):
    """409 `task_not_requeueable`: only a FAILED task can be requeued; `details["state"]`
    is the state it is in."""


class TaskNotWaiting(Conflict):
    """409 `task_not_waiting`: only a task that has not started can be changed."""


class IdempotencyKeyReused(Conflict):
    """409 `idempotency_key_reused`: this Idempotency-Key came with another request
    (`details["key"]`); use a new key for a new task."""


class TaskDeleted(Conflict):
    """410 `task_deleted`: the task this Idempotency-Key created has been deleted since; it
    is not created again (`details["id"]`, `details["key"]`)."""


class ServiceUnavailable(ApiError):
    """503 (or a gateway's 502 or 504): try again shortly. The client already has, as often
    as its `Retry` allows, for the calls it can safely repeat."""


class DatabaseUnavailable(ServiceUnavailable):
    """503 `database_unavailable`: the API's database did not answer in time."""


class BatchInterrupted(ServiceUnavailable):
    """503 `batch_interrupted`: a batch create failed part-way; `details["stored"]` lists
    the indexes of the items stored, `details["unknown"]` those that may have been."""


class RequestTimeout(ServiceUnavailable):
    """503 `request_timeout`: the request took longer than TASK_RUNNER_REQUEST_TIMEOUT."""


class InternalError(ApiError):
    """500 `internal_error`: the API failed; it has logged why."""


class ConnectionFailed(ClientError):
    """The API could not be reached, or the connection broke before its answer, on every
    attempt the client made (its cause is the last failure)."""


class UnexpectedResponse(ClientError):
    """An answer the client cannot read: not JSON, or not the documented shape."""

    def __init__(self, message: str, *, status: int, body: str = "") -> None:
        super().__init__(f"{message} (status {status}): {body[:200]!r}")
        self.status = status
        self.body = body


class WaitTimeout(ClientError, TimeoutError):
    """`wait()` ran out of time before the task was COMPLETE or FAILED; `task` is the task
    as it was last seen."""

    def __init__(self, task: Task, waited: float) -> None:
        super().__init__(f"task {task.id} is still {task.state} after {waited:.1f}s")
        self.task = task


BY_CODE: dict[str, type[ApiError]] = {
    "invalid_request": InvalidRequest,
    "invalid_task": InvalidRequest,
    "bad_request": InvalidRequest,
    "body_too_large": BodyTooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "delete_all_disabled": DeleteAllDisabled,
    "task_not_found": TaskNotFound,
    "schedule_not_found": ScheduleNotFound,
    "queue_not_found": QueueNotFound,
    "not_found": RouteNotFound,
    "method_not_allowed": MethodNotAllowed,
    "task_not_requeueable": TaskNotRequeueable,
    "task_not_waiting": TaskNotWaiting,
    "idempotency_key_reused": IdempotencyKeyReused,
    "task_deleted": TaskDeleted,
    "database_unavailable": DatabaseUnavailable,
    "batch_interrupted": BatchInterrupted,
    "request_timeout": RequestTimeout,
    "internal_error": InternalError,
}
# A code this client does not know (a newer API), or an answer without the error shape (a
# proxy's page, aiohttp's plain-text 400): the class by status.
BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Conflict,
    413: BodyTooLarge,
    415: UnsupportedMediaType,
    500: InternalError,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


def error_from_answer(status: int, body: Any, text: str) -> ApiError:
    """The exception for an error answer: by its `error.code` when it has the API's error
    shape, else by status (with code `http_<status>` and the text as message)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping) and isinstance(error.get("code"), str):
        code = error["code"]
        message = error.get("message")
        details = error.get("details")
        cls = BY_CODE.get(code) or BY_STATUS.get(status, ApiError)
        return cls(
            code,
            message if isinstance(message, str) else code,
            details if isinstance(details, Mapping) else None,
            status,
        )
    cls = BY_STATUS.get(status, ApiError)
    return cls(f"http_{status}", text.strip()[:500] or f"HTTP {status}", None, status)
