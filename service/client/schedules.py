"""The part of AsyncClient about schedules, queues and the operator's view (stats,
workers)."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from service.client.records import Fields, Queue, Schedule, Stats, Worker
from service.client.transport import RunAt, Transport, given


def schedule_path(schedule_id: str, *rest: str) -> str:
    """/schedules/{id}, the id quoted."""
    return "/".join(("/schedules", quote(schedule_id, safe=""), *rest))


def queue_path(name: str, *rest: str) -> str:
    """/queues/{name}, the name quoted."""
    return "/".join(("/queues", quote(name, safe=""), *rest))


class ScheduleCalls:
    """AsyncClient's calls about schedules, queues, stats and workers (AsyncClient derives
    from it)."""

    transport: Transport

    # -- schedules --------------------------------------------------------------------------

    async def create_schedule(
        self,
        type: str,
        *,
        cron: str | None = None,
        timezone: str | None = None,
        every: float | None = None,
        args: Mapping[str, Any] | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (its tasks' time limit, sent to the API)
        start_at: RunAt | None = None,
        end_at: RunAt | None = None,
        missed: str | None = None,
        queue: str | None = None,
    ) -> Schedule:
        """Create a recurring schedule: `cron` (five fields, in `timezone`) or `every`
        seconds, and the template of its tasks (see docs/schedules.md).

            nightly = await client.create_schedule("foo", cron="0 3 * * *", timezone="Europe/Paris")
        """
        body = given(
            type=type,
            cron=cron,
            timezone=timezone,
            every=every,
            args=args,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            start_at=start_at,
            end_at=end_at,
            missed=missed,
            queue=queue,
        )
        # No Idempotency-Key for schedules: not sent again once it may have landed.
        answer = await self.transport.call("POST", "/schedules", body=body, repeatable=False)
        return Schedule.from_json(answer.body, status=answer.status)

    async def list_schedules(self) -> builtins.list[Schedule]:
        """Every schedule, oldest first."""
        answer = await self.transport.call("GET", "/schedules")
        read = Fields(answer.body, what="the schedules", status=answer.status)
        return [Schedule.from_json(s, status=answer.status) for s in read.objects("schedules")]

    async def get_schedule(self, schedule_id: str) -> Schedule:
        """One schedule; ScheduleNotFound if there is none with this id."""
        answer = await self.transport.call("GET", schedule_path(schedule_id))
        return Schedule.from_json(answer.body, status=answer.status)

    async def pause_schedule(self, schedule_id: str) -> Schedule:
        """Pause a schedule: it makes nothing until resumed."""
        answer = await self.transport.call("POST", schedule_path(schedule_id, "pause"))
        return Schedule.from_json(answer.body, status=answer.status)

    async def resume_schedule(self, schedule_id: str) -> Schedule:
        """Resume a paused schedule; missed occurrences follow its `missed` policy."""
        answer = await self.transport.call("POST", schedule_path(schedule_id, "resume"))
        return Schedule.from_json(answer.body, status=answer.status)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its tasks made ahead whose time has not come go with it)."""
        await self.transport.delete(schedule_path(schedule_id))

    # -- queues -----------------------------------------------------------------------------

    async def list_queues(self) -> builtins.list[Queue]:
        """Every queue that has settings or tasks, by name."""
        answer = await self.transport.call("GET", "/queues")
        read = Fields(answer.body, what="the queues", status=answer.status)
        return [Queue.from_json(q, status=answer.status) for q in read.objects("queues")]

    async def get_queue(self, name: str) -> Queue:
        """One queue; QueueNotFound if it has neither settings nor tasks."""
        answer = await self.transport.call("GET", queue_path(name))
        return Queue.from_json(answer.body, status=answer.status)

    async def put_queue(self, name: str, settings: Mapping[str, Any]) -> Queue:
        """Change some of a queue's settings: any of `rate`, `burst`, `concurrency`,
        `paused`; None clears a rate or a concurrency (see docs/queues.md).

            await client.put_queue("partner-api", {"rate": 4, "burst": 1})
        """
        answer = await self.transport.call("PUT", queue_path(name), body=dict(settings))
        return Queue.from_json(answer.body, status=answer.status)

    async def delete_queue(self, name: str) -> None:
        """Delete a queue's settings: its tasks stay and run as in a queue without settings;
        QueueNotFound if it has none. A retry answered 404 after an attempt whose answer
        was lost counts as deleted."""
        await self.transport.delete(queue_path(name))

    async def pause_queue(self, name: str) -> Queue:
        """Pause a queue: none of its tasks starts until resumed; running ones finish."""
        answer = await self.transport.call("POST", queue_path(name, "pause"))
        return Queue.from_json(answer.body, status=answer.status)

    async def resume_queue(self, name: str) -> Queue:
        """Resume a paused queue."""
        answer = await self.transport.call("POST", queue_path(name, "resume"))
        return Queue.from_json(answer.body, status=answer.status)

    # -- the operator's view ----------------------------------------------------------------

    async def stats(self) -> Stats:
        """The queue at a glance (GET /stats)."""
        answer = await self.transport.call("GET", "/stats")
        return Stats.from_json(answer.body)

    async def workers(self) -> builtins.list[Worker]:
        """Every registered worker process, alive or gone (GET /workers)."""
        answer = await self.transport.call("GET", "/workers")
        read = Fields(answer.body, what="the workers", status=answer.status)
        return [Worker.from_json(w) for w in read.objects("workers")]
