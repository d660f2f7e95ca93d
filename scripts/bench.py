#!/usr/bin/env python3
"""Benchmarks that print figures: claim throughput, scheduling lag, API throughput, idle
worker commands, claim latency with many waiting tasks, and what a task costs the workers
in database commands and CPU in a burst. Each figure is the median of
--repeats runs. Each section starts a fresh in-memory SecantusDB on a free port, unless
MONGODB_URL is set.

    .venv/bin/python scripts/bench.py               # the full table (about 20 minutes here)
    .venv/bin/python scripts/bench.py --quick       # smaller, to see that it runs
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402
from bson import ObjectId  # noqa: E402
from pymongo import AsyncMongoClient, ReturnDocument  # noqa: E402

from service.clock import DbClock  # noqa: E402
from service.config import Settings  # noqa: E402
from service.localdb import database_url, free_port  # noqa: E402
from service.models import TaskType  # noqa: E402
from service.plugins import load_registry  # noqa: E402
from service.store import Store, new_lease, open_client  # noqa: E402
from service.store.base import CLAIM_SORT  # noqa: E402
from service.store.claims import claimable  # noqa: E402
from service.worker.metrics import CommandCounter  # noqa: E402
from service.worker.process import http_session  # noqa: E402
from service.worker.worker import Worker  # noqa: E402


async def lag_percentiles(store: Store, count: int) -> tuple[float, float, float]:
    """Wait until `count` tasks are COMPLETE; p50/p95/p99 of started_at - run_at in ms."""
    # Polling the database is the point here: the workers run in other processes.
    while await store.db.tasks.count_documents({"state": "COMPLETE"}) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    lags = [
        (d["started_at"] - d["run_at"]).total_seconds() * 1000
        async for d in store.db.tasks.find({})
    ]
    return percentile(lags, 50), percentile(lags, 95), percentile(lags, 99)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.rows: list[tuple[str, str, str]] = []

    async def fresh_store(self) -> Store:
        client = open_client(self.url, timeout=10, appname="bench")
        store = Store(client, database=f"bench_{uuid.uuid4().hex[:8]}", clock=DbClock())
        await store.sync_clock()
        await store.ensure_indexes()
        return store

    async def drop(self, store: Store) -> None:
        await store.client.drop_database(store.db.tasks.database.name)
        await store.client.close()

    def env(self, store: Store, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_RUNNER_")}
        env.update(
            MONGODB_URL=self.url,
            TASK_RUNNER_DATABASE=store.db.tasks.database.name,
            TASK_RUNNER_LOG_LEVEL="WARNING",
            **extra,
        )
        return env

    def spawn(
        self, count: int, command: list[str], env: dict[str, str], *, logs: bool = True
    ) -> list[subprocess.Popen[bytes]]:
        """Start `count` processes; their output is dropped (and their logs, unless `logs`)."""
        stderr = None if logs else subprocess.DEVNULL
        return [
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            for _ in range(count)
        ]

    @staticmethod
    def stop(children: list[subprocess.Popen[bytes]]) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(60)

    async def repeat(self, measure: Callable[[], Awaitable[float]]) -> float:
        return statistics.median([await measure() for _ in range(self.args.repeats)])

    # -- 1. claim throughput -------------------------------------------------------------

    async def throughput(self, processes: int, mode: str) -> float:
        """Tasks per second between 10% and 90% done, `processes` claimers at once."""
        store = await self.fresh_store()
        total = self.args.tasks
        await insert_due(store, total)
        if mode == "service":
            command = [sys.executable, "-m", "service.cli", "worker"]
            done_state = "COMPLETE"
        else:
            command = [sys.executable, __file__, "--raw-client", mode]
            done_state = "COMPLETE" if mode == "claim+complete" else "STARTED"
        children = self.spawn(processes, command, self.env(store))
        marks: dict[int, float] = {}
        try:
            while len(marks) < 2:
                done = await store.db.tasks.count_documents({"state": done_state})
                for share in (10, 90):
                    if share not in marks and done >= total * share / 100:
                        marks[share] = time.monotonic()
                await asyncio.sleep(0.02)
        finally:
            self.stop(children)
            await self.drop(store)
        return float(total * 0.8 / (marks[90] - marks[10]))

    # -- 2. scheduling lag ---------------------------------------------------------------

    async def lag(self) -> tuple[float, float, float]:
        """started_at - run_at (ms) for tasks created ahead of time, two workers. The tasks
        come due evenly over --lag-seconds: a rate the server keeps up with, so the figure is
        the scheduler's delay, not a queue building up behind a saturated database."""
        store = await self.fresh_store()
        children = self.spawn(2, [sys.executable, "-m", "service.cli", "worker"], self.env(store))
        try:
            await asyncio.sleep(2)
            count = self.args.lag_tasks
            start = store.clock.surely_now() + timedelta(seconds=1.5)
            for i in range(count):
                run_at = start + timedelta(seconds=i * self.args.lag_seconds / count)
                await store.tasks.create(task_type=TaskType.BAZ, run_at=run_at, max_attempts=1)
            return await lag_percentiles(store, count)
        finally:
            self.stop(children)
            await self.drop(store)

    async def lag_api(self) -> tuple[float, float, float]:
        """started_at - run_at (ms) for tasks created through POST /tasks ahead of time at
        --api-lag-spacing, into one idle worker: the pattern of issue 9 (accounting that
        drifted started each one a slot late)."""
        store = await self.fresh_store()
        port = free_port()
        api = self.spawn(
            1,
            [sys.executable, "-m", "service.cli", "api"],
            self.env(store, TASK_RUNNER_PORT=str(port)),
        )
        children = api + self.spawn(
            1, [sys.executable, "-m", "service.cli", "worker"], self.env(store)
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_http(f"{base}/tasks/{ObjectId()}")
            await asyncio.sleep(2)  # the worker is up and idle
            count = self.args.api_lag_tasks
            start = store.clock.surely_now() + timedelta(seconds=3)
            async with aiohttp.ClientSession() as http:
                for i in range(count):
                    run_at = start + timedelta(seconds=i * self.args.api_lag_spacing)
                    body = {"type": "baz", "run_at": run_at.isoformat()}
                    async with http.post(f"{base}/tasks", json=body) as response:
                        assert response.status == 201, await response.text()
            return await lag_percentiles(store, count)
        finally:
            self.stop(children)
            await self.drop(store)

    # -- 3. API throughput ---------------------------------------------------------------

    async def api(self, name: str) -> dict[str, float]:
        """Requests per second of POST and GET against the service's API or the bare one."""
        command = {
            "service": [sys.executable, "-m", "service.cli", "api"],
            "bare": [sys.executable, __file__, "--bare-api"],
        }[name]
        store = await self.fresh_store()
        port = free_port()
        servers = self.spawn(1, command, self.env(store, TASK_RUNNER_PORT=str(port)))
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_http(f"{base}/tasks/{ObjectId()}")
            return {
                method: await load(base, method, self.args.api_seconds)
                for method in ("POST", "GET")
            }
        finally:
            self.stop(servers)
            await self.drop(store)

    # -- 4. idle worker ------------------------------------------------------------------

    async def idle(self) -> float:
        """Commands per second sent by one idle worker with the default settings."""
        counter = CommandCounter(export=False)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.url, tz_aware=True, event_listeners=[counter]
        )
        store = Store(client, database=f"bench_{uuid.uuid4().hex[:8]}", clock=DbClock())
        await store.sync_clock()
        await store.ensure_indexes()
        async with http_session() as http:
            quick = Settings(
                mongodb_url=self.url, bar_url="http://127.0.0.1:9/", bar_timeout=1, foo_seconds=0
            )
            worker = Worker(store, quick, registry=load_registry(), http=http, worker_id="bench")
            running = asyncio.create_task(worker.run())
            await asyncio.sleep(2)
            counter.reset()
            await asyncio.sleep(self.args.idle_seconds)
            per_second = counter.total / self.args.idle_seconds
            worker.stop()
            await running
        await client.drop_database(store.db.tasks.database.name)
        await client.close()
        return float(per_second)

    # -- 5. claim latency with many waiting ----------------------------------------------

    async def claim_latency(self, waiting: int) -> list[tuple[float, float, bool]]:
        """Per run: p50 and p99 (ms) of a claim with `waiting` future tasks, and whether the
        plan is an index scan with no sort. The waiting tasks are inserted once."""
        store = await self.fresh_store()
        future = store.clock.surely_now() + timedelta(days=1)
        for start in range(0, waiting, 5000):
            await store.db.tasks.insert_many(
                [
                    {
                        "_id": ObjectId(),
                        "type": "baz",
                        "state": "NOTSTARTED",
                        "run_at": future + timedelta(seconds=i),
                        "created_at": future,
                        "attempts": 0,
                        "max_attempts": 1,
                    }
                    for i in range(start, min(waiting, start + 5000))
                ]
            )
        runs = []
        for _ in range(self.args.repeats):
            times = []
            for _ in range(self.args.claims):
                await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=1)
                began = time.perf_counter()
                # As a worker claims when every waiting task is of a type it runs.
                task = await store.claims.claim("bench", lease=new_lease(), types=None)
                times.append((time.perf_counter() - began) * 1000)
                assert task is not None
                await store.claims.complete(task, "x")
            plan = await store.db.tasks.database.command(
                "explain",
                {
                    "findAndModify": store.db.tasks.name,
                    "query": claimable(None, due_by=store.clock.surely_now()),
                    "sort": dict(CLAIM_SORT),
                    "update": {"$set": {"x": 1}},
                },
                verbosity="queryPlanner",
            )
            text = str(plan["queryPlanner"]["winningPlan"])
            uses_index = "IXSCAN" in text and "'SORT'" not in text
            runs.append((percentile(times, 50), percentile(times, 99), uses_index))
        await self.drop(store)
        return runs

    # -- 6. cost per task in a burst -----------------------------------------------------

    async def burst_cost(
        self, workers: int, pattern: str, *, event_loop: str = "uvloop"
    ) -> dict[str, float]:
        """What `--burst` Baz tasks created through the API cost the worker processes:
        database commands (by name) and CPU seconds, each per task, read from the workers'
        own /metrics before and after (task_runner_worker_database_commands_total and
        process_cpu_seconds_total), plus tasks/s. The workers run with default settings.

        The workers' idle rate of each command, measured over `--burst-idle` seconds
        first, is also taken off ("<name> above idle"), and "lag" is the p50 of started_at
        - run_at in ms.

        PATTERNS: "one by one", each created due now by one client connection `--spacing`
        seconds after the last began (into idle workers: the herd), while the workers run;
        "in a burst", the same from 8 connections at once;
        "due at once", created first, all with one run_at a moment after the last is
        created, into workers that wait for it.
        """
        store = await self.fresh_store()
        port = free_port()
        metric_ports = [free_port() for _ in range(workers)]
        env = self.env(store)
        # As users run them, logging an INFO line per task (and request), here to nowhere.
        env.pop("TASK_RUNNER_LOG_LEVEL")
        children = self.spawn(
            1,
            [sys.executable, "-m", "service.cli", "api"],
            {**env, "TASK_RUNNER_PORT": str(port)},
            logs=False,
        )
        for metric_port in metric_ports:
            children += self.spawn(
                1,
                [sys.executable, "-m", "service.cli", "worker"],
                {
                    **env,
                    "TASK_RUNNER_METRICS_PORT": str(metric_port),
                    "TASK_RUNNER_EVENT_LOOP": event_loop,
                },
                logs=False,
            )
        total = self.args.burst
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_http(f"{base}/tasks/{ObjectId()}")
            for metric_port in metric_ports:
                await wait_http(f"http://127.0.0.1:{metric_port}/metrics")
            await asyncio.sleep(2)  # started and idle
            async with aiohttp.ClientSession() as http:
                # The idle rate, measured first over --burst-idle seconds, is taken off.
                idle_from = [await scrape(http, p) for p in metric_ports]
                idle_began = time.monotonic()
                await asyncio.sleep(self.args.burst_idle)
                before = [await scrape(http, p) for p in metric_ports]
                measured_from = time.monotonic()
                idle_took = measured_from - idle_began
                body: dict[str, Any] = {"type": "baz"}
                if pattern == "due at once":  # about 4 ms per create here, and a margin
                    due = store.clock.surely_now() + timedelta(seconds=2 + total * 0.01)
                    body["run_at"] = due.isoformat()
                began = time.monotonic()
                spacing = self.args.spacing if pattern == "one by one" else 0.0
                await create_many(http, f"{base}/tasks", body, total, PATTERNS[pattern], spacing)
                created = total / (time.monotonic() - began)
                if pattern == "due at once":
                    assert store.clock.surely_now() < due, "created too slowly: raise the margin"
                    began = time.monotonic() + (due - store.clock.surely_now()).total_seconds()
                await wait_complete(store, total)
                took = time.monotonic() - began
                after = [await scrape(http, p) for p in metric_ports]
                measured = time.monotonic() - measured_from
            lag = (await lag_percentiles(store, total))[0]
        finally:
            self.stop(children)
            await self.drop(store)
        figures: dict[str, float] = {"tasks/s": total / took, "created/s": created, "lag": lag}
        for idle, old, new in zip(idle_from, before, after, strict=True):
            for name, value in new.items():
                spent = value - old.get(name, 0.0)
                idle_rate = (old.get(name, 0.0) - idle.get(name, 0.0)) / idle_took
                figures[name] = figures.get(name, 0.0) + spent / total
                above = figures.get(f"{name} above idle", 0.0)
                figures[f"{name} above idle"] = above + (spent - idle_rate * measured) / total
        return figures

    async def bare_cost(self, loop: str) -> dict[str, float]:
        """The same figures for the bare driver loop (claim, complete, nothing else: the
        baseline of section 1) on event loop `loop` over `--burst` tasks due at once, its
        CPU from /proc."""
        store = await self.fresh_store()
        command = [sys.executable, __file__, "--raw-client", f"claim+complete/{loop}"]
        [child] = self.spawn(1, command, self.env(store))
        total = self.args.burst
        try:
            await asyncio.sleep(2)  # started and polling an empty collection
            cpu = process_cpu(child.pid)
            await insert_due(store, total)
            began = time.monotonic()
            await wait_complete(store, total)
            took = time.monotonic() - began
            cpu = process_cpu(child.pid) - cpu
        finally:
            self.stop([child])
            await self.drop(store)
        figures = {"tasks/s": total / took, "cpu": cpu / total, "commands": 2.0}
        return figures | {f"{name} above idle": figures[name] for name in ("cpu", "commands")}


PATTERNS = {"one by one": 1, "in a burst": 8, "due at once": 8}  # client connections


async def create_many(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    total: int,
    connections: int,
    spacing: float = 0.0,
) -> None:
    """POST `body` `total` times over `connections` connections at once, each connection's
    requests at least `spacing` seconds apart (start to start)."""
    left = total

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            began = time.monotonic()
            async with http.post(url, json=body) as response:
                assert response.status == 201, await response.text()
            await asyncio.sleep(max(0.0, began + spacing - time.monotonic()))

    await asyncio.gather(*(client() for _ in range(connections)))


async def wait_complete(store: Store, total: int) -> None:
    # Polling the database is the point here: the workers run in other processes.
    while await store.db.tasks.count_documents({"state": "COMPLETE"}) < total:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def insert_due(store: Store, total: int, *, later: float = 0.0) -> None:
    """`total` Baz tasks, all due now, or `later` seconds from now."""
    now = store.clock.surely_now() + timedelta(seconds=later)
    await store.db.tasks.insert_many(
        [
            {
                "_id": ObjectId(),
                "type": "baz",
                "state": "NOTSTARTED",
                "run_at": now,
                "created_at": now,
                "attempts": 0,
                "max_attempts": 1,
                "priority": 0,
            }
            for _ in range(total)
        ]
    )


def process_cpu(pid: int) -> float:
    """A process's CPU seconds (user + system), as process_cpu_seconds_total reads them."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scrape(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """A worker's database commands by name, their sum ("commands") and its CPU seconds."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    figures: dict[str, float] = {"commands": 0.0}
    for line in text.splitlines():
        if line.startswith("task_runner_worker_database_commands_total{"):
            name = line.split('command="', 1)[1].split('"', 1)[0]
            value = float(line.rsplit(" ", 1)[1])
            figures[name] = value
            figures["commands"] += value
        elif line.startswith("process_cpu_seconds_total "):
            figures["cpu"] = float(line.rsplit(" ", 1)[1])
    return figures


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url) as response:
                    if response.status in (200, 404):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def load(base: str, method: str, seconds: float, connections: int = 16) -> float:
    """Requests per second over `connections` keep-alive connections for `seconds`."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as http:
        ids: list[str] = []
        for _ in range(20):
            async with http.post(f"{base}/tasks", json={"type": "baz", "run_at": 4102444800}) as r:
                ids.append((await r.json())["id"])
        done = 0
        deadline = time.monotonic() + seconds

        async def client(n: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                if method == "POST":
                    request = http.post(f"{base}/tasks", json={"type": "baz", "run_at": 4102444800})
                else:
                    request = http.get(f"{base}/tasks/{ids[n % len(ids)]}")
                async with request as response:
                    await response.read()
                    assert response.status in (200, 201), response.status
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(client(n) for n in range(connections)))
        return done / (time.monotonic() - began)


# -- the comparison baselines, run as separate processes ---------------------------------


async def raw_client(mode: str) -> None:
    """A plain driver loop doing what the claimer does, as fast as it can."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        os.environ["MONGODB_URL"], tz_aware=True
    )
    tasks = client[os.environ["TASK_RUNNER_DATABASE"]]["tasks"]
    clock = DbClock()
    await clock.sync(client.admin)
    while True:
        doc = await tasks.find_one_and_update(
            {"state": "NOTSTARTED", "run_at": {"$lte": clock.surely_now()}},
            {"$set": {"state": "STARTED", "lease": new_lease()}, "$inc": {"attempts": 1}},
            sort=CLAIM_SORT,
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            await asyncio.sleep(0.05)
            continue
        if mode == "claim+complete":
            await tasks.update_one(
                {"_id": doc["_id"], "lease": doc["lease"]},
                {"$set": {"state": "COMPLETE", "output": "x"}},
            )


def bare_api() -> None:
    """The same single database call per request, with nothing else around it."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        os.environ["MONGODB_URL"], tz_aware=True
    )
    tasks = client[os.environ["TASK_RUNNER_DATABASE"]]["tasks"]

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        doc = {"_id": ObjectId(), "type": body["type"], "state": "NOTSTARTED"}
        await tasks.insert_one(doc)
        return web.json_response({"id": str(doc["_id"])}, status=201)

    async def get(request: web.Request) -> web.Response:
        doc = await tasks.find_one({"_id": ObjectId(request.match_info["id"])})
        if doc is None:
            return web.json_response({}, status=404)
        return web.json_response({"id": str(doc["_id"]), "state": doc["state"]})

    app = web.Application()
    app.router.add_post("/tasks", create)
    app.router.add_get("/tasks/{id}", get)
    web.run_app(
        app, host="127.0.0.1", port=int(os.environ["TASK_RUNNER_PORT"]), print=None, access_log=None
    )


async def main(args: argparse.Namespace) -> None:
    out = print
    server = "MongoDB at MONGODB_URL" if os.environ.get("MONGODB_URL") else "local SecantusDB"
    out(f"# task-runner benchmarks ({server}), median of {args.repeats} runs")
    out(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}\n")

    if "1" in args.sections:
        out(
            "| 1. claim throughput (tasks/s) | service | raw claim+complete | ratio | "
            "raw claim only | ratio |"
        )
        out("| --- | ---: | ---: | ---: | ---: | ---: |")
        for processes in args.processes:
            with database_url() as url:
                bench = Bench(url, args)
                service, full, claim = [
                    await bench.repeat(functools.partial(bench.throughput, processes, mode))
                    for mode in ("service", "claim+complete", "claim")
                ]
            out(
                f"| {processes} process(es) | {service:.0f} | {full:.0f} | "
                f"{service / full:.2f} | {claim:.0f} | {service / claim:.2f} |"
            )

    latencies = {}
    if "2" in args.sections or "5" in args.sections:
        for waiting in args.waiting:
            with database_url() as url:
                latencies[waiting] = await Bench(url, args).claim_latency(waiting)
    if "2" in args.sections:
        with database_url() as url:
            bench = Bench(url, args)
            lags = [await bench.lag() for _ in range(args.repeats)]
        # A fresh server for the API pattern: the first one's oplog slows the second.
        with database_url() as url:
            bench = Bench(url, args)
            api_lags = [await bench.lag_api() for _ in range(args.repeats)]
        p99_claim = statistics.median(run[1] for run in latencies[args.waiting[0]])
        out("\n| 2. scheduling lag, started_at - run_at (ms) | p50 | p95 | p99 |")
        out("| --- | ---: | ---: | ---: |")
        rows = [
            (f"{args.lag_tasks} tasks due over {args.lag_seconds:g} s, 2 workers", lags),
            (
                f"{args.api_lag_tasks} tasks via POST /tasks, "
                f"{args.api_lag_spacing * 1000:g} ms apart, 1 idle worker",
                api_lags,
            ),
        ]
        for label, lag_runs in rows:
            out(
                f"| {label} | "
                + " | ".join(f"{statistics.median(r[i] for r in lag_runs):.1f}" for i in range(3))
                + " |"
            )
        out(f"\nclaim latency p99 with {args.waiting[0]} waiting: {p99_claim:.1f} ms")
        for label, lag_runs in rows:
            p99 = statistics.median(r[2] for r in lag_runs)
            verdict = "within" if p99 <= p99_claim + 20 else "NOT within"
            out(f"{label}: lag p99 {p99:.1f} ms, {verdict} claim p99 + 20 ms")

    if "3" in args.sections:
        # A fresh server for every run: a server slows as its oplog grows, and the one
        # measured second would pay for the first one's inserts.
        api: dict[str, list[dict[str, float]]] = {"service": [], "bare": []}
        for _ in range(args.repeats):
            for name, results in api.items():
                with database_url() as url:
                    results.append(await Bench(url, args).api(name))
        out("\n| 3. API (requests/s, 16 connections) | service | bare handler | ratio |")
        out("| --- | ---: | ---: | ---: |")
        for method, path in (("POST", "/tasks"), ("GET", "/tasks/{id}")):
            service = statistics.median(run[method] for run in api["service"])
            bare = statistics.median(run[method] for run in api["bare"])
            out(f"| {method} {path} | {service:.0f} | {bare:.0f} | {service / bare:.2f} |")

    if "4" in args.sections:
        with database_url() as url:
            bench = Bench(url, args)
            idle = await bench.repeat(bench.idle)
        out(f"\n4. one idle worker (default settings): {idle:.2f} database commands/s")

    if "5" in args.sections:
        out("\n| 5. claim latency (ms) | p50 | p99 | plan: index, no sort |")
        out("| --- | ---: | ---: | --- |")
        for waiting, runs in latencies.items():
            out(
                f"| {waiting} tasks waiting in the future | "
                f"{statistics.median(r[0] for r in runs):.1f} | "
                f"{statistics.median(r[1] for r in runs):.1f} | "
                f"{'yes' if all(r[2] for r in runs) else 'NO'} |"
            )

    if "6" in args.sections:
        burst: dict[tuple[int, str], list[dict[str, float]]] = {}
        # A fresh server for every run, as for the API (its oplog slows it).
        for _ in range(args.repeats):
            for loop in BARE_LOOPS:
                with database_url() as url:
                    burst.setdefault((1, bare_label(loop)), []).append(
                        await Bench(url, args).bare_cost(loop)
                    )
        for pattern in args.patterns:
            for workers in args.burst_workers:
                for loop in args.event_loops:
                    label = pattern if args.event_loops == ["uvloop"] else f"{pattern}, {loop}"
                    for _ in range(args.repeats):
                        with database_url() as url:
                            run = await Bench(url, args).burst_cost(
                                workers, pattern, event_loop=loop
                            )
                        burst.setdefault((workers, label), []).append(run)
        out("")
        for line in burst_table(burst, args.burst):
            out(line)


def burst_table(results: dict[tuple[int, str], list[dict[str, float]]], total: int) -> list[str]:
    """Section 6's rows: medians per (workers, pattern) of the per-task figures, the
    commands split into claims, look-ups, writes and the rest above the workers' idle rate,
    change-stream getMores apart, and CPU above idle against the bare loop's."""
    bare_cpu = {
        loop: statistics.median(run["cpu"] for run in results[(1, bare_label(loop))])
        for loop in BARE_LOOPS
        if (1, bare_label(loop)) in results
    }
    lines = [
        f"| 6. per task, {total} Baz via the API | workers | commands | above idle: claims | "
        "look-ups | writes | claims+look-ups+writes | other | getMore | CPU ms | "
        + "".join(f"CPU vs bare {loop} | " for loop in bare_cpu)
        + "lag p50 ms | tasks/s |",
        "| --- |" + " ---: |" * (11 + len(bare_cpu)),
    ]
    for (workers, pattern), runs in results.items():

        def median(name: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run.get(name, 0.0) for run in runs)

        def above(names: frozenset[str], runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(
                sum(
                    value
                    for key, value in run.items()
                    if key.endswith(" above idle") and key.removesuffix(" above idle") in names
                )
                for run in runs
            )

        def rest(runs: list[dict[str, float]] = runs) -> float:
            known = CLAIMS | LOOKUPS | WRITES | STREAM | FIXED
            return statistics.median(
                sum(
                    value
                    for key, value in run.items()
                    if key.endswith(" above idle") and key.removesuffix(" above idle") not in known
                )
                for run in runs
            )

        if "bare" in pattern:
            claims, look_ups, writes, other, get_more = 1.0, 0.0, 1.0, 0.0, 0.0
        else:
            claims, look_ups, writes = above(CLAIMS), above(LOOKUPS), above(WRITES)
            other, get_more = rest(), above(STREAM)
        cpu = median("cpu above idle")
        lag = f"{median('lag'):.1f}" if "lag" in runs[0] else "-"
        lines.append(
            f"| {pattern} | {workers} | {median('commands'):.2f} | {claims:.2f} | "
            f"{look_ups:.2f} | {writes:.2f} | {claims + look_ups + writes:.2f} | {other:.2f} | "
            f"{get_more:.2f} | {cpu * 1000:.2f} | "
            + "".join(f"{cpu / bare:.2f} | " for bare in bare_cpu.values())
            + f"{lag} | {median('tasks/s'):.0f} |"
        )
    return lines


FIXED = frozenset({"commands", "cpu", "tasks/s", "created/s", "lag"})
# The bare loop's event loops: the workers' default, and plain asyncio (the issue's baseline).
BARE_LOOPS = ("uvloop", "asyncio")


def bare_label(loop: str) -> str:
    return f"bare driver loop, due at once, {loop}"


# How section 6 splits a worker's commands, by name.
CLAIMS = frozenset({"findAndModify"})
LOOKUPS = frozenset({"find", "count", "aggregate", "distinct"})
WRITES = frozenset({"update", "insert", "delete", "bulkWrite"})
STREAM = frozenset({"getMore"})


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=300, help="tasks per throughput run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sections", default="123456", help="which tables to print")
    parser.add_argument("--burst", type=int, default=500, help="tasks per burst-cost run")
    parser.add_argument("--burst-workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--spacing", type=float, default=0.1, help="seconds between tasks created one by one"
    )
    parser.add_argument(
        "--burst-idle", type=float, default=10.0, help="seconds the idle rate is measured over"
    )
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=list(PATTERNS),
        choices=list(PATTERNS),
        help="section 6's patterns",
    )
    parser.add_argument(
        "--event-loops",
        nargs="+",
        default=["uvloop"],
        choices=["uvloop", "asyncio"],
        help="the workers' TASK_RUNNER_EVENT_LOOP in section 6 (each gets its rows)",
    )
    parser.add_argument("--lag-tasks", type=int, default=100)
    parser.add_argument("--lag-seconds", type=float, default=10.0, help="spread of their run_at")
    parser.add_argument("--api-lag-tasks", type=int, default=40)
    parser.add_argument(
        "--api-lag-spacing", type=float, default=0.15, help="seconds between their run_at"
    )
    parser.add_argument("--api-seconds", type=float, default=4.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--claims", type=int, default=30, help="claims per latency run")
    parser.add_argument("--waiting", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--raw-client", help=argparse.SUPPRESS)
    parser.add_argument("--bare-api", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.tasks, args.processes, args.lag_tasks = 1, 400, [1, 2], 40
        args.lag_seconds = 4.0
        args.api_seconds, args.idle_seconds, args.claims = 1.0, 6.0, 30
        args.waiting = [1000, 10_000]
        args.burst, args.burst_workers = 200, [1, 2]
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.raw_client:
        # On the event loop the workers run on (TASK_RUNNER_EVENT_LOOP's default), unless
        # the mode ends in "/asyncio" (section 6 shows both).
        mode, _, loop = arguments.raw_client.partition("/")
        (asyncio.run if loop == "asyncio" else uvloop.run)(raw_client(mode))
    elif arguments.bare_api:
        bare_api()
    else:
        asyncio.run(main(arguments))
