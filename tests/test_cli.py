"""The `task-runner` command: ops tools, settings errors, help."""

from __future__ import annotations

import asyncio
import importlib.metadata
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bson import ObjectId

from service.config import Settings
from service.localdb import free_port
from service.models import State, TaskType
from service.store import Store
from tests.helpers import TASK_RUNNER, run_cli, settings_env, stuck_task


async def task_runner(
    settings: Settings, *args: str, **overrides: object
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, settings_env(settings, **overrides), *args)


async def test_stats_counts_by_state_and_type(settings: Settings, store: Store) -> None:
    for task_type in ("foo", "foo", "baz"):
        await store.tasks.create(task_type=task_type, run_at=None, max_attempts=1)
    await stuck_task(store)
    result = await task_runner(settings, "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "NOTSTARTED  foo            2" in lines
    assert "NOTSTARTED  baz            1" in lines
    assert "STARTED     foo            1" in lines
    assert any(line.startswith("oldest due task: ") and "foo" in line for line in lines)
    assert lines[-1].endswith(": 1")


async def test_recover_dry_run_then_for_real(settings: Settings, store: Store) -> None:
    stuck = await stuck_task(store)
    result = await task_runner(settings, "recover", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert stuck in result.stdout and "gone-host:123" in result.stdout
    assert "dry run" in result.stdout
    assert (await store.tasks.get(stuck)).state is State.STARTED
    result = await task_runner(settings, "recover", "--stale-after", "300")
    assert result.returncode == 0, result.stderr
    assert "recovered 1 task(s)" in result.stdout
    assert (await store.tasks.get(stuck)).state is State.NOTSTARTED
    result = await task_runner(settings, "recover")
    assert "no stale tasks" in result.stdout


async def test_requeue_a_failed_task(settings: Settings, store: Store) -> None:
    stuck = await stuck_task(store, max_attempts=1)
    await store.claims.recover_stale(60)
    assert (await store.tasks.get(stuck)).state is State.FAILED
    result = await task_runner(settings, "requeue", stuck)
    assert result.returncode == 0, result.stderr
    assert (await store.tasks.get(stuck)).state is State.NOTSTARTED
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


# -- the real `task-runner` command: settings, messages, help -------------------------


async def command(
    settings: Settings, *args: str, env: dict[str, str] | None = None, **overrides: object
) -> subprocess.CompletedProcess[str]:
    """The installed `task-runner` console script, as a user runs it."""
    environ = {**settings_env(settings, **overrides), **(env or {})}
    return await asyncio.to_thread(run_cli, environ, *args, installed=True)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr; no traceback."""
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["worker"], {"TASK_RUNNER_LOG_LEVEL": "verbose"}, "TASK_RUNNER_LOG_LEVEL"),
        (["worker"], {"TASK_RUNNER_EVENT_LOOP": "tokio"}, "TASK_RUNNER_EVENT_LOOP"),
        (["worker"], {"TASK_RUNNER_HEARTBEAT_INTERVAL": "nan"}, "TASK_RUNNER_HEARTBEAT_INTERVAL"),
        (["api"], {"TASK_RUNNER_REQUEST_TIMEOUT": "inf"}, "TASK_RUNNER_REQUEST_TIMEOUT"),
        (["worker"], {"TASK_RUNNER_FOO_SECONDS": "-inf"}, "TASK_RUNNER_FOO_SECONDS"),
        (["dev"], {"TASK_RUNNER_SHUTDOWN_GRACE": "NaN"}, "TASK_RUNNER_SHUTDOWN_GRACE"),
        (["worker", "--heartbeat-interval", "nan"], {}, "--heartbeat-interval"),
        (["stats", "--db-timeout", "inf"], {}, "--db-timeout"),
        (["recover", "--stale-after", "x"], {}, "--stale-after"),
        (["recover", "--log-level", "verbose"], {}, "--log-level"),
        (["dev", "--port", "70000"], {}, "--port"),
        (["stats"], {"MONGODB_URL": "mongodb://admin:s3cret@db:notaport/"}, "MONGODB_URL"),
    ],
)
async def test_a_bad_setting_stops_with_one_line_naming_it(
    settings: Settings, args: list[str], env: dict[str, str], named: str
) -> None:
    result = await command(settings, *args, env=env)
    assert result.returncode == 2
    line = one_line(result)
    assert named in line
    assert "s3cret" not in line


async def test_recover_names_the_flag_the_user_typed(settings: Settings) -> None:
    result = await command(settings, "recover", "--stale-after", "3", heartbeat_interval=2)
    assert result.returncode == 2
    line = one_line(result)
    assert "--stale-after (3)" in line and "TASK_RUNNER_HEARTBEAT_INTERVAL (2)" in line
    result = await command(
        settings, "recover", "--stale-after", "3", "--heartbeat-interval", "1", heartbeat_interval=2
    )
    assert result.returncode == 0, result.stderr
    assert "no stale tasks (threshold 3s)" in result.stdout


async def test_a_misspelt_variable_is_named_with_the_closest_setting(settings: Settings) -> None:
    result = await command(settings, "stats", env={"TASK_RUNNER_HEARTBEAT_INTERVL": "1"})
    assert result.returncode == 0, result.stderr
    assert (
        "TASK_RUNNER_HEARTBEAT_INTERVL is not a setting and is ignored; "
        "did you mean TASK_RUNNER_HEARTBEAT_INTERVAL?"
    ) in result.stderr


async def test_passwords_in_the_url_are_never_printed(settings: Settings) -> None:
    result = await command(
        settings, "stats", mongodb_url="mongodb://admin:s3cret@127.0.0.1:9/", db_timeout=0.5
    )
    assert result.returncode == 1
    line = one_line(result)
    assert "cannot reach the database at mongodb://admin:***@127.0.0.1:9/" in line
    assert "s3cret" not in result.stdout + result.stderr


async def test_dev_redacts_the_url_it_uses(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    process = await asyncio.to_thread(
        subprocess.Popen,
        [TASK_RUNNER, "dev", "--port", str(port), "--workers", "1"],
        env=settings_env(
            settings, mongodb_url=f"mongodb://admin:s3cret@127.0.0.1:{free_port()}/", db_timeout=0.5
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        said = ""
        while "Ctrl-C stops" not in said:
            line = await asyncio.to_thread(process.stdout.readline)
            assert line, said
            said += line.decode()
        process.send_signal(signal.SIGINT)
        rest = await asyncio.to_thread(process.communicate, timeout=60)
        said += rest[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert "dev: using the database at mongodb://admin:***@127.0.0.1" in said
    assert "s3cret" not in said
    assert process.returncode == 0


async def test_help_says_where_settings_live_and_shows_real_defaults(settings: Settings) -> None:
    for name in ("api", "worker", "db", "dev", "stats", "recover", "requeue"):
        result = await command(settings, name, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "None" not in text, name
        assert "docs/configuration.md" in text, name
        assert "service.config" not in text
        if name != "requeue":
            assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text, name
    dev = " ".join((await command(settings, "dev", "--help")).stdout.split())
    assert "[TASK_RUNNER_HOST; default 127.0.0.1]" in dev
    assert "[TASK_RUNNER_ALLOW_DELETE_ALL; default true]" in dev
    api = " ".join((await command(settings, "api", "--help")).stdout.split())
    assert "[TASK_RUNNER_HOST; default 0.0.0.0]" in api
    assert "[TASK_RUNNER_ALLOW_DELETE_ALL; default false]" in api
    assert "[MONGODB_URL; default unset]" in api
    recover = (await command(settings, "recover", "--help")).stdout
    assert "--heartbeat-interval" in recover
    version = await command(settings, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"task-runner {importlib.metadata.version('task-runner')}"


async def test_requeue_tells_a_bad_id_an_unknown_id_and_another_state_apart(
    settings: Settings, store: Store
) -> None:
    waiting = await store.tasks.create(task_type="foo", run_at=None, max_attempts=1)
    malformed = await command(settings, "requeue", "6b05d02e")
    assert malformed.returncode == 1
    assert "'6b05d02e' is not a task id" in one_line(malformed)
    unknown = str(ObjectId())
    missing = await command(settings, "requeue", unknown)
    assert missing.returncode == 1
    assert f"no FAILED task with id {unknown}: no task has this id" in one_line(missing)
    other = await command(settings, "requeue", waiting.id)
    assert other.returncode == 1
    assert f"no FAILED task with id {waiting.id}: it is NOTSTARTED" in one_line(other)


async def test_recover_reports_which_tasks_went_back_and_which_failed(
    settings: Settings, store: Store
) -> None:
    back = await stuck_task(store, max_attempts=3)
    failed = await stuck_task(store, max_attempts=1)
    result = await command(settings, "recover", "--stale-after", "300")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"{back} -> NOTSTARTED: back in the queue" in lines
    assert f"{failed} -> FAILED: attempts used up" in lines
    assert "recovered 2 task(s): 1 back to NOTSTARTED, 1 FAILED (attempts used up)" in lines


async def test_stats_counts_unreadable_documents(settings: Settings, store: Store) -> None:
    result = await command(settings, "stats")
    assert result.returncode == 0, result.stderr
    assert "unreadable documents: 0" in result.stdout.splitlines()


def test_refused_credentials_are_one_line_that_hides_the_password(tmp_path: Path) -> None:
    from pymongo import MongoClient

    from service.localdb import START_SCRIPT, LocalDatabase

    port, path = free_port(), str(tmp_path / "db")
    setup = LocalDatabase(port=port, path=path, sync_on_commit=False)
    setup.start()
    try:
        admin: MongoClient[dict[str, object]] = MongoClient(setup.url)
        with admin:
            admin.admin.command("createUser", "ops", pwd="right", roles=["root"])
    finally:
        setup.stop()
    command = [sys.executable, "-P", "-c", START_SCRIPT, "--port", str(port), "--auth"]
    server = subprocess.Popen(
        [*command, "--storage-path", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        anyone: MongoClient[dict[str, object]] = MongoClient(
            f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=20_000
        )
        with anyone:
            anyone.admin.command("hello")  # answered without credentials once the server is up
        url = f"mongodb://ops:wrong-secret@127.0.0.1:{port}/?directConnection=true"
        env = {k: v for k, v in settings_env(Settings()).items() if k != "MONGODB_URL"}
        env["MONGODB_URL"] = url
        for command in (["stats"], ["api", "--port", str(free_port())], ["worker"]):
            result = subprocess.run(
                [sys.executable, "-m", "service.cli", *command],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            said = result.stdout + result.stderr
            assert result.returncode == 1, said
            assert "Traceback" not in said and "wrong-secret" not in said, said
            last = result.stderr.strip().splitlines()[-1]
            assert "refused" in last and "AuthenticationFailed" in last, said
            assert "ops:***@" in last, said
    finally:
        server.terminate()
        server.wait(timeout=15)


async def test_a_limit_on_a_type_that_does_not_exist_stops_with_one_line(
    settings: Settings,
) -> None:
    for command in ("worker", "api"):
        result = await task_runner(settings, command, type_limits=("fooo=2",))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "TASK_RUNNER_TYPE_LIMITS" in lines[0] and "fooo" in lines[0], lines
        assert "foo, bar, baz" in lines[0] or "bar, baz, foo" in lines[0], lines


def test_the_stop_message_names_the_signal_that_asked_for_it() -> None:
    from service.cli.supervisor import Signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signals = Signals()
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() and "SIGTERM again" in signals.again()
        signals._on_signal(signal.SIGINT, None)  # as Ctrl-C would (SIGINT may be ignored here)
        assert signals.count == 2 and "Ctrl-C again" in signals.again()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


async def test_queues_lists_sets_pauses_and_resumes(settings: Settings, store: Store) -> None:
    await store.tasks.create(task_type=TaskType.FOO, run_at=None, max_attempts=1, queue="mail")
    listed = await task_runner(settings, "queues")
    assert listed.returncode == 0, listed.stderr
    assert "mail" in listed.stdout and "active" in listed.stdout, listed.stdout
    changed = await task_runner(
        settings, "queues", "set", "mail", "--rate", "2.5", "--concurrency", "3"
    )
    assert changed.returncode == 0, changed.stderr
    line = next(line for line in changed.stdout.splitlines() if line.startswith("mail"))
    assert line.split()[:5] == ["mail", "active", "2.5/s", "1", "3"], line
    paused = await task_runner(settings, "queues", "pause", "mail")
    assert "paused" in paused.stdout
    queue = await store.queues.get("mail")
    assert queue is not None and queue.paused and queue.rate == 2.5
    await task_runner(settings, "queues", "resume", "mail")
    await task_runner(settings, "queues", "set", "mail", "--no-rate")
    queue = await store.queues.get("mail")
    assert queue is not None and not queue.paused and queue.rate is None
    assert queue.concurrency == 3
    bad = await task_runner(settings, "queues", "set", "mail", "--rate", "0")
    assert bad.returncode == 2 and "rate" in bad.stdout, bad.stdout
    unnamed = await task_runner(settings, "queues", "pause")
    assert unnamed.returncode == 2
    dots = await task_runner(settings, "queues", "pause", "..")
    assert dots.returncode == 2 and "not '.' or '..'" in dots.stdout, dots.stdout
    # delete: no confirmation; the settings go, the task stays (listed without settings).
    deleted = await task_runner(settings, "queues", "delete", "mail")
    assert deleted.returncode == 0, deleted.stderr
    assert await store.queues.get("mail") is None
    line = next(line for line in deleted.stdout.splitlines() if line.startswith("mail"))
    assert line.split()[:6] == ["mail", "active", "-", "-", "-", "1"], line
    again = await task_runner(settings, "queues", "delete", "mail")
    assert again.returncode == 1 and "no settings" in again.stdout, again.stdout
