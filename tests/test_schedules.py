"""Recurring schedules: when occurrences fall (cron in a time zone, every N seconds), the
API, the schedule job's exactly-once and missed-occurrence rules, and a fleet of real
processes (three workers, two APIs) turning occurrences into tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pymongo.errors import DuplicateKeyError

from service.config import Settings
from service.models import Schedule, State, Task
from service.store import Store
from service.store.materialiser import Materialiser
from service.store.occurrences import Timing, latest_occurrence, next_occurrence
from service.store.schedules import OCCURRENCE_INDEX
from service.web.app import create_app
from service.worker.schedules import Scheduler
from tests.helpers import (
    CLI,
    ApiProcess,
    WorkerProcess,
    all_tasks,
    eventually,
    settings_env,
    wait_until_started,
)

FOO = {"type": "foo", "max_attempts": 1, "priority": 0, "args": None, "timeout": None}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def cron_schedule(cron: str, timezone: str, **fields: Any) -> Schedule:
    return Schedule.from_document(
        {"_id": "s", "type": "foo", "max_attempts": 1, "cron": cron, "timezone": timezone} | fields
    )


def occurrences(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    found: list[datetime] = []
    moment, inclusive = after, True
    for _ in range(count):
        following = next_occurrence(schedule, moment, inclusive=inclusive)
        if following is None:
            break
        found.append(following)
        moment, inclusive = following, False
    return found


# -- when occurrences fall ---------------------------------------------------------------------


def test_cron_in_paris_follows_the_wall_clock_across_both_dst_changes() -> None:
    daily = cron_schedule("0 9 * * *", "Europe/Paris")
    # Summer time starts on 29 March 2026: 09:00 in Paris is 08:00 UTC before, 07:00 after.
    assert occurrences(daily, utc("2026-03-27T12:00:00+00:00"), 4) == [
        utc("2026-03-28T08:00:00+00:00"),
        utc("2026-03-29T07:00:00+00:00"),
        utc("2026-03-30T07:00:00+00:00"),
        utc("2026-03-31T07:00:00+00:00"),
    ]
    # It ends on 25 October 2026: back to 08:00 UTC.
    assert occurrences(daily, utc("2026-10-24T00:00:00+00:00"), 3) == [
        utc("2026-10-24T07:00:00+00:00"),
        utc("2026-10-25T08:00:00+00:00"),
        utc("2026-10-26T08:00:00+00:00"),
    ]
    # Hourly at half past: the repeated hour of the autumn change comes twice, an hour apart.
    hourly = cron_schedule("30 * * * *", "Europe/Paris")
    found = occurrences(hourly, utc("2026-10-24T22:00:00+00:00"), 5)
    assert [b - a for a, b in itertools.pairwise(found)] == [timedelta(hours=1)] * 4
    # The same expression in UTC is another instant.
    assert next_occurrence(
        cron_schedule("0 9 * * *", "UTC"), utc("2026-03-27T12:00:00+00:00"), inclusive=True
    ) == utc("2026-03-28T09:00:00+00:00")


def test_cron_bounds_and_inclusive_start() -> None:
    every5 = cron_schedule(
        "*/5 * * * *",
        "UTC",
        start_at=utc("2026-01-01T00:10:00+00:00"),
        end_at=utc("2026-01-01T00:20:00+00:00"),
    )
    assert occurrences(every5, utc("2026-01-01T00:00:00+00:00"), 10) == [
        utc("2026-01-01T00:10:00+00:00"),
        utc("2026-01-01T00:15:00+00:00"),
        utc("2026-01-01T00:20:00+00:00"),
    ]
    now = utc("2026-01-01T00:17:00+00:00")
    stored = dataclasses.replace(every5, next_at=utc("2026-01-01T00:10:00+00:00"))
    assert latest_occurrence(stored, now) == utc("2026-01-01T00:15:00+00:00")


def test_every_counts_from_its_anchor() -> None:
    anchor = utc("2026-01-01T00:00:00+00:00")
    every = Schedule.from_document(
        {"_id": "s", "type": "foo", "max_attempts": 1, "every": 1.5, "anchor": anchor}
    )
    assert occurrences(every, anchor - timedelta(hours=1), 3) == [
        anchor,
        anchor + timedelta(seconds=1.5),
        anchor + timedelta(seconds=3),
    ]
    assert next_occurrence(every, anchor + timedelta(seconds=1.5), inclusive=False) == (
        anchor + timedelta(seconds=3)
    )
    stored = dataclasses.replace(every, next_at=anchor)
    now = anchor + timedelta(hours=1, milliseconds=700)
    assert latest_occurrence(stored, now) == anchor + timedelta(hours=1)
    assert latest_occurrence(stored, anchor - timedelta(seconds=1)) is None


# -- the API -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "nope", "every": 5}, "type"),
        ({"type": "foo", "every": 5, "args": {"x": 1}}, "args"),
        ({"type": "foo"}, "cron"),
        ({"type": "foo", "every": 5, "cron": "* * * * *"}, "cron"),
        ({"type": "foo", "cron": "61 * * * *"}, "cron"),
        ({"type": "foo", "cron": "* * * * * *"}, "cron"),
        ({"type": "foo", "cron": "@hourly"}, "cron"),
        ({"type": "foo", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"type": "foo", "every": 5, "timezone": "Europe/Paris"}, "timezone"),
        ({"type": "foo", "every": 0.5}, "every"),
        ({"type": "foo", "every": True}, "every"),
        ({"type": "foo", "every": 5, "missed": "all"}, "missed"),
        ({"type": "foo", "every": 5, "run_at": 0}, "run_at"),
        ({"type": "foo", "every": 5, "priority": 11}, "priority"),
        (
            {"type": "foo", "every": 5, "start_at": 2_000_000_000, "end_at": 1_900_000_000},
            "end_at",
        ),
        ({"type": "foo", "every": {"$gt": 1}}, "body"),
    ],
)
async def test_bad_schedules_are_refused_with_400(
    api: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    response = await api.post("/schedules", json=body)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"], error
    assert (await (await api.get("/schedules")).json()) == {"schedules": []}


async def test_schedule_lifecycle_through_the_api(api: TestClient[Any, Any]) -> None:
    body = {
        "type": "FOO",
        "cron": "*/5 * * * *",
        "timezone": "Europe/Paris",
        "priority": 3,
        "missed": "SKIP",
    }
    created = await api.post("/schedules", json=body)
    assert created.status == 201, await created.text()
    schedule = await created.json()
    assert created.headers["Location"] == f"/schedules/{schedule['id']}"
    assert schedule["type"] == "foo" and schedule["missed"] == "skip"
    assert schedule["timezone"] == "Europe/Paris" and schedule["paused"] is False
    assert schedule["max_attempts"] == 3 and schedule["priority"] == 3
    next_at = utc(schedule["next_at"].replace("Z", "+00:00"))
    assert next_at.minute % 5 == 0 and next_at > datetime.now(UTC) - timedelta(seconds=5)
    path = f"/schedules/{schedule['id']}"
    assert (await (await api.get(path)).json()) == schedule
    assert (await (await api.get("/schedules")).json()) == {"schedules": [schedule]}
    paused = await api.post(f"{path}/pause")
    assert paused.status == 200 and (await paused.json())["paused"] is True
    resumed = await api.post(f"{path}/resume")
    assert resumed.status == 200 and (await resumed.json())["paused"] is False
    assert (await api.delete(path)).status == 204
    for method, target in [
        ("GET", path),
        ("DELETE", path),
        ("POST", f"{path}/pause"),
        ("POST", f"{path}/resume"),
        ("GET", "/schedules/not-an-id"),
    ]:
        missing = await api.request(method, target)
        assert missing.status == 404, (method, target)
        assert (await missing.json())["error"]["code"] == "schedule_not_found"
    document = await (await api.get("/openapi.json")).json()
    for path_name, methods in {
        "/schedules": {"get", "post"},
        "/schedules/{id}": {"get", "delete"},
        "/schedules/{id}/pause": {"post"},
        "/schedules/{id}/resume": {"post"},
    }.items():
        assert set(document["paths"][path_name]) == methods
    task_fields = document["components"]["schemas"]["Task"]["properties"]
    assert {"schedule_id", "occurrence"} <= set(task_fields)


async def test_the_api_makes_a_new_or_resumed_schedules_first_occurrences(
    store: Store, api: TestClient[Any, Any], settings: Settings
) -> None:
    """With no worker running, the tasks of the occurrences within the schedule job's first
    lookahead exist when POST /schedules answers, once each and due at their occurrence,
    and again when a pause withdrew them and /resume answers: they start on time rather than
    when a worker's round finds them."""
    lookahead = Materialiser(store.schedules, interval=settings.schedule_interval).lookahead
    began = store.clock.now()
    created = await api.post("/schedules", json={"type": "baz", "every": 2})
    assert created.status == 201, await created.text()
    schedule = await created.json()
    path = f"/schedules/{schedule['id']}"

    async def made() -> list[datetime]:
        """The run_at of each task the schedule made, in order."""
        found = [t for t in await all_tasks(store) if t.schedule_id == schedule["id"]]
        assert all(t.run_at == t.occurrence and t.state == State.NOTSTARTED for t in found)
        return sorted(t.run_at for t in found if t.run_at is not None)

    def check(times: list[datetime], shown: dict[str, Any], *, since: datetime) -> None:
        assert len(times) >= lookahead.total_seconds() // 2 - 2, times
        gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
        assert gaps == {2.0}, gaps  # one task per occurrence, none missing
        assert since < times[0] and times[-1] <= store.clock.now() + lookahead
        # next_at: the first occurrence no task is made for yet.
        next_at = utc(shown["next_at"].replace("Z", "+00:00"))
        assert next_at == times[-1] + timedelta(seconds=2)

    check(await made(), schedule, since=began)
    assert (await api.post(f"{path}/pause")).status == 200
    assert await made() == []  # none due yet: all withdrawn
    resuming = store.clock.now()
    resumed = await api.post(f"{path}/resume")
    assert resumed.status == 200
    check(await made(), await resumed.json(), since=resuming - timedelta(seconds=2))


async def test_schedule_writes_need_a_token(
    settings: Settings, store: Store, aiohttp_client: Any
) -> None:
    guarded = dataclasses.replace(settings, api_tokens=("s3cret",))
    client = await aiohttp_client(create_app(guarded))
    body = {"type": "foo", "every": 60}
    assert (await client.post("/schedules", json=body)).status == 401
    good = {"Authorization": "Bearer s3cret"}
    created = await client.post("/schedules", json=body, headers=good)
    assert created.status == 201
    path = f"/schedules/{(await created.json())['id']}"
    assert (await client.get(path)).status == 200
    for method, target in [("POST", f"{path}/pause"), ("DELETE", path)]:
        assert (await client.request(method, target)).status == 401
        assert (await client.request(method, target, headers=good)).status in (200, 204)


# -- the schedule job, one round at a time -----------------------------------------------------


def _scheduler(store: Store, *, interval: float) -> Scheduler:
    return Scheduler(store.schedules, clock=store.clock, interval=interval)


async def _overdue(store: Store, missed: str, *, by: float, every: float = 1) -> Schedule:
    """An `every`-second schedule whose first occurrence was `by` seconds ago (in the future
    if negative) and never made."""
    schedule = await store.schedules.create(template=FOO, timing=Timing(every=every, missed=missed))
    anchor = store.clock.surely_now() - timedelta(seconds=by)
    await store.db.schedules.update_one(
        {"_id": schedule.key}, {"$set": {"anchor": anchor, "next_at": anchor}}
    )
    found = await store.schedules.get(schedule.id)
    assert found is not None
    return found


async def _tasks_of(store: Store, schedule: Schedule) -> list[Task]:
    return sorted(
        (t for t in await all_tasks(store) if t.schedule_id == schedule.id),
        key=lambda t: t.occurrence or datetime.min.replace(tzinfo=UTC),
    )


def _consecutive(first: datetime | None, tasks: list[Task], step: float = 1) -> None:
    """The tasks stand for consecutive occurrences, `step` seconds apart, from `first`."""
    assert first is not None and tasks
    assert [t.occurrence for t in tasks] == [
        first + timedelta(seconds=step * k) for k in range(len(tasks))
    ]
    assert all(t.run_at == t.occurrence for t in tasks)


def _made_ahead(tasks: list[Task], job: Scheduler) -> None:
    """Each task was made before its occurrence, by at most the job's lookahead."""
    for task in tasks:
        assert task.created_at is not None and task.occurrence is not None
        assert task.created_at < task.occurrence <= task.created_at + job.maker.lookahead


async def test_missed_occurrences_latest_once_or_none(store: Store) -> None:
    latest = await _overdue(store, "latest", by=10.5)
    skip = await _overdue(store, "skip", by=10.5)
    job = _scheduler(store, interval=0.2)
    created = await job.run_once()
    assert latest.next_at is not None and skip.next_at is not None
    # latest: the latest missed occurrence once (made late), then the coming ones ahead.
    made = await _tasks_of(store, latest)
    missed = latest.next_at + timedelta(seconds=10)
    assert made[0].occurrence == made[0].run_at == missed
    assert made[0].created_at is not None and made[0].created_at >= missed
    _consecutive(missed, made)
    _made_ahead(made[1:], job)
    assert len(made) >= 2  # the next occurrence is half a second away: made ahead
    # skip: none of the missed ones; the coming ones ahead.
    made_skip = await _tasks_of(store, skip)
    _consecutive(skip.next_at + timedelta(seconds=11), made_skip)
    _made_ahead(made_skip, job)
    assert created == len(made) + len(made_skip)
    # Each schedule moved on past what it made; a second round makes no missed one again.
    for schedule, tasks in ((latest, made), (skip, made_skip)):
        moved = await store.schedules.get(schedule.id)
        assert moved is not None and tasks[-1].occurrence is not None
        assert moved.next_at == tasks[-1].occurrence + timedelta(seconds=1)
    await job.run_once()
    again = await _tasks_of(store, latest)
    assert [t.occurrence for t in again if t.occurrence is not None and t.occurrence <= missed] == [
        missed
    ]
    assert all(t.occurrence is not None and t.occurrence > missed for t in again[1:])


async def test_racing_jobs_make_one_task_per_occurrence(store: Store) -> None:
    schedules = [await _overdue(store, "latest", by=0.2) for _ in range(5)]
    jobs = [_scheduler(store, interval=0.2) for _ in range(4)]
    created = await asyncio.gather(*(job.run_once() for job in jobs for _ in range(3)))
    total = 0
    for schedule in schedules:
        # The due occurrence and at least the one 0.8 s ahead, each once.
        made = await _tasks_of(store, schedule)
        _consecutive(schedule.next_at, made)
        assert len(made) >= 2
        total += len(made)
    assert sum(created) == total
    # The unique index itself refuses a second task for an occurrence.
    with pytest.raises(DuplicateKeyError):
        await store.db.tasks.insert_one(
            {"schedule_id": made[0].schedule_id, "occurrence": made[0].occurrence}
        )
    indexes = await store.db.tasks.index_information()
    assert indexes[OCCURRENCE_INDEX]["unique"] is True
    # Tasks made without a schedule are outside the partial index.
    for _ in range(2):
        await store.tasks.create(task_type="foo", run_at=None, max_attempts=1)


async def test_paused_schedule_makes_nothing_until_resumed(store: Store) -> None:
    schedule = await _overdue(store, "latest", by=5.5)
    await store.schedules.pause(schedule.id, paused=True)
    job = _scheduler(store, interval=0.2)
    assert await job.run_once() == 0
    assert await _tasks_of(store, schedule) == []
    await store.schedules.pause(schedule.id, paused=False)
    created = await job.run_once()
    made = await _tasks_of(store, schedule)
    assert schedule.next_at is not None
    # The latest missed occurrence, then the coming ones ahead.
    _consecutive(schedule.next_at + timedelta(seconds=5), made)
    _made_ahead(made[1:], job)
    assert created == len(made) >= 2


async def test_deleted_schedule_makes_nothing_more(store: Store) -> None:
    schedule = await _overdue(store, "latest", by=3.5)
    assert await store.schedules.delete(schedule.id)
    assert await _scheduler(store, interval=0.2).run_once() == 0
    assert await _tasks_of(store, schedule) == []


async def _made_ahead_and_due(store: Store, job: Scheduler) -> tuple[Schedule, list[Task]]:
    """An every-3s schedule after one round (looking 5.4 s ahead) made its occurrences 4.5 s
    and 1.5 s ago (due, the first of them claimed: STARTED) and those 1.5 s and 4.5 s ahead
    (waiting)."""
    schedule = await _overdue(store, "latest", by=4.5, every=3)
    await job.run_once()
    made = await _tasks_of(store, schedule)
    _consecutive(schedule.next_at, made, step=3)
    assert len(made) == 4, made
    started = await store.claims.claim("w", lease="l")
    assert started is not None and started.id == made[0].id
    return schedule, made


async def test_pause_and_delete_withdraw_only_the_tasks_not_yet_due(store: Store) -> None:
    job = _scheduler(store, interval=4)  # makes tasks up to 5.4 s ahead
    schedule, made = await _made_ahead_and_due(store, job)
    await _made_ahead_and_due(store, job)  # another schedule's
    plain = await store.tasks.create(
        task_type="foo", run_at=store.clock.now() + timedelta(minutes=1), max_attempts=1
    )
    others = {t.id: t for t in await all_tasks(store) if t.schedule_id != schedule.id}
    ahead = made[2].occurrence

    # Pausing removes the two ahead and moves next_at back to the first of them.
    paused = await store.schedules.pause(schedule.id, paused=True)
    assert paused is not None and paused.paused and paused.next_at == ahead
    stored = await store.schedules.get(schedule.id)
    assert stored == paused
    kept = await _tasks_of(store, schedule)
    assert [(t.id, t.state) for t in kept] == [
        (made[0].id, State.STARTED),
        (made[1].id, State.NOTSTARTED),
    ]
    assert await job.run_once() == 0
    assert await _tasks_of(store, schedule) == kept
    # Resuming continues from there: the same occurrences are made again, once each.
    await store.schedules.pause(schedule.id, paused=False)
    assert await job.run_once() == 2
    again = await _tasks_of(store, schedule)
    _consecutive(schedule.next_at, again, step=3)
    assert len(again) == 4 and again[:2] == kept

    # Deleting removes the ahead ones again, and leaves the due and the running one.
    assert await store.schedules.delete(schedule.id)
    assert [t.id for t in await _tasks_of(store, schedule)] == [t.id for t in kept]
    # Nothing else was touched: another schedule's tasks, a task made through the API.
    assert {t.id: t for t in await all_tasks(store) if t.schedule_id != schedule.id} == others
    assert plain.id in others


async def test_a_round_that_read_the_schedule_before_a_pause_or_delete(
    store: Store,
) -> None:
    """A worker's round reads a schedule, the schedule is paused (or deleted) and its ahead
    tasks withdrawn, then the round inserts the task of the occurrence it read: its advance,
    fenced on the schedule not being paused, fails, and the round withdraws the task."""
    job = _scheduler(store, interval=2)
    for stop in ("pause", "delete"):
        schedule = await _overdue(store, "latest", by=-1.5, every=60)
        now = store.clock.surely_now()
        (read,) = await store.schedules.due(now=now + job.maker.lookahead, limit=10)
        if stop == "pause":
            assert await store.schedules.pause(schedule.id, paused=True) is not None
        else:
            assert await store.schedules.delete(schedule.id)
        assert await job.maker.materialise(read, now) == 0
        assert await _tasks_of(store, schedule) == []
        if stop == "pause":
            stored = await store.schedules.get(schedule.id)
            assert stored is not None and stored.next_at == schedule.next_at
            await store.schedules.pause(schedule.id, paused=False)
            assert await job.run_once() == 1
            (made,) = await _tasks_of(store, schedule)
            assert made.occurrence == schedule.next_at
            assert await store.schedules.delete(schedule.id)
    # Rounds racing on an active schedule: one's insert is refused and the other's advance,
    # and the task that stands is not withdrawn.
    schedule = await _overdue(store, "latest", by=-1.5, every=60)
    now = store.clock.surely_now()
    (read,) = await store.schedules.due(now=now + job.maker.lookahead, limit=10)
    assert read.next_at is not None
    following = next_occurrence(read, read.next_at, inclusive=False)
    assert await store.schedules.advance(read, to=following, now=now)  # the other's advance
    assert await job.maker.materialise(read, now) == 1  # this one's insert stands
    assert await _scheduler(store, interval=2).maker.materialise(read, now) == 0  # a third: refused
    (made,) = await _tasks_of(store, schedule)
    assert made.occurrence == read.next_at


# -- a fleet of real processes -----------------------------------------------------------------


@pytest.fixture
def two_apis(store: Store, start_api: Callable[..., ApiProcess]) -> list[ApiProcess]:
    # The API makes a new schedule's first lookahead of occurrences: the workers' interval.
    return [start_api(**FAST) for _ in range(2)]


FAST_INTERVAL = 0.2
FAST = {"schedule_interval": FAST_INTERVAL, "log_level": "INFO"}


def _check_once_each(tasks: list[Task], *, lookahead: timedelta) -> None:
    """One task per occurrence, none started before it nor created earlier than the schedule
    job's lookahead, each run at most once."""
    per_occurrence = Counter((t.schedule_id, t.occurrence) for t in tasks)
    assert all(n == 1 for n in per_occurrence.values()), per_occurrence.most_common(3)
    for task in tasks:
        assert task.occurrence is not None and task.run_at == task.occurrence
        assert task.created_at is not None and task.created_at >= task.occurrence - lookahead
        assert task.started_at is None or task.started_at >= task.occurrence
        assert task.attempts <= 1, task


async def test_fleet_makes_exactly_one_task_per_occurrence(
    store: Store,
    two_apis: list[ApiProcess],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    workers = [spawn_worker(**FAST) for _ in range(3)]
    for worker in workers:
        await wait_until_started(worker)
    first, second = (api.url for api in two_apis)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first}/schedules", json={"type": "foo", "every": 1}) as created:
            assert created.status == 201, await created.text()
            schedule = await created.json()
        async with http.get(f"{second}/schedules") as listed:
            assert [s["id"] for s in (await listed.json())["schedules"]] == [schedule["id"]]

        async def made(count: int) -> bool:
            return len([t for t in await all_tasks(store) if t.schedule_id]) >= count

        await eventually(lambda: made(1), within=30, what="the first task made")
        began = time.monotonic()
        await eventually(lambda: made(6), within=30, what="six tasks made")
        # One a second, not faster (each made up to 1.22 s ahead of its occurrence).
        assert time.monotonic() - began > 3.5
        async with http.delete(f"{second}/schedules/{schedule['id']}") as deleted:
            assert deleted.status == 204
        deleted_at = store.clock.now()
        tasks = [t for t in await all_tasks(store) if t.schedule_id]
        async with http.get(f"{second}/tasks/{tasks[0].id}") as shown:
            body = await shown.json()
            assert body["schedule_id"] == schedule["id"] and body["occurrence"] == body["run_at"]

    async def all_ran() -> bool:
        found = [t for t in await all_tasks(store) if t.schedule_id]
        return all(t.state == State.COMPLETE for t in found)

    await eventually(all_ran, within=30)
    # Watched for three periods after the delete: nothing newer than it.
    await asyncio.sleep(3)
    tasks = [t for t in await all_tasks(store) if t.schedule_id]
    _check_once_each(tasks, lookahead=_scheduler(store, interval=FAST_INTERVAL).maker.lookahead)
    assert all(t.attempts == 1 for t in tasks)
    assert all(t.occurrence is not None and t.occurrence <= deleted_at for t in tasks)
    occurrences = sorted(t.occurrence for t in tasks if t.occurrence is not None)
    steps = {(b - a).total_seconds() for a, b in itertools.pairwise(occurrences)}
    assert all(step >= 1 and step == int(step) for step in steps), steps
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.stderr()


ON_TIME = timedelta(seconds=0.5)


async def test_tasks_made_ahead_start_on_time_through_pause_resume_and_delete(
    store: Store,
    settings: Settings,
    aiohttp_client: Callable[[Any], Any],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    """With a job interval of seconds, each occurrence's task is made ahead and started by
    the workers' wake-ups at its occurrence (made when due, it would start up to a round
    late). Pausing and deleting withdraw the tasks not yet due and nothing else; resuming
    continues, on time again from one lookahead on."""
    interval = 2.0
    lookahead = _scheduler(store, interval=interval).maker.lookahead  # 3.2 s
    # The API makes a new or resumed schedule's first lookahead: the workers' interval.
    api = await aiohttp_client(
        create_app(dataclasses.replace(settings, schedule_interval=interval))
    )
    workers = [spawn_worker(schedule_interval=interval, log_level="INFO") for _ in range(2)]
    for worker in workers:
        await wait_until_started(worker)
    # A first occurrence far enough ahead for a round to make it ahead, as every later one.
    start_at = store.clock.now() + lookahead + timedelta(seconds=1)
    body = {"type": "foo", "every": 1, "start_at": start_at.isoformat()}
    created = await api.post("/schedules", json=body)
    assert created.status == 201, await created.text()
    path = f"/schedules/{(await created.json())['id']}"
    schedule_id = path.rsplit("/", 1)[1]

    async def tasks() -> list[Task]:
        found = [t for t in await all_tasks(store) if t.schedule_id == schedule_id]
        return sorted(found, key=lambda t: t.occurrence or start_at)

    async def started_after(moment: datetime, count: int) -> bool:
        late = [t for t in await tasks() if t.occurrence and t.occurrence > moment]
        return sum(t.started_at is not None for t in late) >= count

    def check_on_time(found: list[Task]) -> None:
        # Started at its occurrence (the database's own stamps), never before it.
        delays = [
            (t.started_at - t.occurrence).total_seconds()
            for t in found
            if t.started_at is not None and t.occurrence is not None
        ]
        assert len(delays) == len(found)
        assert all(0 <= delay <= ON_TIME.total_seconds() for delay in delays), delays
        # Made ahead of it.
        assert all(t.created_at and t.occurrence and t.created_at < t.occurrence for t in found)

    async def none_ahead(moment: datetime) -> bool:
        return not [t for t in await tasks() if t.occurrence and t.occurrence > moment]

    async def watch(moment: datetime) -> None:
        # A round that read the schedule before the change may insert one more task; it
        # withdraws it itself. Then nothing comes for a whole lookahead.
        await eventually(lambda: none_ahead(moment), within=10, what=f"no task after {moment} left")
        until = moment + lookahead + timedelta(seconds=0.5)
        await asyncio.sleep(max(0.0, (until - store.clock.now()).total_seconds()))
        assert await none_ahead(moment)

    await eventually(
        lambda: started_after(start_at - timedelta(seconds=1), 6),
        within=30,
        what="six tasks started",
    )
    check_on_time([t for t in await tasks() if t.started_at is not None])

    # Pause: the tasks not yet due go, those due or running stay (and complete).
    before = store.clock.now()
    kept = [t.id for t in await tasks() if t.occurrence and t.occurrence <= before]
    paused = await api.post(f"{path}/pause")
    assert paused.status == 200
    paused_at = store.clock.now()
    assert set(kept) <= {t.id for t in await tasks()}
    await watch(paused_at)
    # Resume: occurrences missed meanwhile follow the missed policy; from one lookahead on,
    # each is made ahead and starts on time again.
    resumed_at = store.clock.now()
    resumed = await api.post(f"{path}/resume")
    assert resumed.status == 200
    await eventually(
        lambda: started_after(resumed_at + lookahead, 3),
        within=30,
        what="three tasks started after the resume",
    )
    check_on_time(
        [
            t
            for t in await tasks()
            if t.occurrence and t.occurrence > resumed_at + lookahead and t.started_at
        ]
    )
    made_while_paused = [t for t in await tasks() if t.created_at and t.created_at > paused_at]
    assert all(t.created_at and t.created_at > resumed_at for t in made_while_paused)

    # Delete: the same, and nothing more is made.
    before = store.clock.now()
    kept = [t.id for t in await tasks() if t.occurrence and t.occurrence <= before]
    assert (await api.delete(path)).status == 204
    deleted_at = store.clock.now()
    assert set(kept) <= {t.id for t in await tasks()}
    await watch(deleted_at)

    async def all_ran() -> bool:
        return all(t.state == State.COMPLETE for t in await tasks())

    await eventually(all_ran, within=30)
    found = await tasks()
    _check_once_each(found, lookahead=lookahead)
    assert set(kept) <= {t.id for t in found}
    for worker in workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.stderr()


CAUGHT_UP = re.compile(r"schedule (\w+): task \w+ \(foo\) for (\S+) \(the latest missed")
SKIPPED = re.compile(r"schedule (\w+): missed occurrences from (\S+) to (\S+) skipped")


async def test_missed_occurrences_after_the_whole_fleet_was_down(
    store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    latest = await store.schedules.create(template=FOO, timing=Timing(every=1))
    skip = await store.schedules.create(template=FOO, timing=Timing(every=1, missed="skip"))
    fleet = [spawn_worker(**FAST) for _ in range(3)]
    # Each worker up (its signal handlers set) before the SIGTERM: the first one up makes
    # the first tasks ahead at once.
    for worker in fleet:
        await wait_until_started(worker)

    async def each_made_one() -> bool:
        return all([await _tasks_of(store, s) for s in (latest, skip)])

    await eventually(each_made_one, within=30)
    for worker in fleet:
        worker.signal(signal.SIGTERM)
    for worker in fleet:
        assert worker.wait() == 0, worker.stderr()
    first_missed = {}
    for schedule in (latest, skip):
        stored = await store.schedules.get(schedule.id)
        assert stored is not None and stored.next_at is not None
        first_missed[schedule.id] = stored.next_at
    before = {s.id: len(await _tasks_of(store, s)) for s in (latest, skip)}
    # Four periods or more pass with no worker at all after the first occurrence not made.
    back_at = max(first_missed.values()) + timedelta(seconds=4.5)
    await asyncio.sleep(max(0.0, (back_at - store.clock.now()).total_seconds()))
    survivor = spawn_worker(**FAST)

    async def back() -> bool:
        return bool(CAUGHT_UP.search(survivor.stderr()) and SKIPPED.search(survivor.stderr()))

    await eventually(back, within=30)
    caught = [m for m in CAUGHT_UP.finditer(survivor.stderr())]
    assert [m[1] for m in caught] == [latest.id], survivor.stderr()
    caught_up_at = utc(caught[0][2])
    (skipped,) = [m for m in SKIPPED.finditer(survivor.stderr())]
    assert skipped[1] == skip.id
    skipped_up_to = utc(skipped[3])
    assert utc(skipped[2]) == first_missed[skip.id]

    # latest: of the occurrences missed, only the latest was made, once.
    made = [t for t in await _tasks_of(store, latest)][before[latest.id] :]
    assert made[0].occurrence == caught_up_at
    assert caught_up_at - first_missed[latest.id] >= timedelta(seconds=3)
    # skip: none of them; the next one made is a future one.
    made_skip = [t for t in await _tasks_of(store, skip)][before[skip.id] :]
    assert all(t.occurrence is not None and t.occurrence > skipped_up_to for t in made_skip)
    assert skipped_up_to - first_missed[skip.id] >= timedelta(seconds=3)
    _check_once_each(
        [*await _tasks_of(store, latest), *await _tasks_of(store, skip)],
        lookahead=_scheduler(store, interval=FAST_INTERVAL).maker.lookahead,
    )
    survivor.signal(signal.SIGTERM)
    assert survivor.wait() == 0, survivor.stderr()


async def test_task_runner_schedules_lists_them(settings: Settings, store: Store) -> None:
    every = await store.schedules.create(template=FOO, timing=Timing(every=60))
    cron = await store.schedules.create(
        template=FOO, timing=Timing(cron="0 9 * * 1-5", timezone="Europe/Paris", missed="skip")
    )
    await store.schedules.pause(cron.id, paused=True)
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "schedules",
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split() == ["schedule", "type", "state", "missed", "next", "occurrence", "when"]
    assert lines[1].split()[:4] == [every.id, "foo", "active", "latest"]
    assert lines[1].endswith("every 60s")
    assert lines[2].split()[:4] == [cron.id, "foo", "paused", "skip"]
    assert lines[2].endswith("cron 0 9 * * 1-5 Europe/Paris")
    assert lines[3] == "2 schedule(s)"


async def test_occurrences_found_late_by_a_round_are_each_made(store: Store) -> None:
    schedule = await _overdue(store, "skip", by=1.5)
    job = _scheduler(store, interval=0.5)  # late after 2 s: the two past ones are on time
    created = await job.run_once()
    made = await _tasks_of(store, schedule)
    # The two past occurrences, then those before the next round (1.55 s ahead) in advance.
    _consecutive(schedule.next_at, made)
    assert created == len(made) >= 4
    _made_ahead(made[2:], job)


async def test_a_draining_worker_makes_no_more_scheduled_tasks(
    store: Store, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # A long task keeps the worker draining for seconds after SIGTERM, over several rounds
    # of its schedule job, while a schedule has an occurrence every second.
    worker = spawn_worker(**FAST, foo_seconds=4.0, shutdown_grace=10.0)
    await wait_until_started(worker)
    long = await store.tasks.create(task_type="foo", run_at=None, max_attempts=1)

    async def long_started() -> bool:
        return (await store.tasks.get(long.id)).state is State.STARTED

    await eventually(long_started, within=30)
    schedule = await store.schedules.create(template={**FOO, "type": "baz"}, timing=Timing(every=1))
    await eventually(lambda: _tasks_of(store, schedule), within=30)
    worker.signal(signal.SIGTERM)
    stopped_at = store.clock.now()
    assert worker.wait() == 0, worker.stderr()
    assert (await store.tasks.get(long.id)).state is State.COMPLETE  # it drained
    made = await _tasks_of(store, schedule)
    late = [t for t in made if t.created_at is not None and t.created_at > stopped_at]
    assert not late, [(t.id, t.created_at) for t in late]
