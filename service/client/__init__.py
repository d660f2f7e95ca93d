"""The Python client of task-runner's HTTP API: `Client` for synchronous code,
`AsyncClient` for asyncio; the same calls, typed records and exceptions in both.

    from service.client import Client, TaskNotFound

    with Client("http://127.0.0.1:3030") as client:
        task = client.create("foo")
        print(client.wait(task.id, timeout=60).output)

    from service.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:3030") as client:
        task = await client.create("foo")
        print((await client.wait(task.id, timeout=60)).output)

- `aio`: AsyncClient, every call of the API (those about tasks)
- `schedules`: AsyncClient's calls about schedules, stats and workers
- `sync`: Client, the AsyncClient on an event loop of its own
- `transport`: HTTP, the token, retries (Retry)
- `records`: Task, Page, Schedule, Worker, Stats, ItemError: what the API answers
- `errors`: ApiError and one subclass per error code of the API

More, with examples: docs/client.md.
"""

from service.client.aio import AsyncClient
from service.client.errors import (
    ApiError,
    BatchInterrupted,
    BodyTooLarge,
    ClientError,
    Conflict,
    ConnectionFailed,
    DatabaseUnavailable,
    DeleteAllDisabled,
    Forbidden,
    IdempotencyKeyReused,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    QueueNotFound,
    RequestTimeout,
    RouteNotFound,
    ScheduleNotFound,
    ServiceUnavailable,
    TaskDeleted,
    TaskNotFound,
    TaskNotRequeueable,
    TaskNotWaiting,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    WaitTimeout,
)
from service.client.records import (
    AttemptError,
    ItemError,
    Page,
    Queue,
    Schedule,
    Stats,
    Task,
    Worker,
)
from service.client.sync import Client
from service.client.transport import Retry
from service.models import State

__all__ = [
    "ApiError",
    "AsyncClient",
    "AttemptError",
    "BatchInterrupted",
    "BodyTooLarge",
    "Client",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "DatabaseUnavailable",
    "DeleteAllDisabled",
    "Forbidden",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidRequest",
    "ItemError",
    "MethodNotAllowed",
    "NotFound",
    "Page",
    "Queue",
    "QueueNotFound",
    "RequestTimeout",
    "Retry",
    "RouteNotFound",
    "Schedule",
    "ScheduleNotFound",
    "ServiceUnavailable",
    "State",
    "Stats",
    "Task",
    "TaskDeleted",
    "TaskNotFound",
    "TaskNotRequeueable",
    "TaskNotWaiting",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "WaitTimeout",
    "Worker",
]
