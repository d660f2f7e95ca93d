"""The API's /metrics: Prometheus text that agrees with the database, one query batch per
cache period however many scrapes, request counters by route pattern."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from service.clock import DbClock
from service.config import Settings
from service.store import Store
from service.web.app import create_app
from service.web.metrics import QueueCollector
from service.worker.metrics import CommandCounter

Client = TestClient[Any, Any]
MakeClient = Callable[[web.Application], Awaitable[Client]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Client, **headers: str) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def task(state: str, task_type: str, **fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    doc = {"_id": ObjectId(), "type": task_type, "state": state, "run_at": now, "attempts": 1}
    doc.update(max_attempts=3, created_at=now, **fields)
    return doc


async def test_task_counts_agree_with_the_database(api: Client, store: Store) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(seconds=600)
    docs = [
        *(task("COMPLETE", "foo") for _ in range(5)),
        *(task("COMPLETE", "baz") for _ in range(2)),
        task("COMPLETE", "BAR"),  # as an earlier version wrote it: counted as bar
        *(task("FAILED", "bar") for _ in range(3)),
        task("NOTSTARTED", "foo", run_at=old),  # due for ten minutes
        task("NOTSTARTED", "foo", run_at=now - timedelta(seconds=5)),
        task("NOTSTARTED", "baz", run_at=now + timedelta(hours=1)),  # not due
        task("STARTED", "bar", heartbeat_at=now),
        task("STARTED", "foo", heartbeat_at=now - timedelta(seconds=60)),  # stale
        task("PAUSED", "qux"),  # odd: one unknown/unknown series, not a label per value
    ]
    await store.db.tasks.insert_many(docs)
    samples = await scrape(api)

    def tasks(state: str, task_type: str) -> float:
        return samples[("task_runner_tasks", (("state", state), ("type", task_type)))]

    expected = {
        ("COMPLETE", "foo"): 5,
        ("COMPLETE", "baz"): 2,
        ("COMPLETE", "bar"): 1,
        ("FAILED", "bar"): 3,
        ("NOTSTARTED", "foo"): 2,
        ("NOTSTARTED", "baz"): 1,
        ("STARTED", "bar"): 1,
        ("STARTED", "foo"): 1,
        ("unknown", "unknown"): 1,
    }
    for (state, task_type), n in expected.items():
        assert tasks(state, task_type) == n, (state, task_type)
    series = {labels for name, labels in samples if name == "task_runner_tasks"}
    assert len(series) == 4 * 4 + 1  # every known pair (zeros too) and the odd one
    assert sum(v for (name, _), v in samples.items() if name == "task_runner_tasks") == len(docs)
    assert samples[("task_runner_tasks_due", ())] == 2
    assert samples[("task_runner_tasks_stale", ())] == 1
    assert 590 < samples[("task_runner_oldest_due_seconds", ())] < 700
    assert samples[("task_runner_database_up", ())] == 1


async def test_an_empty_queue_has_zeros(api: Client) -> None:
    samples = await scrape(api)
    assert samples[("task_runner_tasks_due", ())] == 0
    assert samples[("task_runner_oldest_due_seconds", ())] == 0
    assert samples[("task_runner_tasks", (("state", "COMPLETE"), ("type", "foo")))] == 0


async def test_scrapes_within_the_cache_period_cost_one_query_batch(settings: Settings) -> None:
    # The commands sent to the tasks collection.
    log = CommandCounter(export=False, collection="tasks")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongodb_url, tz_aware=True, event_listeners=[log]
    )
    try:
        store = Store(client, database=settings.database, clock=DbClock())
        await store.sync_clock()
        await store.db.tasks.insert_many([task("COMPLETE", "foo") for _ in range(20)])
        log.reset()
        queue = QueueCollector(ttl=60.0, stale_after=settings.stale_after)
        # Fifty scrapes at once, then fifty more: one batch of reads in all.
        await asyncio.gather(*(queue.refresh(store.figures) for _ in range(50)))
        batch = log.counts
        assert 1 <= batch.total() <= 6, batch
        for _ in range(50):
            await queue.refresh(store.figures)
        assert log.counts == batch
        assert queue.refreshes == 1
        # Past the period, the next scrape reads again: once.
        queue.ttl = 0.0
        await queue.refresh(store.figures)
        assert log.total == 2 * batch.total()
    finally:
        await client.drop_database(settings.database)
        await client.close()


async def test_scrapes_during_a_slow_refresh_get_the_last_figures_at_once(
    store: Store, settings: Settings
) -> None:
    queue = QueueCollector(ttl=60.0, stale_after=settings.stale_after)
    await queue.refresh(store.figures)
    first = queue.snapshot
    gate = asyncio.Event()

    class SlowFigures:
        """The real figures, held at the gate: a refresh that takes as long as we like."""

        async def queue_figures(self, *, stale_after: float) -> Any:
            await gate.wait()
            return await store.figures.queue_figures(stale_after=stale_after)

    class SlowStore:
        figures = SlowFigures()

    queue.ttl = 0.0
    slow = asyncio.create_task(queue.refresh(SlowFigures()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    # Another scrape meanwhile answers at once, with the figures it has.
    await asyncio.wait_for(queue.refresh(store.figures), 1.0)
    assert queue.snapshot is first and not slow.done()
    gate.set()
    await slow
    assert queue.snapshot is not first and queue.refreshes == 2


async def test_the_api_caches_for_metrics_cache_seconds(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, metrics_cache=60.0)))
    await store.db.tasks.insert_one(task("FAILED", "baz"))
    first = await scrape(client)
    await store.db.tasks.insert_one(task("FAILED", "baz"))
    for _ in range(5):
        again = await scrape(client)
        key = ("task_runner_tasks", (("state", "FAILED"), ("type", "baz")))
        assert again[key] == first[key] == 1  # the cached figure, not a new read


async def test_an_unreachable_database_is_database_up_0_not_an_error(
    settings: Settings, aiohttp_client: MakeClient
) -> None:
    from service.localdb import free_port

    nowhere = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, mongodb_url=nowhere, db_timeout=0.3))
    )
    samples = await scrape(client)
    assert samples[("task_runner_database_up", ())] == 0
    assert not any(name == "task_runner_tasks" for name, _ in samples)
    assert ("task_runner_http_requests_total", ()) not in samples  # labelled series only


async def test_request_counters_use_route_patterns(api: Client) -> None:
    created = await (await api.post("/tasks", json={"type": "foo"})).json()
    for _ in range(3):
        assert (await api.get(f"/tasks/{created['id']}")).status == 200
    assert (await api.get(f"/tasks/{ObjectId()}")).status == 404
    assert (await api.get("/no/such/route/at/all")).status == 404
    assert (await api.request("PROPFIND", "/tasks")).status == 405
    samples = await scrape(api)

    def count(route: str, method: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return samples.get(("task_runner_http_requests_total", labels), 0.0)

    assert count("/tasks", "POST", "201") == 1
    assert count("/tasks/{id}", "GET", "200") == 3
    assert count("/tasks/{id}", "GET", "404") == 1
    assert count("unmatched", "GET", "404") == 1
    assert count("unmatched", "other", "405") == 1
    routes = {
        dict(labels)["route"] for name, labels in samples if name.startswith("task_runner_http")
    }
    assert not any(created["id"] in route for route in routes)
    histogram = ("task_runner_http_request_duration_seconds_count",)
    assert samples[(*histogram, (("method", "GET"), ("route", "/tasks/{id}")))] == 4
    # A later scrape sees the earlier one counted.
    assert (await scrape(api))[
        (
            "task_runner_http_requests_total",
            (("method", "GET"), ("route", "/metrics"), ("status", "200")),
        )
    ] >= 1


async def test_metrics_need_a_token_only_when_reads_do(
    settings: Settings, store: Store, aiohttp_client: MakeClient
) -> None:
    open_reads = await aiohttp_client(
        create_app(dataclasses.replace(settings, api_tokens=("t0ken",)))
    )
    assert (await open_reads.get("/metrics")).status == 200
    guarded = await aiohttp_client(
        create_app(dataclasses.replace(settings, api_tokens=("t0ken",), auth_reads=True))
    )
    assert (await guarded.get("/metrics")).status == 401
    await scrape(guarded, Authorization="Bearer t0ken")


async def test_openmetrics_when_asked(api: Client) -> None:
    response = await api.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status == 200
    assert response.content_type == "application/openmetrics-text"
    assert (await response.text()).endswith("# EOF\n")
