"""Documents of any shape in the collections beside tasks (limits, schedules, the workers'
registry, idempotency keys) never raise out of the store, a periodic job or the API, and
what cannot be used is left alone or mended (tasks: test_malformed.py).

The shapes are generated (Hypothesis) over every field those documents hold: any BSON
value a person, a script or a migration could have written there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import Int64, ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.models import State
from service.store import Store, new_lease
from tests.helpers import StubHttpServer, WorkerProcess, eventually, wait_until_started

# Any BSON value, nested a little: what a field may hold in a document written by hand.
SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    st.builds(ObjectId),
    st.builds(Int64, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.binary(max_size=4),
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["lease", "at", "worker", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
HOLDER = st.fixed_dictionaries(
    {}, optional={"lease": VALUES, "at": VALUES, "worker": VALUES, "x": VALUES}
)
HOLDERS = st.one_of(VALUES, st.lists(st.one_of(HOLDER, VALUES), max_size=4))
LIMITS_DOC = st.fixed_dictionaries({}, optional={"holders": HOLDERS, "limit": VALUES})

EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@EXAMPLES
@given(doc=LIMITS_DOC)
async def test_a_limits_document_of_any_shape_is_mended_and_its_type_runs(
    store: Store, doc: dict[str, Any]
) -> None:
    await store.db.limits.delete_many({})
    await store.db.limits.insert_one({"_id": "bar", **doc})
    # Recovery's round reads it without raising and mends what no worker could have written.
    await store.slots.free_lost(12.0)
    holders = await store.slots.holders("bar")
    assert all(isinstance(h.get("lease"), str) for h in holders), holders
    # Holders a worker wrote stay (a time it could have written, however old or new).
    kept = [h for h in holders if isinstance(h.get("at"), datetime)]
    assert len(kept) == len(holders)
    # Freeing a lease never raises, whatever is left.
    await store.slots.free("bar", "no such lease")
    # Once the junk is gone and old holders are freed, the type runs again.
    await store.slots.free_lost(0.0)
    now = store.clock.surely_now() + timedelta(seconds=1)
    left = [h for h in await store.slots.holders("bar") if h["at"] >= now - timedelta(hours=1)]
    lease = new_lease()
    assert await store.slots.take("bar", limit=len(left) + 1, lease=lease, worker_id="w")
    assert lease in {h["lease"] for h in await store.slots.holders("bar")}


DATES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.0001, 0.5, 1, 3, 1e12, 1e300, -5, 2**63 - 1]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
# Each field of a schedule, as the API writes it or as anything else could have.
SCHEDULE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(st.sampled_from(["baz", "BAZ", "", "nope"]), VALUES),
    "args": VALUES,
    "priority": st.one_of(st.integers(-20, 20), VALUES),
    "max_attempts": st.one_of(NUMBERS, VALUES),
    "timeout": st.one_of(NUMBERS, VALUES),
    "cron": st.one_of(
        st.sampled_from(["* * * * *", "0 0 31 2 *", "61 * * * *", "* * *", "@hourly", ""]),
        VALUES,
    ),
    "timezone": st.one_of(
        st.sampled_from(["UTC", "Europe/Paris", "Mars/Olympus", "../../etc", "UTC\x00"]), VALUES
    ),
    "every": st.one_of(NUMBERS, VALUES),
    "anchor": st.one_of(DATES, VALUES),
    "start_at": st.one_of(DATES, VALUES),
    "end_at": st.one_of(DATES, VALUES),
    "missed": st.one_of(st.sampled_from(["latest", "skip", "all"]), VALUES),
    "paused": st.one_of(st.just(False), VALUES),
    "next_at": st.one_of(DATES, VALUES),
    "created_at": st.one_of(DATES, VALUES),
}
SCHEDULE_DOC = st.fixed_dictionaries({}, optional=SCHEDULE_FIELDS)


async def _schedule_job_round(store: Store) -> int:
    from service.worker.schedules import Scheduler

    return await Scheduler(store.schedules, clock=store.clock, interval=5.0).run_once()


@EXAMPLES
@given(doc=SCHEDULE_DOC, due=st.booleans())
async def test_a_schedule_of_any_shape_never_stops_the_job_nor_the_api(
    store: Store, api: Any, doc: dict[str, Any], due: bool
) -> None:
    await store.db.schedules.delete_many({})
    if due:  # most shapes are only looked at once due
        doc = {**doc, "paused": False, "next_at": store.clock.now() - timedelta(seconds=1)}
    await store.db.schedules.insert_one(doc)
    await _schedule_job_round(store)
    await _schedule_job_round(store)
    response = await api.get("/schedules")
    assert response.status == 200, await response.text()
    listed = (await response.json())["schedules"]
    assert len(listed) == 1
    response = await api.get(f"/schedules/{listed[0]['id']}")
    assert response.status == 200, await response.text()


BAD_SCHEDULES: list[dict[str, Any]] = [
    {"type": "baz", "max_attempts": 1, "every": 0.0001},
    {"type": "baz", "max_attempts": 1, "every": 1e12},
    {"type": "baz", "max_attempts": 1, "every": 1e300},
    {"type": "baz", "max_attempts": 1, "every": float("nan")},
    {"type": "baz", "max_attempts": 1, "every": -3},
    {"type": "baz", "max_attempts": 1, "every": "3"},
    {"type": "baz", "max_attempts": 1, "cron": "61 * * * *"},
    {"type": "baz", "max_attempts": 1, "cron": "* * * * *", "timezone": "Mars/Olympus"},
    {"type": "baz", "max_attempts": 1, "cron": 5},
    {"type": "baz", "max_attempts": 1},
    {"type": 7, "max_attempts": 1, "every": 3},
    {"type": "baz", "max_attempts": 0, "every": 3},
    {"type": "baz", "max_attempts": 1, "every": 3, "args": {"x": float("nan")}},
    {"type": "baz", "max_attempts": 1, "every": 3, "priority": 99},
    {"max_attempts": 1, "every": 3},
]


async def test_fifteen_unusable_schedules_are_left_alone_and_named_and_a_good_one_runs(
    store: Store, api: Any
) -> None:
    now = store.clock.now()
    anchor = {"anchor": now - timedelta(seconds=30)}
    for doc in BAD_SCHEDULES:
        await store.db.schedules.insert_one(
            {**anchor, **doc, "paused": False, "next_at": now - timedelta(seconds=1)}
        )
    response = await api.post("/schedules", json={"type": "baz", "every": 2})
    assert response.status == 201, await response.text()
    good = (await response.json())["id"]
    # The good one is due at once: make it so, as if created an interval ago.
    await store.db.schedules.update_one(
        {"_id": ObjectId(good)}, {"$set": {"next_at": now - timedelta(seconds=1)}}
    )
    # The round makes the good one's occurrences up to its look-ahead (beside those the API
    # made when it answered), and nothing else.
    by_api = await store.db.tasks.count_documents({})
    created = await _schedule_job_round(store)
    made = await store.db.tasks.find({}).to_list()
    assert created >= 1 and len(made) == by_api + created
    assert {t["schedule_id"] for t in made} == {good}
    listed = (await (await api.get("/schedules")).json())["schedules"]
    assert len(listed) == len(BAD_SCHEDULES) + 1
    problems = {s["id"]: s["problems"] for s in listed}
    assert problems.pop(good) == []
    assert all(problems.values()), problems
    # Nothing moved: each unusable schedule keeps its next occurrence for a person to see.
    left = await store.db.schedules.count_documents(
        {"_id": {"$ne": ObjectId(good)}, "next_at": now - timedelta(seconds=1)}
    )
    assert left == len(BAD_SCHEDULES)
    stats = await (await api.get("/stats")).json()
    assert stats["unusable_schedules"] == len(BAD_SCHEDULES), stats


async def _paused_through_occurrences(store: Store, missed: str) -> str:
    """A schedule every 3 s, paused over about three of its occurrences (moved back in
    time rather than waited for), then resumed."""
    from service.store.occurrences import Timing

    anchor = store.clock.now() - timedelta(seconds=10)
    schedule = await store.schedules.create(
        template={"type": "baz", "max_attempts": 1},
        timing=Timing(every=3, start_at=anchor, missed=missed),
    )
    await store.schedules.pause(schedule.id, paused=True)
    await store.db.schedules.update_one({"_id": schedule.key}, {"$set": {"next_at": anchor}})
    resumed = await store.schedules.pause(schedule.id, paused=False)
    assert resumed is not None
    return schedule.id


async def test_occurrences_during_a_pause_follow_latest_once(store: Store) -> None:
    schedule_id = await _paused_through_occurrences(store, "latest")
    now = store.clock.now()
    await _schedule_job_round(store)
    made = await store.db.tasks.find({"schedule_id": schedule_id}).to_list()
    during = [t for t in made if t["occurrence"] <= now]
    assert len(during) == 1, [t["occurrence"] for t in made]
    assert now - during[0]["occurrence"] < timedelta(seconds=3)


async def test_occurrences_during_a_pause_are_skipped_with_skip(store: Store) -> None:
    schedule_id = await _paused_through_occurrences(store, "skip")
    now = store.clock.now()
    await _schedule_job_round(store)
    made = await store.db.tasks.find({"schedule_id": schedule_id}).to_list()
    assert made and all(t["occurrence"] > now for t in made), [t["occurrence"] for t in made]


WORKER_FIELDS = [
    "host",
    "pid",
    "started_at",
    "concurrency",
    "running",
    "tasks",
    "version",
    "types",
    "metrics_port",
    "last_seen",
]
WORKER_DOC = st.fixed_dictionaries(
    {}, optional={name: st.one_of(DATES, VALUES) for name in WORKER_FIELDS}
)


@EXAMPLES
@given(
    doc=WORKER_DOC,
    key=st.one_of(st.text(max_size=8), st.builds(ObjectId), st.integers(-(2**63), 2**63 - 1)),
)
async def test_a_worker_record_of_any_shape_is_listed(
    store: Store, api: Any, doc: dict[str, Any], key: Any
) -> None:
    await store.db.workers.delete_many({})
    await store.db.workers.insert_one({"_id": key, **doc})
    response = await api.get("/workers")
    assert response.status == 200, await response.text()
    (listed,) = (await response.json())["workers"]
    assert listed["id"] == str(key)


KEY_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "request": VALUES,
        "task": st.one_of(VALUES, st.fixed_dictionaries({}, optional={"_id": VALUES})),
        "created_at": st.one_of(DATES, VALUES),
        "expires_at": st.one_of(DATES, VALUES),
        "inserted": VALUES,
    },
)


@EXAMPLES
@given(record=KEY_RECORD)
async def test_an_idempotency_record_of_any_shape_answers_without_a_500(
    store: Store, api: Any, record: dict[str, Any]
) -> None:
    await store.db.idempotency_keys.delete_many({})
    await store.db.idempotency_keys.insert_one({"_id": "the-key", **record})
    response = await api.post(
        "/tasks", json={"type": "baz"}, headers={"Idempotency-Key": "the-key"}
    )
    # A new task, an earlier one, or a conflict with what the key holds: never a 500.
    assert response.status in (200, 201, 409, 410), await response.text()
    body = await response.json()
    if response.status >= 400:
        assert body["error"]["code"] in ("idempotency_key_reused", "task_deleted"), body


async def test_workers_run_on_through_unusable_schedules_and_junk_limits(
    store: Store, api: Any, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    stub = StubHttpServer(status=200)
    await stub.start()
    try:
        now = store.clock.now()
        for doc in BAD_SCHEDULES:
            await store.db.schedules.insert_one(
                {"anchor": now, **doc, "paused": False, "next_at": now - timedelta(seconds=1)}
            )
        # Every limited type's document is junk, each in its own way.
        await store.db.limits.insert_many(
            [
                {"_id": "bar", "holders": "not a list", "limit": 2},
                {"_id": "baz", "holders": [5, None, {"lease": [1, 2]}, {"at": now}], "limit": 2},
                {"_id": "foo", "holders": [{"lease": "no time"}, {"lease": "x", "at": "now"}]},
            ]
        )
        workers = [
            spawn_worker(type_limits="bar=2,baz=2,foo=2", schedule_interval=0.2, bar_url=stub.url)
            for _ in range(2)
        ]
        for worker in workers:
            await wait_until_started(worker)
        made = [
            await store.tasks.create(task_type=t, run_at=None, max_attempts=1)
            for t in ("bar", "baz", "foo") * 3
        ]

        async def all_complete() -> bool:
            found = [await store.tasks.get(t.id) for t in made]
            return all(t.state == State.COMPLETE for t in found)

        await eventually(all_complete, within=60)
        await asyncio.sleep(3)  # more rounds of every job over the same documents
        for worker in workers:
            assert worker.alive(), worker.stderr()
            assert "Traceback" not in worker.stderr(), worker.stderr()
        for path in ("/schedules", "/stats", "/workers", "/tasks", "/metrics"):
            response = await api.get(path)
            assert response.status == 200, (path, await response.text())
    finally:
        await stub.close()
