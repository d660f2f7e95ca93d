"""Foo: sleep (3 s by default, TASK_RUNNER_FOO_SECONDS), then name the task."""

from __future__ import annotations

import asyncio

from service.plugins import TaskContext, task_type


@task_type("foo")
async def foo(ctx: TaskContext, args: None) -> str:
    """Print "Foo {task_id}"."""
    await asyncio.sleep(ctx.settings.foo_seconds)
    return f"Foo {ctx.task_id}"
