"""Baz: draw N uniformly from 0..343 inclusive and print "Baz {N}"."""

from __future__ import annotations

import random

from service.plugins import TaskContext, task_type

BAZ_MAX = 343


@task_type("baz")
async def baz(ctx: TaskContext, args: None) -> str:
    """Print "Baz {N}"."""
    return f"Baz {random.randint(0, BAZ_MAX)}"
