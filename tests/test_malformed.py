"""Documents of every odd shape beside good tasks: workers never die of what a document
holds, the API never answers 500 because of stored data, and the ops commands answer.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service.config import Settings
from service.localdb import free_port
from service.models import State, Task, TaskType
from service.store import Store, new_lease
from service.worker.execution import retry_delay
from service.worker.malformed import MalformedScan
from tests.helpers import (
    WorkerProcess,
    eventually,
    listed_ids,
    run_cli,
    settings_env,
    wait_until_started,
)

Spawn = Callable[..., WorkerProcess]


def odd_documents(now: Any) -> dict[str, dict[str, Any]]:
    """Documents an older or newer version, a migration or a person might have written,
    by what should become of each."""
    due = now - timedelta(seconds=1)
    base = {"state": "NOTSTARTED", "type": "baz", "run_at": due, "created_at": due}
    base |= {"attempts": 0, "max_attempts": 3}

    def doc(**fields: Any) -> dict[str, Any]:
        shaped = {**base, **fields}
        return {k: v for k, v in shaped.items() if v is not ...}

    return {
        # Left alone: no worker can run or recover them as stored (a worker that claims
        # one by its run_at gives it back untouched).
        "no_run_at": doc(run_at=...),
        "run_at_null": doc(run_at=None),
        "run_at_string": doc(run_at="2020-01-01T00:00:00Z"),
        "run_at_int": doc(run_at=1_700_000_000),
        "attempts_string": doc(attempts="zero"),
        "state_unknown": doc(state="PAUSED"),
        "type_not_string": doc(type=42),
        "type_missing": doc(type=...),
        "state_missing": doc(state=...),
        "started_no_heartbeat": doc(state="STARTED", worker="old-version"),
        # Waiting for a newer worker: a type no worker here knows. (A date beyond Python's
        # range is read as malformed too, but SecantusDB cannot store one to test with.)
        "type_unknown": doc(type="qux"),
        # Claimed but not runnable as stored: FAILED once, saying what is malformed.
        "max_attempts_missing": doc(max_attempts=...),
        "max_attempts_string": doc(max_attempts="3"),
        "max_attempts_zero": doc(max_attempts=0),
        # Runnable: odd in ways that do not stop the work.
        "errors_not_list": doc(errors="oops"),
        "errors_entry_odd": doc(errors=[{"what": 1}, "text"]),
        "created_at_missing": doc(created_at=...),
        "type_upper_case": doc(type="FOO"),
        "attempts_missing": doc(attempts=...),
        "attempts_double": doc(attempts=0.0),
    }


LEFT_ALONE = {
    "no_run_at",
    "run_at_null",
    "run_at_string",
    "run_at_int",
    "state_unknown",
    "type_not_string",
    "type_missing",
    "state_missing",
    "started_no_heartbeat",
}
WAITING = {"type_unknown"}
MALFORMED = {"max_attempts_missing", "max_attempts_string", "max_attempts_zero"}
RUNNABLE = {
    "errors_not_list",
    "errors_entry_odd",
    "created_at_missing",
    "type_upper_case",
    "attempts_missing",
    "attempts_double",
    "attempts_string",  # counted as 0 by the claim, which stores 1
}


async def insert_odd(store: Store) -> dict[str, Any]:
    """Insert every odd document plus two with string and int _ids; return name -> _id."""
    keys: dict[str, Any] = {}
    for name, document in odd_documents(store.clock.surely_now()).items():
        keys[name] = (await store.db.tasks.insert_one(document)).inserted_id
    good = odd_documents(store.clock.surely_now())["created_at_missing"]
    good["created_at"] = good["run_at"]
    for name, key in (("string_id", "legacy-task-1"), ("int_id", 7)):
        await store.db.tasks.insert_one({**good, "_id": key})
        keys[name] = key
    return keys


def test_every_shape_is_sorted_into_one_outcome() -> None:
    names = set(odd_documents(datetime.now(UTC)))
    assert names == LEFT_ALONE | WAITING | MALFORMED | RUNNABLE


async def test_workers_survive_odd_documents_and_finish_the_good_ones(
    store: Store, spawn_worker: Spawn, api: TestClient[Any, Any], settings: Settings
) -> None:
    keys = await insert_odd(store)
    good = [
        await store.tasks.create(task_type=t, run_at=None, max_attempts=3)
        for t in [TaskType.BAZ] * 20 + [TaskType.FOO] * 4
    ]
    workers = [spawn_worker(concurrency=4) for _ in range(2)]
    for worker in workers:
        await wait_until_started(worker)

    runnable = [keys[n] for n in RUNNABLE | {"string_id", "int_id"}]
    malformed = [keys[n] for n in MALFORMED]

    async def settled() -> bool:
        done = await store.db.tasks.count_documents(
            {"_id": {"$in": [t.key for t in good] + runnable}, "state": "COMPLETE"}
        )
        failed = await store.db.tasks.count_documents(
            {"_id": {"$in": malformed}, "state": "FAILED"}
        )
        return done == len(good) + len(runnable) and failed == len(malformed)

    try:
        await eventually(settled, within=60)
    except AssertionError:
        states = [(d["_id"], d.get("state")) async for d in store.db.tasks.find({}, {"state": 1})]
        raise AssertionError((states, [w.stderr()[-3000:] for w in workers])) from None
    # A safety poll and a recovery round later, nothing else has moved and nobody died.
    await asyncio.sleep(settings.max_poll_interval + settings.stale_after)
    assert all(worker.alive() for worker in workers), [w.stderr() for w in workers]

    for name in LEFT_ALONE | WAITING:
        doc = await store.db.tasks.find_one({"_id": keys[name]})
        assert doc is not None
        expected = odd_documents(store.clock.now())[name]
        assert doc.get("state") == expected.get("state"), name
        assert "lease" not in doc, name
    for name in MALFORMED:
        task = Task.from_document(await store.db.tasks.find_one({"_id": keys[name]}) or {})
        assert task.state == State.FAILED and task.attempts == 1, name
        assert task.error is not None and task.error.startswith("malformed task: max_attempts")
    upper = Task.from_document(
        await store.db.tasks.find_one({"_id": keys["type_upper_case"]}) or {}
    )
    assert upper.output == f"Foo {upper.id}"

    async def scanned() -> bool:  # each worker's first scan comes some seconds after start
        return all(
            f"task {keys[n]} cannot be run" in worker.stderr()
            for worker in workers
            for n in LEFT_ALONE
        )

    await eventually(scanned, within=60)
    logs = "".join(worker.stderr() for worker in workers)
    assert "Traceback" not in logs
    for name in LEFT_ALONE:
        # Logged once per worker process, not once per poll.
        assert logs.count(f"task {keys[name]} cannot be run or recovered") == len(workers), name
    for worker in workers:
        assert worker.stdout_lines().count(f"Foo {upper.id}") <= 1

    await assert_api_answers(api, keys, total=len(keys) + len(good))
    await assert_ops_answer(settings, unreadable=len(LEFT_ALONE))


async def assert_api_answers(
    api: TestClient[Any, Any], keys: dict[str, Any], *, total: int
) -> None:
    """Every listing, filter and task answers 200 and pages through every document."""
    for key in keys.values():
        for path in (f"/tasks/{key}", f"/id/{key}"):
            response = await api.get(path)
            assert response.status == 200, (path, await response.text())
            assert (await response.json())["id"] == str(key)
    seen, _ = await listed_ids(api, limit="3")
    assert len(seen) == len(set(seen)) == total
    for query in ({"state": "notstarted"}, {"type": "baz"}, {"state": "FAILED", "type": "baz"}):
        response = await api.get("/tasks", params=query)
        assert response.status == 200, (query, await response.text())
    for path in ("/stats", "/workers", "/metrics"):
        response = await api.get(path)
        assert response.status == 200, (path, await response.text())
    for state in State:
        response = await api.get(f"/taskstate/{state.value}")
        assert response.status == 200, (state, await response.text())
    odd = await (await api.get(f"/tasks/{keys['run_at_string']}")).json()
    assert odd["run_at"] is None
    assert odd["problems"] == ["run_at is str '2020-01-01T00:00:00Z', not a date"]


async def assert_ops_answer(settings: Settings, *, unreadable: int) -> None:
    for command in (["stats"], ["recover", "--dry-run"], ["recover"]):
        done = await asyncio.to_thread(run_cli, settings_env(settings), *command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        if command == ["stats"]:
            assert f"unreadable documents: {unreadable}" in done.stdout


async def test_malformed_documents_are_logged_once_per_process(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    keys = await insert_odd(store)
    scan = MalformedScan(store.figures, interval=60)
    with caplog.at_level(logging.WARNING, logger="service.worker.malformed"):
        assert await scan.run_once() == len(LEFT_ALONE)
        assert await scan.run_once() == len(LEFT_ALONE)
    for name in LEFT_ALONE:
        assert caplog.text.count(f"task {keys[name]} cannot be run") == 1
    assert (await store.figures.stats(stale_after=2.0)).unreadable == len(LEFT_ALONE)


async def test_recovery_handles_errors_of_another_shape(store: Store) -> None:
    stale = store.clock.now() - timedelta(seconds=600)
    doc = odd_documents(store.clock.now())["errors_not_list"]
    doc |= {"state": "STARTED", "heartbeat_at": stale, "attempts": 1, "lease": "x"}
    key = (await store.db.tasks.insert_one(doc)).inserted_id
    missing = {k: v for k, v in doc.items() if k not in ("_id", "max_attempts")}
    gone = (await store.db.tasks.insert_one(missing)).inserted_id

    assert await store.claims.recover_stale(2.0) == 2
    back = Task.from_document(await store.db.tasks.find_one({"_id": key}) or {})
    assert back.state == State.NOTSTARTED and back.lease is None
    assert [e.attempt for e in back.errors] == [1]
    failed = Task.from_document(await store.db.tasks.find_one({"_id": gone}) or {})
    assert failed.state == State.FAILED


async def test_a_worker_exits_non_zero_on_an_unexpected_database_error(
    store: Store, spawn_worker: Spawn
) -> None:
    # A unique index on `worker` makes the server refuse this worker's second claim: an
    # error no code path expects. The worker must stop at once and say so, not carry on.
    await store.db.tasks.create_index("worker", unique=True, sparse=True)
    worker = spawn_worker(concurrency=4, foo_seconds=30.0)
    await wait_until_started(worker)
    for _ in range(2):
        await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=3)
    code = await asyncio.to_thread(worker.wait, 20)
    assert code != 0
    assert "unexpected error; stopping" in worker.stderr() or "E11000" in worker.stderr()


@pytest.mark.parametrize("signum_name", ["SIGTERM", "SIGINT"])
async def test_a_signal_stops_a_worker_that_waits_for_the_database(
    spawn_worker: Spawn, signum_name: str
) -> None:
    worker = spawn_worker(mongodb_url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true")

    async def waiting() -> bool:
        return "database not reachable yet" in worker.stderr()

    await eventually(waiting, within=30)
    worker.signal(getattr(signal, signum_name))
    assert await asyncio.to_thread(worker.wait, 10) == 0
    assert "Traceback" not in worker.stderr()


def test_backoff_of_a_stored_attempt_count_in_the_thousands_does_not_overflow() -> None:
    # A document may say attempts 2000 of 5000: its retry delay is the cap, not a crash.
    assert 0 < retry_delay(2000, base=1.0, cap=300.0) <= 300.0


async def test_output_and_errors_of_any_size_or_encoding_are_stored(store: Store) -> None:
    huge = "x" * (17 * 1024 * 1024)  # past MongoDB's 16 MB document limit
    for output in (huge, "half a surrogate: \udc80"):
        await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=2)
        task = await store.claims.claim("w", lease=new_lease())
        assert task is not None
        assert await store.claims.complete(task, output)
        stored = await store.tasks.get(task.id)
        assert stored.state == State.COMPLETE and stored.output is not None
        assert len(stored.output) < 70 * 1024
    assert stored.output == "half a surrogate: ?"
    await store.tasks.create(task_type=TaskType.BAZ, run_at=None, max_attempts=2)
    task = await store.claims.claim("w", lease=new_lease())
    assert task is not None
    assert await store.claims.fail(task, huge, retry_at=None)
    failed = await store.tasks.get(task.id)
    assert failed.error is not None and failed.error.endswith("more characters not stored]")


async def test_args_that_are_not_json_are_shown_as_malformed_not_a_500(
    store: Store, api: TestClient[Any, Any]
) -> None:
    doc = odd_documents(store.clock.now())["created_at_missing"]
    doc |= {"state": "FAILED", "args": {"when": store.clock.now(), "n": float("nan")}}
    key = (await store.db.tasks.insert_one(doc)).inserted_id
    for path in (f"/tasks/{key}", "/tasks", "/taskstate/FAILED", "/stats"):
        response = await api.get(path)
        assert response.status == 200, (path, await response.text())
    shown = await (await api.get(f"/tasks/{key}")).json()
    assert shown["args"] is None
    assert any(p.startswith("args is dict") for p in shown["problems"])
    assert "args" in Task.from_document(doc).malformed
    assert Task.from_document(doc).unrunnable
