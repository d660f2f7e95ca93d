"""task-runner: a task scheduling service over MongoDB."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed


def version() -> str:
    """The installed task-runner package's version ("unknown" when not installed)."""
    try:
        return _installed("task-runner")
    except PackageNotFoundError:
        return "unknown"
