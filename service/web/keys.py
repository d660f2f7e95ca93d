"""The application's state: one typed AppKey per thing create_app and its cleanup contexts
put in the app, imported by every module that reads it."""

from __future__ import annotations

from aiohttp import web

from service.config import Settings
from service.plugins import Registry
from service.store import Store
from service.web.feed import TaskFeed
from service.web.metrics import ApiMetrics

SETTINGS = web.AppKey("settings", Settings)
# Opened by create_app's database context; handlers use the part they need (`.tasks`, ...).
STORE = web.AppKey("store", Store)
# The task types this API accepts: loaded once at start-up, as the workers load theirs.
REGISTRY = web.AppKey("registry", Registry)
# The OpenAPI document, built once from the route table (GET /openapi.json serves it).
OPENAPI = web.AppKey("openapi", dict)
# The process's one TaskFeed: the dashboard's event stream (GET /events) and the waits of
# GET /tasks/{id}?wait= share its one watch of the tasks.
TASK_FEED = web.AppKey("task_feed", TaskFeed)
# The request counters and the cached queue figures that GET /metrics serves.
METRICS = web.AppKey("metrics", ApiMetrics)
