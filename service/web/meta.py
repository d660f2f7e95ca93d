"""The API about itself: health, Prometheus metrics, the OpenAPI document and its docs page."""

from __future__ import annotations

from aiohttp import web

from service.web.common import json_response
from service.web.keys import METRICS, OPENAPI, STORE
from service.web.openapi import DOCS_PAGE, answers, operation, undocumented
from service.web.schemas.meta import HealthSchema


@operation("is the database answering?", operation_id="getHealth", responses={200: HealthSchema})
async def health(request: web.Request) -> web.Response:
    """200 when the database answers, 503 (from the error middleware) when it does not."""
    await request.app[STORE].ping()
    return json_response({"status": "ok"})


@answers("text/plain")  # the Prometheus text format, not JSON
@operation(
    "Prometheus metrics: the queue and this API's requests",
    operation_id="getMetrics",
    responses={200: None},
)
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text format (OpenMetrics if the Accept header asks for it). The queue
    figures are cached for TASK_RUNNER_METRICS_CACHE seconds; a database that does not
    answer shows as task_runner_database_up 0, not as an error."""
    body, content_type = await request.app[METRICS].render(
        request.app[STORE].figures, request.headers.get("Accept", "")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


@operation("this document", operation_id="getOpenApi", responses={200: {"type": "object"}})
async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API."""
    return json_response(request.app[OPENAPI])


@undocumented
async def docs(request: web.Request) -> web.Response:
    """A page to read and try the API (Swagger UI)."""
    return web.Response(text=DOCS_PAGE, content_type="text/html")
