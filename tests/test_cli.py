"""The `task-runner` command: ops tools, settings errors, help."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta

from bson import ObjectId

from service.config import Settings
from service.models import State, TaskType
from service.store import TaskStore, new_lease
from tests.conftest import settings_env


async def task_runner(
    settings: Settings, *args: str, **overrides: object
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.cli", *args],
        env=settings_env(settings, **overrides),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def stuck_task(store: TaskStore, *, max_attempts: int = 3) -> str:
    """A task claimed by a worker that has been silent for ten minutes."""
    await store.create(task_type=TaskType.FOO, run_at=None, max_attempts=max_attempts)
    task = await store.claim("gone-host:123", lease=new_lease())
    assert task is not None
    old = store.clock.now() - timedelta(seconds=600)
    await store.tasks.update_one({"_id": ObjectId(task.id)}, {"$set": {"heartbeat_at": old}})
    return task.id


async def test_stats_counts_by_state_and_type(settings: Settings, store: TaskStore) -> None:
    for task_type in (TaskType.FOO, TaskType.FOO, TaskType.BAZ):
        await store.create(task_type=task_type, run_at=None, max_attempts=1)
    await stuck_task(store)
    result = await task_runner(settings, "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "NOTSTARTED  foo            2" in lines
    assert "NOTSTARTED  baz            1" in lines
    assert "STARTED     foo            1" in lines
    assert any(line.startswith("oldest due task: ") and "foo" in line for line in lines)
    assert lines[-1].endswith(": 1")


async def test_recover_dry_run_then_for_real(settings: Settings, store: TaskStore) -> None:
    stuck = await stuck_task(store)
    result = await task_runner(settings, "recover", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert stuck in result.stdout and "gone-host:123" in result.stdout
    assert "dry run" in result.stdout
    assert (await store.get(stuck)).state is State.STARTED
    result = await task_runner(settings, "recover", "--stale-after", "300")
    assert result.returncode == 0, result.stderr
    assert "recovered 1 task(s)" in result.stdout
    assert (await store.get(stuck)).state is State.NOTSTARTED
    result = await task_runner(settings, "recover")
    assert "no stale tasks" in result.stdout


async def test_requeue_a_failed_task(settings: Settings, store: TaskStore) -> None:
    stuck = await stuck_task(store, max_attempts=1)
    await store.recover_stale(60)
    assert (await store.get(stuck)).state is State.FAILED
    result = await task_runner(settings, "requeue", stuck)
    assert result.returncode == 0, result.stderr
    assert (await store.get(stuck)).state is State.NOTSTARTED
    again = await task_runner(settings, "requeue", stuck)
    assert again.returncode == 1
    assert "no FAILED task" in again.stderr
    bogus = await task_runner(settings, "requeue", "nope")
    assert bogus.returncode == 1


async def test_unreachable_database_is_a_clear_error(settings: Settings) -> None:
    result = await task_runner(
        settings, "stats", mongodb_url="mongodb://127.0.0.1:9/", db_timeout=0.5
    )
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr


async def test_bad_settings_name_the_variable(settings: Settings) -> None:
    result = await task_runner(settings, "stats", heartbeat_interval="soon")
    assert result.returncode != 0
    assert "TASK_RUNNER_HEARTBEAT_INTERVAL" in result.stderr
    result = await task_runner(settings, "worker", stale_after=0.5)
    assert result.returncode != 0
    assert "TASK_RUNNER_STALE_AFTER" in result.stderr
    result = await task_runner(settings, "recover", "--stale-after", "x")
    assert result.returncode == 2


async def test_help_documents_the_settings(settings: Settings) -> None:
    api = await task_runner(settings, "api", "--help")
    assert "--port" in api.stdout and "MONGODB_URL" in api.stdout
    worker = await task_runner(settings, "worker", "--help")
    assert "TASK_RUNNER_BAR_URL" in worker.stdout and "--concurrency" in worker.stdout
