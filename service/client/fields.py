"""The keyword fields of the calls that take many (create, update, create_schedule), named
once: the sync Client passes them on to AsyncClient's calls, whose signatures document them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from service.client.transport import RunAt
from service.models import State


class CreateFields(TypedDict, total=False):
    """AsyncClient.create's keyword arguments."""

    args: Mapping[str, Any] | None
    run_at: RunAt | None
    priority: int | None
    tags: Iterable[str] | None
    queue: str | None
    idempotency_key: str | None
    callback_url: str | None
    max_attempts: int | None
    timeout: float | None


class UpdateFields(TypedDict, total=False):
    """AsyncClient.update's keyword arguments."""

    run_at: RunAt | None
    priority: int | None
    args: Mapping[str, Any] | None
    tags: Iterable[str] | None


class ScheduleFields(TypedDict, total=False):
    """AsyncClient.create_schedule's keyword arguments."""

    cron: str | None
    timezone: str | None
    every: float | None
    args: Mapping[str, Any] | None
    priority: int | None
    max_attempts: int | None
    timeout: float | None
    queue: str | None
    start_at: RunAt | None
    end_at: RunAt | None
    missed: str | None


class ListQuery(TypedDict, total=False):
    """What `page` and `list` filter and order by: `state`, `type`, `tag`, `queue` (each optional),
    `order` ("asc", the default: the earliest run_at first; "desc"), `page_size` (100)."""

    state: State | str | None
    type: str | None
    tag: str | None
    queue: str | None
    order: str
    page_size: int
