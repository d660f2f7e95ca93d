"""The HTTP API.

- `app`: create_app(settings), the database's cleanup context, middlewares and routes wired
- `keys`: the AppKeys of what the app holds (settings, store, registry, feed, metrics...)
- `routes`: the route table, in order; the handlers by resource: `tasks`, `schedules`,
  `queues`, `operations` (workers, requeue, recover, stats), `legacy` (the earlier version's
  routes), `meta` (health, metrics, the OpenAPI document and its docs page)
- `common`: what the handlers share (safe JSON bodies and queries, a task as an answer)
- `schemas`: marshmallow schemas by resource; `openapi`: the document and its decorators
- `middlewares`: errors as JSON, timeouts, tokens, request metrics, the access log
- `metrics`: Prometheus metrics; `ui` and `feed`: the dashboard and its live task feed
"""
