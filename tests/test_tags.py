"""Tags: given on create (one task, a batch's items, a schedule's template and so each of its
tasks), checked at the edge, stored as an array, read defensively, shown as a list, and
filtered by with GET /tasks?tag= on an index of their own."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from bson import ObjectId

from service.models import Task
from service.store import Store
from service.store.base import TIME_SORT
from service.worker.schedules import Scheduler
from tests.helpers import all_tasks, listed_ids

Client = TestClient[Any, Any]


async def create(api: Client, **body: Any) -> str:
    response = await api.post("/tasks", json=body)
    assert response.status == 201, await response.text()
    task: dict[str, Any] = await response.json()
    assert task["tags"] == body.get("tags", [])
    return str(task["id"])


async def test_tags_are_shown_and_filtered_by_with_the_other_filters(
    api: Client, store: Store
) -> None:
    later = (store.clock.now() + timedelta(days=1)).isoformat()
    night_foos = [await create(api, type="foo", tags=["nightly", f"n{i}"]) for i in range(3)]
    night_bar = await create(api, type="bar", tags=["nightly"], run_at=later)
    batch = await api.post(
        "/tasks/batch", json={"tasks": [{"type": "foo", "tags": ["nightly", "batch"]}]}
    )
    (batched,) = (await batch.json())["results"]
    untagged = await create(api, type="foo")
    assert (await (await api.get(f"/tasks/{untagged}")).json())["tags"] == []
    everything = [*night_foos, batched["id"], night_bar]  # run_at order
    assert (await listed_ids(api, tag="nightly", limit="2"))[0] == everything
    assert (await listed_ids(api, tag="nightly", order="desc", limit="1"))[0] == everything[::-1]
    assert (await listed_ids(api, tag="nightly", type="bar"))[0] == [night_bar]
    assert (await listed_ids(api, tag="nightly", state="NOTSTARTED", type="foo"))[0] == [
        *night_foos,
        batched["id"],
    ]
    assert (await listed_ids(api, tag="n1"))[0] == [night_foos[1]]
    assert (await listed_ids(api, tag="batch"))[0] == [batched["id"]]
    assert (await listed_ids(api, tag="NIGHTLY"))[0] == []  # tags are as given
    stored = await store.db.tasks.find_one({"_id": ObjectId(night_bar)})
    assert stored is not None and stored["tags"] == ["nightly"]
    assert "tags" not in (await store.db.tasks.find_one({"_id": ObjectId(untagged)}) or {})


async def test_bad_tags_are_400_and_store_nothing(api: Client, store: Store) -> None:
    for tags in (
        [f"t{i}" for i in range(11)],
        ["a", "a"],
        [""],
        ["x" * 65],
        "nightly",
        [1],
        [None],
        None,
        {"a": 1},
    ):
        response = await api.post("/tasks", json={"type": "foo", "tags": tags})
        assert response.status == 400, (tags, await response.text())
        assert "tags" in (await response.json())["error"]["details"], tags
    batch = await api.post("/tasks/batch", json={"tasks": [{"type": "foo", "tags": ["a", "a"]}]})
    assert "tags" in (await batch.json())["results"][0]["error"]["details"]
    schedule = {"type": "foo", "every": 60, "tags": [""]}
    assert (await api.post("/schedules", json=schedule)).status == 400
    assert await store.db.tasks.count_documents({}) == 0
    assert await store.db.schedules.count_documents({}) == 0
    # Ten distinct tags of 64 characters are fine.
    await create(api, type="foo", tags=[f"{i}" * 64 for i in range(10)])
    for tag in ("", "x" * 65):
        response = await api.get("/tasks", params={"tag": tag})
        assert response.status == 400
        assert "tag" in (await response.json())["error"]["details"]


async def test_the_tag_filter_has_an_index_of_its_own(store: Store) -> None:
    indexes = await store.db.tasks.index_information()
    assert indexes["by_tag"]["key"] == [("tags", 1), ("run_at", 1), ("_id", 1)]
    await store.tasks.create(task_type="foo", run_at=None, max_attempts=1, tags=["a", "b"])
    plan = await store.db.tasks.find({"tags": "a"}).sort(TIME_SORT).explain()
    assert '"by_tag"' in json.dumps(plan["queryPlanner"]["winningPlan"], default=str), plan


async def test_tags_stored_in_another_shape_read_as_none_and_are_named(
    api: Client, store: Store
) -> None:
    base = {"type": "foo", "state": "NOTSTARTED", "attempts": 0, "max_attempts": 1}
    base |= {"run_at": store.clock.now(), "created_at": store.clock.now()}
    for odd in ("nightly", [1, "a"], {"a": 1}, 5):
        doc = {"_id": ObjectId(), **base, "tags": odd}
        task = Task.from_document(doc)
        assert task.tags == ()
        assert any(p.startswith("tags is ") for p in task.problems), task.problems
        assert "tags" in task.malformed and not task.unrunnable
        await store.db.tasks.insert_one(doc)
        shown = await api.get(f"/tasks/{doc['_id']}")
        assert shown.status == 200
        body = await shown.json()
        assert body["tags"] == [] and any(p.startswith("tags is ") for p in body["problems"])
    assert Task.from_document({**base, "_id": 1, "tags": ["a"]}).tags == ("a",)
    assert Task.from_document({**base, "_id": 2, "tags": None}).problems == ()


async def test_a_schedule_templates_tags_reach_each_of_its_tasks(api: Client, store: Store) -> None:
    body = {"type": "foo", "every": 1, "tags": ["reports", "hourly"]}
    created = await api.post("/schedules", json=body)
    assert created.status == 201, await created.text()
    schedule = await created.json()
    assert schedule["tags"] == ["reports", "hourly"]
    assert (await (await api.get(f"/schedules/{schedule['id']}")).json())["tags"] == body["tags"]
    plain = await api.post("/schedules", json={"type": "bar", "every": 1})
    assert (await plain.json())["tags"] == []
    await Scheduler(store.schedules, clock=store.clock, interval=1.0).run_once()
    made = await all_tasks(store)
    tagged = [t for t in made if t.schedule_id == schedule["id"]]
    assert tagged and all(t.tags == ("reports", "hourly") for t in tagged)
    assert all(t.tags == () for t in made if t.schedule_id != schedule["id"])
    listed, _ = await listed_ids(api, tag="reports")
    assert listed == [t.id for t in tagged]
    # A schedule whose stored tags are of another shape is left alone, and says why.
    await store.db.schedules.update_one(
        {"_id": ObjectId(schedule["id"])}, {"$set": {"tags": "reports"}}
    )
    shown = await (await api.get(f"/schedules/{schedule['id']}")).json()
    assert shown["tags"] == [] and any(p.startswith("tags is ") for p in shown["problems"])
