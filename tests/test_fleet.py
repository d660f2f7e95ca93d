"""Seeing the fleet from the workers' side: each worker's own /metrics, the registry of live
workers behind GET /workers and `task-runner workers`, with real worker processes.
"""

from __future__ import annotations

import asyncio
import functools
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.localdb import free_port
from service.models import State, TaskType
from service.store import Store
from tests.helpers import (
    CLI,
    WorkerProcess,
    all_tasks,
    eventually,
    run_cli,
    settings_env,
    wait_until_started,
)

Spawn = Callable[..., WorkerProcess]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """A worker's /metrics, parsed as Prometheus text: {(sample name, labels): value}."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_when_up(port: int, *, within: float = 30.0) -> Samples:
    """scrape(port) once something listens there (a process that is still starting)."""

    async def scraped() -> Samples | None:
        try:
            return await scrape(port)
        except aiohttp.ClientConnectionError:
            return None

    samples = await eventually(scraped, within=within, interval=0.1, what=f"a scrape of :{port}")
    assert samples is not None
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def workers_listed(api: TestClient[Any, Any]) -> dict[str, dict[str, Any]]:
    response = await api.get("/workers")
    assert response.status == 200
    return {w["id"]: w for w in (await response.json())["workers"]}


async def test_each_workers_metrics_agree_with_the_database(
    store: Store, spawn_worker: Spawn
) -> None:
    ports = [free_port(), free_port()]
    # Bar against a port nobody listens on fails every attempt: one retry, then FAILED.
    nowhere = f"http://127.0.0.1:{free_port()}/"
    workers = [
        spawn_worker(metrics_port=port, concurrency=3, bar_url=nowhere, bar_timeout=1.0)
        for port in ports
    ]
    for worker in workers:
        await wait_until_started(worker)
    kinds = [TaskType.FOO] * 10 + [TaskType.BAZ] * 20 + [TaskType.BAR] * 6
    for kind in kinds:
        await store.tasks.create(task_type=kind, run_at=None, max_attempts=2)

    async def all_done() -> bool:
        finished = await store.db.tasks.count_documents(
            {"state": {"$in": [State.COMPLETE.value, State.FAILED.value]}}
        )
        return finished == len(kinds)

    await eventually(all_done, within=60)
    tasks = await all_tasks(store)
    scraped = [await scrape(port) for port in ports]
    assert all(total(s, "task_runner_worker_tasks_total") > 0 for s in scraped), "both worked"

    def summed(name: str, **labels: str) -> float:
        return sum(total(s, name, **labels) for s in scraped)

    for kind in TaskType:
        of_kind = [t for t in tasks if t.type == kind.value]
        complete = sum(t.state == State.COMPLETE for t in of_kind)
        failed = sum(t.state == State.FAILED for t in of_kind)
        retried = sum(len(t.errors) - (t.state == State.FAILED) for t in of_kind)
        attempts = sum(t.attempts for t in of_kind)
        assert summed("task_runner_worker_tasks_total", type=kind, outcome="complete") == complete
        assert summed("task_runner_worker_tasks_total", type=kind, outcome="failed") == failed
        assert summed("task_runner_worker_tasks_total", type=kind, outcome="retry") == retried
        assert summed("task_runner_worker_run_seconds_count", type=kind) == attempts
    assert summed("task_runner_worker_tasks_total", outcome="complete") == 30
    assert summed("task_runner_worker_tasks_total", outcome="failed") == 6
    attempts = sum(t.attempts for t in tasks)
    assert summed("task_runner_worker_claims_total", result="task") == attempts
    assert summed("task_runner_worker_lag_seconds_count") == attempts
    assert summed("task_runner_worker_tasks_total", outcome="lease_lost") == 0
    assert summed("task_runner_worker_leases_lost_total") == 0
    assert summed("task_runner_worker_database_errors_total") == 0
    assert summed("task_runner_worker_running") == 0
    for worker, samples in zip(workers, scraped, strict=True):
        info = total(samples, "task_runner_worker_info", worker=worker.worker_id)
        assert info == 1, "the process names itself"
        assert total(samples, "process_cpu_seconds_total") > 0
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0


async def test_workers_shows_who_is_alive_and_what_each_holds(
    store: Store, settings: Settings, api: TestClient[Any, Any], spawn_worker: Spawn
) -> None:
    workers = [spawn_worker(concurrency=2, foo_seconds=2.0) for _ in range(2)]
    for worker in workers:
        await wait_until_started(worker)
    for _ in range(12):
        await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=3)
    ids = [w.worker_id for w in workers]

    async def holds_what_the_database_says(worker_id: str) -> bool:
        listed = (await workers_listed(api))[worker_id]
        held = await store.db.tasks.distinct("_id", {"state": "STARTED", "worker": worker_id})
        return bool(held) and sorted(map(str, held)) == listed["tasks"]

    for worker_id in ids:
        await eventually(
            functools.partial(holds_what_the_database_says, worker_id),
            within=30,
            what=f"{worker_id} listed with the tasks it holds",
        )
    listed = await workers_listed(api)
    assert sorted(listed) == sorted(ids)
    for worker in workers:
        seen = listed[worker.worker_id]
        assert seen["alive"] is True
        assert seen["seconds_since_seen"] < settings.stale_after
        assert seen["pid"] == worker.process.pid
        assert seen["host"] == socket.gethostname()
        assert seen["concurrency"] == 2
        assert seen["running"] == len(seen["tasks"])
        assert seen["types"] == ["foo", "bar", "baz", "http"]
        assert seen["version"] and seen["started_at"] and seen["last_seen"]

    printed = run_cli(settings_env(settings), "workers")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    for worker_id in ids:
        (row,) = [line for line in lines if line.startswith(worker_id + " ")]
        assert row.split()[1] == "alive"
        assert " foo,bar,baz,http " in row, row
    assert "2 worker(s): 2 alive, 0 gone" in printed.stdout

    killed, stopped = workers
    killed.kill()

    async def killed_is_gone() -> bool:
        seen = (await workers_listed(api))[killed.worker_id]
        return seen["alive"] is False

    await eventually(killed_is_gone, within=settings.stale_after + 10)
    listed = await workers_listed(api)
    assert listed[killed.worker_id]["seconds_since_seen"] > settings.stale_after
    assert listed[stopped.worker_id]["alive"] is True
    printed = run_cli(settings_env(settings), "workers")
    (row,) = [line for line in printed.stdout.splitlines() if line.startswith(killed.worker_id)]
    assert row.split()[1] == "gone"
    assert "2 worker(s): 1 alive, 1 gone" in printed.stdout

    stopped.signal(signal.SIGTERM)
    assert stopped.wait() == 0
    listed = await workers_listed(api)
    assert list(listed) == [killed.worker_id], "a clean stop removes the record at once"
    # The killed worker's record stays until the TTL index removes it.
    assert await store.db.workers.count_documents({}) == 1
    index = (await store.db.workers.index_information())["gone"]
    assert index["expireAfterSeconds"] > settings.stale_after


async def test_an_idle_worker_refreshes_its_record_within_the_stale_threshold(
    store: Store, settings: Settings, api: TestClient[Any, Any], spawn_worker: Spawn
) -> None:
    worker = spawn_worker()
    await wait_until_started(worker)
    first = (await workers_listed(api))[worker.worker_id]
    assert first["tasks"] == [] and first["running"] == 0

    async def refreshed() -> bool:
        last_seen = str((await workers_listed(api))[worker.worker_id]["last_seen"])
        return last_seen > str(first["last_seen"])

    await eventually(refreshed, within=settings.stale_after)
    for _ in range(5):
        await asyncio.sleep(settings.heartbeat_interval)
        assert (await workers_listed(api))[worker.worker_id]["alive"] is True


async def test_a_busy_metrics_port_stops_the_worker_with_one_line(
    spawn_worker: Spawn, store: Store
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = spawn_worker(metrics_port=port, host="127.0.0.1")
        code = worker.wait()
    assert code != 0
    lines = worker.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"task-runner worker: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "address already in use" in lines[0] and "--metrics-port" in lines[0]
    assert await store.db.workers.count_documents({}) == 0, "it stopped before registering"


async def test_dev_gives_each_worker_a_metrics_port_and_prints_it(settings: Settings) -> None:
    env = settings_env(settings, port=free_port(), workers=2, log_format="text")
    dev = await asyncio.create_subprocess_exec(*CLI, "dev", env=env, stderr=asyncio.subprocess.PIPE)
    assert dev.stderr is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not printed or "Ctrl-C stops" not in printed[-1]:
                printed.append((await dev.stderr.readline()).decode())
                assert printed[-1], "".join(printed)
        pattern = re.compile(r"dev: worker \d metrics on http://127\.0\.0\.1:(\d+)/metrics")
        ports = [int(m.group(1)) for line in printed if (m := pattern.search(line))]
        assert len(set(ports)) == 2, "".join(printed)
        # dev prints each port as it starts the worker; the worker binds it a moment later.
        named = [total(await scrape_when_up(port), "task_runner_worker_info") for port in ports]
        assert named == [1, 1]
    finally:
        dev.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            await dev.communicate()
    assert dev.returncode == 0
