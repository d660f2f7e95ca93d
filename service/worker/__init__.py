"""The worker process.

- main.py: serve(), the process entry: one Worker with its client, metrics port and signals
- worker.py: Worker (lifecycle, the claim loop, the bounded set of running tasks)
- process.py: what the process needs around its Worker (id, HTTP client, waiting for the
  database, signals)
- claimer.py: what one claim round tries
- execution.py: running one task and writing its outcome under its lease
- leases.py: the running tasks' heartbeats, from a thread of their own, and the watch on
  the event loop's stalls
- wakeups.py: when to claim, from the change stream and look-ups
- slots.py: the worker's side of the per-type concurrency limits
- queues.py: the worker's side of queues (their settings; claims under a token or a slot)
- one file per periodic job: heartbeat.py (the registry record), recovery.py, malformed.py,
  retention.py, schedules.py
- metrics.py: the worker's own Prometheus metrics
"""
