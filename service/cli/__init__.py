"""`task-runner api|worker|db|dev|stats|workers|schedules|queues|recover|requeue`: every part.

`early` comes first: it notes a Ctrl-C from the command's first instant. Then `parser` (the
flags, generated from the settings' declarations), `commands` (main and the command table),
`servers` (api, worker), `dev` (db, dev) over `supervisor` (the processes they start), and
`printers` (the ops commands, over service.ops), `queues` (`task-runner queues`).
"""

from service.cli import early  # noqa: F401  (first: see its docstring)
from service.cli.commands import main

__all__ = ["main"]
