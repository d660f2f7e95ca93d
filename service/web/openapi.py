"""The OpenAPI 3 document, generated from the app's own routes and marshmallow schemas (the
decorators here attach each handler's operation), and a docs page (Swagger UI, served from
the swagger-ui-bundle package: no CDN needed).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields

from service import version
from service.models import State
from service.plugins import Registry
from service.task_view import Timestamp
from service.web.schemas.fields import AnyCaseEnum, RunAt, TaskTypeName
from service.web.schemas.meta import ErrorSchema
from service.web.schemas.tasks import QUEUE_PATTERN, CreateTaskSchema

H = TypeVar("H", bound=Callable[..., Any])

ERRORS = {
    400: "invalid input; `details` names each field and what was expected",
    401: "a bearer token is needed (TASK_RUNNER_API_TOKENS is set)",
    413: "body larger than TASK_RUNNER_MAX_BODY_BYTES",
    415: "body is not application/json",
    404: "no such task",
    403: "delete-all is disabled",
    409: "this Idempotency-Key was sent with another request (idempotency_key_reused)",
    410: "the task this Idempotency-Key created has been deleted (task_deleted)",
    503: "the database did not answer in time; retry",
}
ALWAYS = (401, 503)
EARLIER_VERSION = "earlier version"


def operation(
    summary: str,
    *,
    responses: dict[int, Any],
    errors: tuple[int, ...] = (),
    operation_id: str | None = None,
    **extra: Any,
) -> Callable[[H], H]:
    """Attach an OpenAPI operation to a handler; `responses` maps status to schema or None.

    `operation_id` (or `operationId` among `extra`, as OpenAPI spells it) names the operation
    for generated clients: stable, unique in the document, camelCase (`createTask`).
    """
    if operation_id is not None and extra.setdefault("operationId", operation_id) != operation_id:
        raise TypeError("give operation_id or operationId, not both")

    def attach(handler: H) -> H:
        documented: dict[str, Any] = {}
        for status, schema in responses.items():
            documented[str(status)] = _response(handler.__doc__ or summary, schema)
        for status in (*errors, *ALWAYS):
            documented[str(status)] = _response(ERRORS[status], ErrorSchema)
        handler.openapi = {"summary": summary, "responses": documented, **extra}  # type: ignore[attr-defined]
        return handler

    return attach


def undocumented(handler: H) -> H:
    """Mark a route that is a page for people, not an API operation."""
    handler.openapi = {}  # type: ignore[attr-defined]
    return handler


def also_error(status: int, description: str) -> Callable[[H], H]:
    """Document one more error answer of an operation (put above @operation)."""

    def attach(handler: H) -> H:
        handler.openapi["responses"][str(status)] = {  # type: ignore[attr-defined]
            "description": description,
            "content": {"application/json": {"schema": ErrorSchema}},
        }
        return handler

    return attach


def answers(media_type: str) -> Callable[[H], H]:
    """Document the 200 answer of an operation as `media_type` text (put above @operation)."""

    def attach(handler: H) -> H:
        ok = handler.openapi["responses"]["200"]  # type: ignore[attr-defined]
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
        return handler

    return attach


def _response(description: str, schema: Any) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description.strip().splitlines()[0]}
    if schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    return response


def _run_at_property(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
    if type(field) is RunAt:
        return {
            "oneOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "minimum": 0, "exclusiveMaximum": True, "maximum": 253402300800},
            ],
            "type": None,
        }
    return {}


def _task_types(registry: Registry, spec: APISpec) -> Callable[..., dict[str, Any]]:
    """Every loaded type as the `type` enum; each type's argument schema as a component
    (`Args.<type>`), which `args` of a new task is any of."""
    described: list[str] = []
    choices: list[dict[str, Any]] = []
    components: dict[type[Any], str] = {}
    takes_none = [d.name for d in registry if d.args is None]
    if takes_none:
        choices.append({"type": "object", "maxProperties": 0, "description": ", ".join(takes_none)})
        described.append(f"{', '.join(takes_none)}: none (omit, or {{}})")
    for definition in registry:
        if definition.args is None:
            continue
        if definition.args not in components:
            components[definition.args] = f"Args.{definition.name}"
            spec.components.schema(components[definition.args], schema=definition.args)
        ref = f"#/components/schemas/{components[definition.args]}"
        choices.append({"$ref": ref})
        described.append(f"{definition.name}: {components[definition.args]}")

    def attribute(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(field, TaskTypeName):
            return {"enum": list(registry.names)}
        if field.name == "args" and isinstance(field.parent, CreateTaskSchema):
            return {
                "description": f"{field.metadata['description']}. By type: " + "; ".join(described),
                "anyOf": choices,
            }
        return {}

    return attribute


def build_spec(
    app: web.Application,
    *,
    bearer: bool,
    registry: Registry,
    earlier_aliases: Collection[str] = (),
) -> dict[str, Any]:
    """The OpenAPI document of every route `app` has; a route without one is an error.

    `registry`: the task types the app accepts, shown with their argument schemas.
    `earlier_aliases`: paths of the earlier version that share a handler (and so an
    operation) with a REST route; they are filed under the earlier version's tag, with
    the operationId `alias_operation_id` makes of the REST route's. Every operation needs
    an operationId, unique in the document: generated clients name their functions after it.
    """
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="task-runner",
        version=version(),
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Schedule tasks (foo, bar, baz) to run once, at or after a time."},
    )
    plugin.map_to_openapi_type(AnyCaseEnum, "string", None)
    plugin.map_to_openapi_type(TaskTypeName, "string", None)
    plugin.map_to_openapi_type(Timestamp, "string", "date-time")
    plugin.map_to_openapi_type(RunAt, "string", "date-time")
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_run_at_property)
    plugin.converter.add_attribute_function(_task_types(registry, spec))
    plugin.map_to_openapi_type(fields.Dict, "object", None)
    if bearer:
        spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    taken: dict[str, str] = {}  # operationId: the route that has it
    for route in app.router.routes():
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource):
            continue
        info = route.resource.get_info() if route.resource else {}
        path = str(info.get("path") or info.get("formatter"))
        where = f"{route.method} {path}"
        documented = getattr(route.handler, "openapi", None)
        if documented is None:
            raise LookupError(f"{where} has no OpenAPI operation")
        if not documented:
            continue  # deliberately undocumented (the docs page itself)
        op = dict(documented)
        if path in earlier_aliases:
            op["summary"] = f"{EARLIER_VERSION}: {op['summary']}"
            op["tags"] = [EARLIER_VERSION]
            if "operationId" in op:
                op["operationId"] = alias_operation_id(op["operationId"])
        _take_operation_id(op, where, taken)
        params = [
            {"in": "path", "name": name, "required": True, "schema": _path_schema(name, registry)}
            for name in _path_params(path)
        ]
        op["parameters"] = params + list(op.get("parameters", []))
        if bearer:
            op["security"] = [{"bearer": []}]
        spec.path(path=path, operations={route.method.lower(): op})
    document = spec.to_dict()
    _drop_none_types(document)
    return document


def alias_operation_id(operation_id: str) -> str:
    """The operationId of an earlier version's path served by a REST route's handler:
    `getTask` at /tasks/{id} is `legacyGetTask` at /id/{id}."""
    return f"legacy{operation_id[:1].upper()}{operation_id[1:]}"


def _take_operation_id(op: dict[str, Any], where: str, taken: dict[str, str]) -> None:
    """Check that the operation has an operationId no other has taken, and take it."""
    operation_id = op.get("operationId")
    if not operation_id:
        raise LookupError(f"{where} has no operationId: give @operation(operation_id=...)")
    if operation_id in taken:
        raise ValueError(f"{where} has operationId {operation_id!r}, as {taken[operation_id]} has")
    taken[operation_id] = where


def _path_schema(name: str, registry: Registry) -> dict[str, Any]:
    """A path parameter's schema: a state and a task type are closed sets (the API takes
    them in any letter case); anything else is a string."""
    if name == "name":
        return {"type": "string", "pattern": QUEUE_PATTERN, "description": "a queue's name"}
    if name == "state":
        values = [state.value for state in State]
    elif name == "type":
        values = list(registry.names)
    else:
        return {"type": "string"}
    return {"type": "string", "enum": values, "description": "any letter case"}


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _drop_none_types(node: Any) -> None:
    # The RunAt attribute function clears "type" (it is a oneOf), and load_default=None
    # means "omitted", not a null default: remove the nulls they leave.
    if isinstance(node, dict):
        if node.get("type", "") is None:
            del node["type"]
            node.pop("format", None)
        if "default" in node and node["default"] is None:
            del node["default"]
        for value in node.values():
            _drop_none_types(value)
    elif isinstance(node, list):
        for value in node:
            _drop_none_types(value)


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>task-runner API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", tryItOutEnabled: true});</script>
</body></html>
"""
