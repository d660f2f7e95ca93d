"""Real worker processes against one database: every task runs once."""

from __future__ import annotations

import random
import re
import signal
from collections import Counter
from collections.abc import Callable

from service.models import State, TaskType
from service.store import Store
from tests.helpers import StubHttpServer, WorkerProcess, all_tasks, eventually, wait_until_started


async def test_three_workers_run_200_mixed_tasks_exactly_once(
    store: Store, spawn_worker: Callable[..., WorkerProcess], http_stub: StubHttpServer
) -> None:
    http_stub.status = 503
    # Two on uvloop (the default), one on the standard asyncio loop.
    loops = ["uvloop", "uvloop", "asyncio"]
    workers = [spawn_worker(bar_url=http_stub.url, concurrency=8, event_loop=e) for e in loops]
    for worker, loop in zip(workers, loops, strict=True):
        await wait_until_started(worker)
        assert f"concurrency 8, event loop {loop}" in worker.stderr()
    types = [random.choice(list(TaskType)) for _ in range(200)]
    created = [await store.tasks.create(task_type=t, run_at=None, max_attempts=1) for t in types]

    async def all_complete() -> bool:
        return await store.db.tasks.count_documents({"state": State.COMPLETE.value}) == 200

    await eventually(all_complete, within=120)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0]

    tasks = {task.id: task for task in await all_tasks(store)}
    lines = [line for worker in workers for line in worker.stdout_lines()]
    # One line per task across every worker's stdout, matching what was stored.
    assert len(lines) == 200
    assert Counter(lines) == Counter(task.output for task in tasks.values())
    for task in created:
        done = tasks[task.id]
        assert done.attempts == 1
        assert done.started_at is not None and done.run_at is not None
        assert done.started_at >= done.run_at
        if task.type == TaskType.FOO:
            assert done.output == f"Foo {task.id}"
        elif task.type == TaskType.BAR:
            assert done.output == "503"
        else:
            assert done.output is not None and re.fullmatch(r"Baz (\d+)", done.output)
            assert 0 <= int(done.output.split()[1]) <= 343
    foo_lines = [line for line in lines if line.startswith("Foo ")]
    assert sorted(foo_lines) == sorted(f"Foo {t.id}" for t in created if t.type == TaskType.FOO)
    assert http_stub.requests == types.count(TaskType.BAR)
    # The work was shared: every worker process completed some of it.
    by_worker = Counter(task.worker for task in tasks.values())
    assert set(by_worker) == {worker.worker_id for worker in workers}, by_worker
