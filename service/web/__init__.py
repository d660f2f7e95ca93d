"""The HTTP API: the app factory, routes by resource, schemas, middlewares, OpenAPI,
metrics and the dashboard."""
