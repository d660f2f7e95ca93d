"""Task code that blocks the worker's event loop cannot stop the worker's own duties: the
leases are kept from a thread of their own, so the task runs once; the stall is logged with
the task that caused it. A plain `def run` task type runs in a thread. Real worker processes.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from service.models import State
from service.store import Store
from tests.helpers import WorkerProcess, eventually, wait_until_started

BLOCKING = """
import time

from service.plugins import task_type


@task_type("blocker", timeout=60)
async def blocker(ctx, args):
    time.sleep(9)  # the mistake: a blocking call inside async def run
    return f"blocked {ctx.task_id} attempt {ctx.attempt}"


@task_type("plain")
def plain(ctx, args):
    time.sleep(0.5)  # a plain def runs in a thread: blocking is fine there
    return f"plain {ctx.task_id} attempt {ctx.attempt}"
"""


async def test_a_task_blocking_the_loop_runs_once_and_is_named(
    store: Store,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"blocking_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(BLOCKING))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # The loop is blocked for 9 s, over twice the 4 s stale threshold.
    workers = [spawn_worker(task_modules=(module,), stale_after=4.0) for _ in range(2)]
    for worker in workers:
        await wait_until_started(worker)
    blocker = await store.tasks.create(task_type="blocker", run_at=None, max_attempts=3)
    plain = await store.tasks.create(task_type="plain", run_at=None, max_attempts=3)

    async def both_done() -> bool:
        found = [await store.tasks.get(t.id) for t in (blocker, plain)]
        return all(t.state == State.COMPLETE for t in found)

    await eventually(both_done, within=60)
    done = await store.tasks.get(blocker.id)
    assert (done.attempts, done.errors) == (1, ()), done
    assert done.output == f"blocked {blocker.id} attempt 1"
    ran = [line for w in workers for line in w.stdout_lines() if line.startswith("blocked ")]
    assert ran == [done.output], ran
    simple = await store.tasks.get(plain.id)
    assert (simple.attempts, simple.output) == (1, f"plain {plain.id} attempt 1")

    # The worker that ran it says which task held its loop, and that the loop ran again.
    def stall_ended() -> bool:
        return f"(task {blocker.id})" in "".join(w.stderr() for w in workers)

    await eventually(stall_ended, within=10)
    said = "".join(w.stderr() for w in workers)
    named = [line for line in said.splitlines() if f"by task {blocker.id} type=blocker" in line]
    assert named and "the event loop has been blocked for" in named[0], said
    (ended,) = [line for line in said.splitlines() if "runs again after a stall of" in line]
    stall = float(ended.split("stall of ")[1].split("s")[0])
    assert 8.0 <= stall <= 12.0, ended
    # Nobody recovered it meanwhile.
    assert "recovered" not in said, said
