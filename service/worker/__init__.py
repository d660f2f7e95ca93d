"""The worker process: the claim loop, its running tasks, wake-ups, slots, and one file
per periodic job (heartbeat, recovery, retention, schedules, malformed scan)."""
