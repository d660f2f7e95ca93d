"""task-runner: a task scheduling service over MongoDB."""
