"""The store against a real server: claim, its query plan, fencing, heartbeat, recovery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bson import ObjectId

from service.models import State, TaskType
from service.store import Store, new_lease
from service.store.base import CLAIM_INDEX, CLAIM_SORT
from service.store.claims import WORKER_LOST, claimable


async def make(store: Store, *, in_seconds: float = -1, max_attempts: int = 3) -> str:
    task = await store.tasks.create(
        task_type=TaskType.BAZ,
        run_at=store.clock.now() + timedelta(seconds=in_seconds),
        max_attempts=max_attempts,
    )
    return task.id


async def test_claim_takes_due_tasks_in_run_at_order_and_never_future(store: Store) -> None:
    later = await make(store, in_seconds=3600)
    first = await make(store)
    second = await make(store)
    claimed = [
        await store.claims.claim("w1", lease=new_lease()),
        await store.claims.claim("w2", lease=new_lease()),
        await store.claims.claim("w3", lease=new_lease()),
    ]
    assert [t.id if t else None for t in claimed] == [first, second, None]
    task = claimed[0]
    assert task is not None
    assert task.state is State.STARTED
    assert task.attempts == 1
    assert task.worker == "w1"
    assert task.lease and task.lease != claimed[1].lease  # type: ignore[union-attr]
    assert task.started_at is not None and task.run_at is not None
    assert task.started_at >= task.run_at
    assert (await store.tasks.get(later)).state is State.NOTSTARTED


def _stages(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage of a plan tree (an OR or a SORT_MERGE has several inputs)."""
    stages: list[dict[str, Any]] = []
    pending = [plan]
    while pending:
        stage = pending.pop()
        stages.append(stage)
        pending.extend(stage.get("inputStages", []))
        if "inputStage" in stage:
            pending.append(stage["inputStage"])
    return stages


async def test_claim_query_plan_uses_the_index_without_sorting(store: Store) -> None:
    for priority in (-10, 0, 3, 10):
        for _ in range(5):
            await store.tasks.create(
                task_type=TaskType.BAZ, run_at=None, max_attempts=1, priority=priority
            )
    await make(store, in_seconds=3600)
    # The claim exactly as the store sends it: its filter and its sort, with the worker's
    # types named (as after meeting another type) and without (its usual claim).
    for types in (("foo", "bar", "baz"), None):
        explained = await store.db.tasks.database.command(
            "explain",
            {
                "findAndModify": store.db.tasks.name,
                "query": claimable(types, due_by=store.clock.surely_now()),
                "sort": dict(CLAIM_SORT),
                "update": {"$set": {"state": "STARTED"}},
            },
            verbosity="queryPlanner",
        )
        stages = _stages(explained["queryPlanner"]["winningPlan"])
        names = [stage["stage"] for stage in stages]
        assert "SORT" not in names, names
        if explained.get("serverInfo", {}).get("host") == "secantus":
            # SecantusDB's explain is its planner's guess, not a plan: for findAndModify it
            # never reports a SORT stage, and it uses an index only for bare equalities plus
            # one range: the claim that names types scans the collection (DESIGN.md, known
            # differences), the usual one walks the time index.
            expected = ["COLLSCAN"] if types is not None else ["IXSCAN"]
            assert [name for name in names if name != "FETCH"] == expected, names
        else:
            scan = [stage for stage in stages if stage["stage"] == "IXSCAN"]
            assert [stage["keyPattern"] for stage in scan] == [dict(CLAIM_INDEX)], names
    # Nothing was changed by explaining.
    assert await store.db.tasks.count_documents({"state": "STARTED"}) == 0


async def test_fenced_writes_fail_after_the_lease_is_gone(store: Store) -> None:
    await make(store)
    task = await store.claims.claim("w1", lease=new_lease())
    assert task is not None
    await store.db.tasks.update_one({"_id": ObjectId(task.id)}, {"$set": {"lease": "someone-else"}})
    assert await store.claims.complete(task, "late") is False
    assert await store.claims.fail(task, "boom", retry_at=None) is False
    assert await store.claims.release(task) is False
    assert (await store.tasks.get(task.id)).output is None


async def test_heartbeat_refreshes_in_one_write_and_reports_lost_leases(store: Store) -> None:
    for _ in range(3):
        await make(store)
    tasks = [await store.claims.claim("w1", lease=new_lease()) for _ in range(3)]
    leases = {t.lease for t in tasks if t and t.lease}
    assert await store.claims.heartbeat(leases) == set()
    gone = tasks[1]
    assert gone is not None
    await store.tasks.delete(gone.id)
    assert await store.claims.heartbeat(leases) == {gone.lease}


async def test_recovery_requeues_stale_tasks_and_fails_exhausted_ones(store: Store) -> None:
    retry = await make(store, max_attempts=2)
    exhausted = await make(store, max_attempts=1)
    fresh = await make(store)
    claimed = {
        t.id: t for t in [await store.claims.claim("w", lease=new_lease()) for _ in range(3)] if t
    }
    old = store.clock.now() - timedelta(seconds=60)
    await store.db.tasks.update_many(
        {"_id": {"$in": [ObjectId(retry), ObjectId(exhausted)]}}, {"$set": {"heartbeat_at": old}}
    )
    assert [t.id for t in await store.claims.find_stale(30)] == [retry, exhausted]
    assert await store.claims.recover_stale(30) == 2
    assert await store.claims.recover_stale(30) == 0
    requeued = await store.tasks.get(retry)
    assert requeued.state is State.NOTSTARTED
    assert requeued.lease is None and requeued.worker is None
    assert requeued.errors[0].error == WORKER_LOST
    failed = await store.tasks.get(exhausted)
    assert failed.state is State.FAILED
    assert failed.error == WORKER_LOST
    assert failed.finished_at is not None
    assert (await store.tasks.get(fresh)).state is State.STARTED
    # The lost worker's late result is refused.
    assert await store.claims.complete(claimed[retry], "late") is False


async def test_requeue_puts_a_failed_task_back(store: Store) -> None:
    task_id = await make(store, max_attempts=1)
    task = await store.claims.claim("w", lease=new_lease())
    assert task is not None
    assert await store.claims.fail(task, "boom", retry_at=None)
    requeued = await store.tasks.requeue(task_id)
    assert requeued.state is State.NOTSTARTED
    assert requeued.attempts == 0
    assert [e.error for e in requeued.errors] == ["boom"]
    assert await store.claims.claim("w", lease=new_lease()) is not None


async def test_earliest_waiting_is_the_earliest_waiting(store: Store) -> None:
    now = store.clock.now()
    assert await store.watch.earliest_waiting(after=now) == []
    await make(store, in_seconds=500)
    soon = await store.tasks.create(
        task_type=TaskType.FOO, run_at=now + timedelta(seconds=100), max_attempts=1
    )
    [(_, run_at)] = await store.watch.earliest_waiting(after=now)
    assert run_at == soon.run_at


async def test_a_result_write_retried_after_it_landed_counts_as_written(store: Store) -> None:
    await make(store)
    task = await store.claims.claim("w1", lease=new_lease())
    assert task is not None
    assert await store.claims.complete(task, "Baz 7")
    finished = (await store.tasks.get(task.id)).finished_at
    # As after an outage that swallowed the reply: the same write again.
    assert await store.claims.complete(task, "Baz 7")
    again = await store.tasks.get(task.id)
    assert again.state is State.COMPLETE
    assert again.finished_at == finished
    assert await store.claims.fail(task, "late", retry_at=None) is False


async def test_a_claim_whose_reply_was_lost_can_be_found_by_its_lease(store: Store) -> None:
    task_id = await make(store)
    lease = new_lease()
    assert await store.claims.claimed(lease) is None
    assert await store.claims.claim("w1", lease=lease) is not None
    found = await store.claims.claimed(lease)
    assert found is not None and found.id == task_id and found.lease == lease


async def test_a_claim_counts_odd_attempts_as_0_and_give_back_undoes_it(store: Store) -> None:
    due = store.clock.surely_now() - timedelta(seconds=1)
    odd = {"type": "qux", "state": "NOTSTARTED", "run_at": due, "attempts": "zero"}
    key = (await store.db.tasks.insert_one(odd)).inserted_id
    # Named types: a type this worker does not run is not even looked at.
    assert await store.claims.claim("w", lease=new_lease(), types=("foo", "bar", "baz")) is None
    task = await store.claims.claim("w", lease=new_lease(), types=None)
    assert task is not None and task.key == key
    assert (task.state, task.attempts, task.type) == (State.STARTED, 1, "qux")
    assert task.started_at is not None and task.heartbeat_at is not None
    assert await store.claims.give_back(task)
    back = await store.db.tasks.find_one({"_id": key})
    assert back is not None
    assert (back["state"], back["attempts"]) == ("NOTSTARTED", 0)
    assert not {"lease", "worker", "started_at", "heartbeat_at"} & set(back)
    assert not await store.claims.give_back(task)  # fenced: the lease is gone
