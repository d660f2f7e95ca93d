"""create_app(settings): the aiohttp application, its database client and its routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from service.clock import DbClock
from service.config import Settings
from service.errors import DatabaseUnavailable
from service.periodic import Periodic
from service.plugins import Registry, load_registry
from service.store import Store, open_client
from service.web.keys import METRICS, OPENAPI, REGISTRY, SETTINGS, STORE
from service.web.metrics import ApiMetrics
from service.web.middlewares import (
    ACCESS_LOGGER,
    AccessLog,
    ProtocolLog,
    auth_middleware,
    destinations_middleware,
    error_middleware,
    metrics_middleware,
    timeout_middleware,
)
from service.web.openapi import build_spec
from service.web.routes import EARLIER_ALIASES, ROUTES
from service.web.ui import add_dashboard

logger = logging.getLogger(__name__)


class DatabaseSetup(Periodic):
    """Keeps the clock offset fresh; creates the indexes once the database first answers."""

    def __init__(self, store: Store, *, interval: float) -> None:
        super().__init__(interval=interval, jitter=0.1)
        self.store = store
        self.healthy_interval = interval
        self.indexed = False

    async def run_once(self) -> None:
        """Sync the clock; ensure indexes if not done yet."""
        await self.store.sync_clock()
        if not self.indexed:
            await self.store.ensure_indexes()
            self.indexed = True
        self.interval = self.healthy_interval


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = open_client(
        settings.effective_mongodb_url, timeout=settings.db_timeout, appname="task-runner-api"
    )
    store = Store(client, database=settings.database, clock=DbClock(skew=settings.clock_skew))
    app[STORE] = store
    setup = DatabaseSetup(store, interval=60.0)
    try:
        await setup.run_once()
    except DatabaseUnavailable as exc:
        # Serve anyway: /health says 503 until the database is back, and setup retries.
        logger.warning("database not reachable at start-up (%s); will keep trying", exc)
        setup.interval = 2.0
    setup.start()
    yield
    await setup.stop()
    await client.close()


def create_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """The API application for these settings and task types (None: loaded here, as the
    workers load theirs; a problem raises PluginError)."""
    if registry is None:
        registry = load_registry(settings.task_modules)
    metrics = ApiMetrics(settings, types=registry.names)
    # Outermost: the metrics count the status the client gets, error answers included.
    middlewares = [
        metrics_middleware(metrics),
        error_middleware,
        timeout_middleware(settings),
        auth_middleware(settings),
        destinations_middleware(settings),
    ]
    app = web.Application(
        middlewares=middlewares,
        client_max_size=settings.max_body_bytes,
        # Passed to aiohttp's connection handler by every runner (web.run_app included).
        handler_args={
            "logger": ProtocolLog(logging.getLogger("aiohttp.server")),
            "access_log": logging.getLogger(ACCESS_LOGGER),
            "access_log_class": AccessLog,
        },
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app.cleanup_ctx.append(_database)
    app.add_routes(ROUTES)
    app.router.add_static("/docs/static", swagger_ui_path, name="docs-static")
    add_dashboard(app)
    app[OPENAPI] = build_spec(
        app, bearer=bool(settings.api_tokens), earlier_aliases=EARLIER_ALIASES, registry=registry
    )
    return app
