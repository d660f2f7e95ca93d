"""A worker process: `serve(settings)` runs one Worker until SIGTERM or SIGINT, with its
database client, its /metrics port and its HTTP session."""

from __future__ import annotations

import asyncio
import logging

from service.clock import DbClock
from service.config import Settings
from service.plugins import Registry, load_registry
from service.store import Store, open_client
from service.worker import metrics
from service.worker.process import Signals, http_session, wait_for_database
from service.worker.recovery import OutageWatch
from service.worker.worker import Worker

logger = logging.getLogger(__name__)


async def serve(settings: Settings, *, registry: Registry | None = None) -> None:
    """Run one worker process until SIGTERM/SIGINT; a second signal stops at once.

    The task types come from `registry`, else are loaded first of all (the built-ins, entry
    points, TASK_RUNNER_TASK_MODULES): a problem raises PluginError before anything starts.
    Signals work from the first moment: before the worker runs (the database not reachable
    yet, indexes being built) a signal simply ends the start-up. With a metrics port set, its
    /metrics is served from the start; a port that cannot be used raises MetricsPortUnusable
    before anything else is done.
    """
    if registry is None:
        registry = load_registry(settings.task_modules)
    exporter = None
    if settings.metrics_port is not None:
        exporter, _ = metrics.serve(host=settings.host, port=settings.metrics_port)
        logger.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    try:
        await _serve(settings, registry)
    finally:
        if exporter is not None:
            await asyncio.to_thread(exporter.shutdown)
            exporter.server_close()


async def _serve(settings: Settings, registry: Registry) -> None:
    signals = Signals(settings.shutdown_grace)
    signals.install()
    # The driver's monitor tells recovery of an outage this worker's calls did not meet.
    outages = OutageWatch()
    client = open_client(
        settings.effective_mongodb_url,
        timeout=settings.db_timeout,
        appname="task-runner-worker",
        event_listeners=[metrics.CommandCounter(), outages],
    )
    # Claims go without the driver's retry: the claimer confirms a lost one itself.
    claim_client = open_client(
        settings.effective_mongodb_url,
        timeout=settings.db_timeout,
        appname="task-runner-worker-claims",
        event_listeners=[metrics.CommandCounter(), outages],
        retry_writes=False,
    )
    store = Store(
        client,
        database=settings.database,
        clock=DbClock(skew=settings.clock_skew),
        claim_client=claim_client,
    )
    try:
        try:
            await wait_for_database(store)
            await store.ensure_indexes()
            await store.workers.ensure_indexes()
        except asyncio.CancelledError:
            if not signals.seen:
                raise
            logger.info("stopped before the worker started")
            return
        async with http_session() as http:
            worker = Worker(store, settings, registry=registry, http=http)
            outages.on_outage = worker.recoverer.database_lost
            signals.worker = worker
            if signals.seen:
                worker.stop()
            await worker.run()
    finally:
        await claim_client.close()
        await client.close()
