"""What the resources' handlers share: reading a JSON body or a query string safely (no
MongoDB operators, no deep nesting), and a task as an answer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from marshmallow import ValidationError

from service.models import Task
from service.task_view import TaskSchema

task_schema = TaskSchema()


def _dumps(value: Any) -> str:
    # One line and a newline: `curl` output then ends before the shell's prompt.
    return json.dumps(value) + "\n"


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`data` as a JSON answer, ending with a newline."""
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


# No valid request nests deeper than 2; this leaves room and keeps every walk shallow.
MAX_NESTING = 32


def task_response(task: Task, *, status: int = 200) -> web.Response:
    """The task as JSON; a 201 also says where the new task is (Location)."""
    response = json_response(task_schema.dump(task), status=status)
    if status == 201:
        response.headers["Location"] = f"/tasks/{task.id}"
    return response


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body: a JSON object without MongoDB operators, else a 400 or 415."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send the body as application/json")
    try:
        raw = await request.read()
    except (web.RequestPayloadError, ConnectionResetError) as exc:
        # A malformed chunk, or a client that went away mid-body: a 400, not a logged 500.
        raise web.HTTPBadRequest(text=f"the request body could not be read: {exc}") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError({"body": ["not valid JSON"]}) from None
    except RecursionError:
        raise ValidationError({"body": [f"nested deeper than {MAX_NESTING} levels"]}) from None
    if not isinstance(body, dict):
        raise ValidationError({"body": ["must be a JSON object"]})
    reject_operators(body, "body")
    return body


def reject_operators(value: Any, where: str) -> None:
    """Refuse anything shaped like a MongoDB operator ("$ne", {"$gt": ...}) anywhere, any
    string that is not Unicode text (a lone surrogate: JSON's "\ud800" escape parses, but no
    database can store it; named by its place, as a schema names a field), and anything
    nested deeper than MAX_NESTING (walked with a stack, not recursion).
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict | list) and len(path) >= MAX_NESTING:
            raise ValidationError({where: [f"nested deeper than {MAX_NESTING} levels"]})
        if isinstance(item, dict):
            for key, part in item.items():
                stack.extend([(key, path), (part, (*path, key))])
        elif isinstance(item, list):
            stack.extend((part, (*path, index)) for index, part in enumerate(item))
        elif isinstance(item, str):
            if item.startswith("$"):
                message = f"{item[:40]!r}: MongoDB operators are not accepted"
                raise ValidationError({where: [message]})
            try:
                item.encode()
            except UnicodeEncodeError:
                raise ValidationError(
                    _at(path or (where,), "holds a lone surrogate escape: not text")
                ) from None


def _at(path: tuple[str | int, ...], message: str) -> dict[str | int, Any]:
    """A message at its place in the body, nested as marshmallow nests field errors."""
    details: Any = [message]
    for part in reversed(path):
        details = {part: details}
    return dict(details)


def single_valued_query(request: web.Request) -> dict[str, str]:
    """The query string as a dict: each parameter given once, no MongoDB operators."""
    query = request.query
    repeated = sorted({key for key in query if len(query.getall(key)) > 1})
    if repeated:
        raise ValidationError({key: ["give this parameter once"] for key in repeated})
    reject_operators(dict(query), "query")
    return dict(query)
