"""Bar: GET the configured URL (TASK_RUNNER_BAR_URL) and print the status code.

The URL is a setting, never an argument: no task may steer a worker to another address.
"""

from __future__ import annotations

import aiohttp

from service.plugins import TaskContext, task_type


@task_type("bar")
async def bar(ctx: TaskContext, args: None) -> str:
    """Any HTTP response, 5xx included, is a result; no response is a failed attempt."""
    timeout = aiohttp.ClientTimeout(total=ctx.settings.bar_timeout)
    async with ctx.http.get(
        ctx.settings.bar_url, timeout=timeout, allow_redirects=True
    ) as response:
        return str(response.status)
