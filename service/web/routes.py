"""The API's route table: every resource's routes, in one place and in one order.

The OpenAPI document lists the paths in this order, and aiohttp tries the routes that share
a literal prefix in it (a longer literal prefix first, so /tasks/{id} before the earlier
version's /{type}/{unix_seconds}): add routes where they belong, keep the order.
"""

from __future__ import annotations

from aiohttp import web

from service.web import bulk, legacy, meta, operations, queues, schedules, tasks

# The earlier version's paths served by a REST route's handler: the docs file them with the
# earlier version's other routes.
EARLIER_ALIASES = frozenset({"/id/{id}"})

ROUTES: list[web.RouteDef] = [
    web.post("/tasks", tasks.create_task),
    # Before every {id} and {type} route: /tasks/batch is never a task id, nor (the name is
    # reserved) a task type "tasks" for the earlier version's POST /{type}/{unix_seconds}.
    web.post("/tasks/batch", tasks.create_tasks),
    web.get("/tasks", tasks.list_tasks),
    # Literal paths, before /tasks/{id} and the earlier version's POST /{type}/{unix_seconds}
    # would take them for a task id or a create.
    web.post("/tasks/requeue", bulk.requeue_tasks),
    web.post("/tasks/delete", bulk.delete_tasks),
    web.get("/id/{id}", tasks.get_task),
    web.get("/tasks/{id}", tasks.get_task),
    web.patch("/tasks/{id}", tasks.update_task),
    web.delete("/id/{id}", tasks.delete_task),
    web.delete("/tasks/{id}", tasks.delete_task),
    web.get("/health", meta.health),
    web.get("/metrics", meta.metrics),
    web.get("/workers", operations.list_workers),
    web.get("/taskstate/{state}", legacy.legacy_tasks_in_state),
    web.post("/{type}/{unix_seconds}", legacy.legacy_create),
    web.delete("/", legacy.legacy_delete_all),
    web.get("/openapi.json", meta.openapi_document),
    web.get("/docs", meta.docs),
    web.post("/tasks/{id}/requeue", operations.requeue_task),
    web.post("/recover", operations.recover),
    web.get("/stats", operations.stats),
    web.post("/schedules", schedules.create_schedule),
    web.get("/schedules", schedules.list_schedules),
    web.get("/schedules/{id}", schedules.get_schedule),
    web.delete("/schedules/{id}", schedules.delete_schedule),
    web.post("/schedules/{id}/pause", schedules.pause_schedule),
    web.post("/schedules/{id}/resume", schedules.resume_schedule),
    web.get("/queues", queues.list_queues),
    web.get("/queues/{name}", queues.get_queue),
    web.put("/queues/{name}", queues.put_queue),
    web.delete("/queues/{name}", queues.delete_queue),
    web.post("/queues/{name}/pause", queues.pause_queue),
    web.post("/queues/{name}/resume", queues.resume_queue),
]
