"""A worker learns of changes to the queues' settings from its change stream: woken for
task after task, it claims without reading the settings each time, and a pause or a resume
still takes effect at once (service/worker/queues.py, QueueGate.refresh)."""

from __future__ import annotations

import asyncio
import functools

from service.config import Settings
from service.models import State, TaskType
from service.store import Store
from service.worker.queues import REFRESH
from tests.helpers import CommandLog, eventually
from tests.test_budget import run_worker


def settings_reads(log: CommandLog) -> int:
    return sum(1 for name, command, _ in log.done if name == "find" and command["find"] == "queues")


async def create(store: Store, queue: str = "default") -> str:
    task = await store.tasks.create(
        task_type=TaskType.BAZ, run_at=None, max_attempts=1, queue=queue
    )
    return task.id


async def state(store: Store, task_id: str) -> State:
    return State((await store.tasks.get(task_id)).state)


async def test_woken_claims_read_no_settings_and_a_pause_or_resume_is_heard(
    watched: tuple[Store, CommandLog], store: Store, settings: Settings
) -> None:
    creator, log = watched
    worker, running = await run_worker(creator, settings)
    try:
        # Started, its stream open, and a first task claimed (the settings read once, since
        # the stream opened: it may have missed a change before): now idle.
        await eventually(lambda: worker.wakeups.progress.open)
        warm_up = await create(store)
        await eventually(functools.partial(_is, store, warm_up, State.COMPLETE))
        log.recording = True
        # Five tasks, each more than REFRESH after the last: each claim would read the
        # settings again if the stream did not tell of their changes.
        for _ in range(5):
            task_id = await create(store)
            await eventually(functools.partial(_is, store, task_id, State.COMPLETE))
            await asyncio.sleep(REFRESH * 1.2)
        assert settings_reads(log) == 0, log.done

        await store.queues.put("mail", {"paused": True})
        # The worker has heard the pause: its settings are stale (read before its next
        # claim), or already read again.
        gate = worker.queues
        await eventually(lambda: gate._read_at is None or "mail" in gate.settings)
        held = await create(store, "mail")
        other = await create(store)
        await eventually(lambda: _is(store, other, State.COMPLETE))
        assert await state(store, held) == State.NOTSTARTED
        reads = settings_reads(log)
        assert reads >= 1, log.done  # the pause's event made them stale: read once

        await store.queues.put("mail", {"paused": False})
        # Resumed: its task runs, woken by the change itself (no task is announced).
        await eventually(lambda: _is(store, held, State.COMPLETE))
        assert settings_reads(log) > reads
    finally:
        worker.stop()
        await running


async def _is(store: Store, task_id: str, wanted: State) -> bool:
    return await state(store, task_id) == wanted
