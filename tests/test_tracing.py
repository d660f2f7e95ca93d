"""OpenTelemetry spans (the optional extra, with the SDK the tests install): create, claim and
run linked to the trace context a task was created in. Run in a process of its own, whose
global tracer provider no other test shares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.config import Settings

INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

SCRIPT = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

from aiohttp.test_utils import TestClient, TestServer
from service.clock import DbClock
from service.config import Settings
from service.plugins import load_registry
from service.store import Store, new_lease, open_client
from service.web.app import create_app
from service.worker.execution import Executor
from service.worker.process import http_session


async def main(url, database, incoming):
    settings = Settings(mongodb_url=url, database=database)
    async with TestClient(TestServer(create_app(settings))) as api:
        answer = await api.post("/tasks", json={"type": "baz"}, headers={"traceparent": incoming})
        created = await answer.json()
    client = open_client(url, timeout=5, appname="tracing-test")
    store = Store(client, database=database, clock=DbClock())
    await store.sync_clock()
    task = None
    for _ in range(50):
        task = await store.claims.claim("w", lease=new_lease())
        if task is not None:
            break
        await asyncio.sleep(0.1)
    async with http_session() as http:
        executor = Executor(
            store.claims, clock=store.clock, slots=None, registry=load_registry(),
            settings=settings, http=http, worker_id="w",
        )
        outcome = await executor.run(task)
    await client.drop_database(database)
    await client.close()
    spans = [
        {
            "name": s.name,
            "trace": format(s.context.trace_id, "032x"),
            "span": format(s.context.span_id, "016x"),
            "parent": format(s.parent.span_id, "016x") if s.parent else None,
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps({"stored": created["traceparent"], "output": outcome.output, "spans": spans}))


asyncio.run(main(*sys.argv[1:]))
"""


def test_create_claim_and_run_are_spans_of_the_creating_trace(
    settings: Settings, tmp_path: Path
) -> None:
    script = tmp_path / "traced.py"
    script.write_text(SCRIPT)
    assert settings.mongodb_url is not None
    done = subprocess.run(
        [sys.executable, str(script), settings.mongodb_url, settings.database, INCOMING],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    spans = {span["name"]: span for span in seen["spans"]}
    create = spans["task-runner create"]
    _, trace_id, parent_id, _ = INCOMING.split("-")
    assert (create["trace"], create["parent"]) == (trace_id, parent_id)
    # The task keeps the create span's context: what runs later is part of that request.
    assert seen["stored"] == f"00-{trace_id}-{create['span']}-01"
    for name in ("task-runner claim", "task-runner run"):
        assert (spans[name]["trace"], spans[name]["parent"]) == (trace_id, create["span"]), name
        assert spans[name]["attributes"]["task_runner.task.type"] == "baz"
    assert seen["output"].startswith("Baz ")
