"""service.ops: what the API and the CLI both do, against a real store."""

from __future__ import annotations

from bson import ObjectId

from service import ops
from service.models import State
from service.store import Store
from service.store.figures import Stats
from tests.helpers import stuck_task


async def test_recover_tells_each_stale_task_s_fate(store: Store) -> None:
    back = await stuck_task(store, max_attempts=3)
    failed = await stuck_task(store, max_attempts=1)
    stale = await ops.find_stale(store, 300)
    await store.tasks.delete(failed)
    recovery = await ops.recover(store, stale_after=300, stale=stale)
    assert (recovery.found, recovery.moved) == (2, 1)
    assert recovery.requeued == [back] and recovery.failed == []
    (gone,) = recovery.not_recovered
    assert (gone.id, gone.reason) == (failed, "deleted meanwhile")
    said = [fate.describe() for fate in recovery.tasks]
    assert said == ["-> NOTSTARTED: back in the queue", "deleted meanwhile"]


async def test_recover_finds_the_stale_tasks_itself(store: Store) -> None:
    failed = await stuck_task(store, max_attempts=1)
    recovery = await ops.recover(store, stale_after=300)
    assert recovery.failed == [failed] and recovery.requeued == []
    assert recovery.tasks[0].describe() == "-> FAILED: attempts used up"
    assert (await ops.recover(store, stale_after=300)).found == 0


async def test_a_task_heard_from_again_is_not_recovered(store: Store) -> None:
    stuck = await stuck_task(store, max_attempts=3)
    stale = await ops.find_stale(store, 300)
    fresh = {"$set": {"heartbeat_at": store.clock.now()}}
    await store.db.tasks.update_one({"_id": ObjectId(stuck)}, fresh)
    recovery = await ops.recover(store, stale_after=300, stale=stale)
    assert recovery.moved == 0
    (left,) = recovery.not_recovered
    assert left.reason == "its worker was heard from again"
    assert left.describe() == "not recovered: its worker was heard from again"


async def test_requeue_puts_a_failed_task_back(store: Store) -> None:
    failed = await stuck_task(store, max_attempts=1)
    await ops.recover(store, stale_after=300)
    task = await ops.requeue(store, failed)
    assert (task.id, task.state, task.attempts) == (failed, State.NOTSTARTED, 0)


def test_counts_are_ordered_by_state_then_type_with_totals() -> None:
    stats = Stats(
        {
            ("STARTED", "foo"): 1,
            ("NOTSTARTED", "foo"): 2,
            ("NOTSTARTED", "baz"): 3,
            ("odd", "x"): 4,
        },
        oldest_due=None,
        stale=1,
        unreadable=0,
    )
    summary = ops.summarize(stats)
    assert [(c.state, c.type, c.count) for c in summary.counts] == [
        ("NOTSTARTED", "baz", 3),
        ("NOTSTARTED", "foo", 2),
        ("STARTED", "foo", 1),
        ("odd", "x", 4),
    ]
    assert summary.by_state == {"NOTSTARTED": 5, "STARTED": 1, "COMPLETE": 0, "FAILED": 0, "odd": 4}
    assert summary.by_type == {"baz": 3, "foo": 3, "x": 4}
    assert summary.total == 10
