"""The worker process.

- worker.py: Worker (lifecycle, the claim loop, the bounded set of running tasks) and
  serve(), the process entry
- process.py: what the process needs around its Worker (id, version, HTTP client,
  waiting for the database, signals)
- claimer.py: what one claim round tries
- execution.py: running one task and writing its outcome under its lease
- wakeups.py: when to claim, from the change stream and look-ups
- slots.py: the worker's side of the per-type concurrency limits
- one file per periodic job: heartbeat.py, recovery.py, malformed.py, retention.py,
  schedules.py
- metrics.py: the worker's own Prometheus metrics
"""
