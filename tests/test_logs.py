"""TASK_RUNNER_LOG_FORMAT=json: real `task-runner api` and `worker` processes write one JSON
object per stderr line, task events with their fields; tasks' output stays plain on stdout."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import pytest

from service.logs import formatter
from service.store import Store
from tests.helpers import ApiProcess, WorkerProcess, call_api, eventually, wait_until_started

REQUIRED = {"time", "level", "logger", "message"}
TASK_FIELDS = {"task_id", "type", "attempt", "duration", "worker"}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed; fails on the first line that is not a JSON object with the keys."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert set(record) >= REQUIRED, line
        records.append(record)
    return records


def request(api: ApiProcess, method: str, path: str, body: Any = None) -> Any:
    """The JSON answer of a request that must succeed."""
    status, answer = call_api(f"{api.url}{path}", method, body)
    assert 200 <= status < 300, (status, answer)
    return answer


@pytest.fixture
def api_process(store: Store, start_api: Callable[..., ApiProcess]) -> ApiProcess:
    return start_api(log_format="json")


async def test_api_and_worker_write_json_lines(
    api_process: ApiProcess,
    spawn_worker: Callable[..., WorkerProcess],
    store: Store,
) -> None:
    worker = spawn_worker(log_format="json", bar_url="http://127.0.0.1:9/")
    await wait_until_started(worker)
    baz = request(api_process, "POST", "/tasks", {"type": "baz"})
    # Port 9: refused.
    bar = request(api_process, "POST", "/tasks", {"type": "bar", "max_attempts": 2})

    async def finished() -> bool:
        states = {t["state"] for t in (await store.db.tasks.find({}).to_list())}
        return states == {"COMPLETE", "FAILED"}

    await eventually(finished, within=30)
    request(api_process, "GET", f"/tasks/{baz['id']}")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    api_process.signal(signal.SIGTERM)
    api_process.wait(30)

    records = json_lines(worker.stderr())
    events = [r for r in records if "task_id" in r]
    assert {e["task_id"] for e in events} == {baz["id"], bar["id"]}
    for event in events:
        assert set(event) >= TASK_FIELDS, event
        assert event["worker"] == worker.worker_id
        assert isinstance(event["duration"], float)
    done = next(e for e in events if e["task_id"] == baz["id"])
    assert (done["type"], done["attempt"], done["outcome"]) == ("baz", 1, "COMPLETE")
    failed = [e for e in events if e["task_id"] == bar["id"]]
    assert [(e["attempt"], e["outcome"]) for e in failed] == [(1, "retry"), (2, "FAILED")]
    # A task that failed for good is a warning; a success or a retry is not.
    levels = [(e["outcome"], e["level"]) for e in events]
    assert sorted(levels) == [("COMPLETE", "INFO"), ("FAILED", "WARNING"), ("retry", "INFO")]
    started = [r["message"] for r in records if " started: " in r["message"]]
    assert len(started) == 1 and "types foo,bar,baz,http, limits none," in started[0], started
    # The task's own output: plain lines on stdout, nothing else.
    assert worker.stdout_lines() and all(line.startswith("Baz ") for line in worker.stdout_lines())

    api_records = json_lines(api_process.stderr())
    access = [r for r in api_records if r["logger"] == "service.access"]
    get = next(r for r in access if r["method"] == "GET" and r["route"] == "/tasks/{id}")
    assert (get["path"], get["status"]) == (f"/tasks/{baz['id']}", 200)
    assert {"duration", "remote", "bytes"} <= set(get)
    assert api_process.stdout_path.read_text() == ""


def test_text_format_is_unchanged() -> None:
    record = logging.LogRecord(
        "service.worker.worker", logging.INFO, "x", 1, "task %s", ("a",), None
    )
    line = formatter("text").format(record)
    assert line.endswith(f" INFO    service.worker.worker[{record.process}] task a")


def test_json_format_keeps_extra_fields_and_tracebacks_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "service", logging.ERROR, "x", 1, "failed %d", (3,), sys.exc_info()
        )
    record.task_id = "abc"
    line = formatter("json").format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed 3"
    assert parsed["level"] == "ERROR"
    assert parsed["logger"] == "service"
    assert parsed["task_id"] == "abc"
    assert "ValueError: boom" in parsed["exc_info"]
    assert parsed["time"].startswith("20")
