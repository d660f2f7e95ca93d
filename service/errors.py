"""Domain errors. The store raises them; only the HTTP layer turns them into responses."""

from __future__ import annotations


class TaskRunnerError(Exception):
    """Base of every error the service raises on purpose."""


class TaskNotFound(TaskRunnerError):
    """No task has this id (or it was deleted)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}")
        self.task_id = task_id


class ScheduleNotFound(TaskRunnerError):
    """No schedule has this id (or it was deleted)."""

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule with id {schedule_id!r}")
        self.schedule_id = schedule_id


class QueueNotFound(TaskRunnerError):
    """No queue has this name: it has neither settings nor tasks (or, to a delete of its
    settings, it has no settings)."""

    def __init__(self, name: str, *, message: str | None = None) -> None:
        super().__init__(message or f"no queue named {name!r}")
        self.name = name


class InvalidTask(TaskRunnerError):
    """A request describes a task that cannot exist (bad type, time, attempts...)."""


class DeleteAllDisabled(TaskRunnerError):
    """Delete-all was asked for but is not enabled on this deployment."""


class DatabaseUnavailable(TaskRunnerError):
    """MongoDB did not answer in time; the caller may try again later."""


class DatabaseRefused(TaskRunnerError):
    """The database answered but refused this client: its credentials or their privileges.
    Retrying will not help; the message never shows the password."""


class ChangeStreamsUnavailable(TaskRunnerError):
    """The server offers no change streams (a standalone mongod): workers poll instead."""


class InvalidTaskId(TaskNotFound):
    """A task id that no task can have: ids are 24 hexadecimal digits."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.args = (f"{task_id!r} is not a task id (ids are 24 hexadecimal digits)",)


class TaskNotRequeueable(TaskRunnerError):
    """Only a FAILED task can be put back in the queue; this one is in another state."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(
            f"task {task_id} is {state}, not FAILED: only a FAILED task can be requeued"
        )
        self.task_id = task_id
        self.state = state


class IdempotencyKeyReused(TaskRunnerError):
    """An Idempotency-Key came again with another request than the one it was first sent
    with (another body, or another route)."""

    def __init__(self, key: str) -> None:
        super().__init__(
            "this Idempotency-Key was sent with another request; use a new key for a new task"
        )
        self.key = key


class IdempotentTaskGone(TaskRunnerError):
    """The task an Idempotency-Key created has been deleted since: it is not created again."""

    def __init__(self, key: str, task_id: str) -> None:
        super().__init__(
            f"task {task_id}, created with this Idempotency-Key, has been deleted; "
            "use a new key for a new task"
        )
        self.key = key
        self.task_id = task_id


class TaskNotWaiting(TaskRunnerError):
    """Only a waiting (NOTSTARTED) task can be changed; a worker has claimed this one, or it
    has finished."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(
            f"task {task_id} is {state}, not NOTSTARTED: only a waiting task can be changed"
        )
        self.task_id = task_id
        self.state = state


class BatchInterrupted(TaskRunnerError):
    """A batch of creates stopped part-way: the database went away, or refused some of its
    writes. `stored`: the positions of the items known to be stored; `unknown`: those whose
    write may or may not have landed (its reply was lost); every other item was not stored."""

    def __init__(self, *, stored: list[int], unknown: list[int], reason: str) -> None:
        super().__init__(
            f"the batch stopped part-way ({reason}): the items at the positions in "
            "details.stored were stored, those in details.unknown may have been, the others "
            "were not"
        )
        self.stored = stored
        self.unknown = unknown
        self.reason = reason

    def at(self, positions: list[int]) -> BatchInterrupted:
        """The same, for a batch that is part of a larger one: position i here is
        positions[i] there."""
        return BatchInterrupted(
            stored=[positions[i] for i in self.stored],
            unknown=[positions[i] for i in self.unknown],
            reason=self.reason,
        )


class InvalidFilter(TaskRunnerError):
    """A bulk action's filter that it cannot take (empty, a state it never touches, an
    empty time window); `problems` names each field and what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in problems.items()))
        self.problems = problems
