"""OpenTelemetry spans for create, claim, run and callback, linked to the W3C trace context
a task was created in, where the optional `otel` extra (opentelemetry-api) is installed; the
deployment configures the SDK and its exporter as OpenTelemetry documents. Without the
package every function here passes the trace context on unchanged and does nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime

from service.models import Task

try:
    from opentelemetry import propagate, trace
except ImportError:  # the optional extra is not installed
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

TRACER = "task-runner"
Attributes = Mapping[str, str | int]


@contextlib.contextmanager
def span(
    name: str, *, traceparent: str | None, kind: str = "INTERNAL", attributes: Attributes
) -> Iterator[str | None]:
    """A span named `name`, child of `traceparent` (None: the current context); yields the
    trace context to pass on from within it (`traceparent` as given without OpenTelemetry,
    or with it but no SDK configured)."""
    if trace is None or propagate is None:
        yield traceparent
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer(TRACER)
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind[kind], attributes=dict(attributes)
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier.get("traceparent", traceparent)


def past_span(
    name: str,
    *,
    traceparent: str | None,
    start: datetime | None,
    end: datetime | None,
    attributes: Attributes,
) -> None:
    """A span that already happened (a task's wait from due to claimed), child of
    `traceparent`; nothing without OpenTelemetry or without both times."""
    if trace is None or propagate is None or start is None or end is None:
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer(TRACER)
    done = tracer.start_span(
        name, context=parent, start_time=_nanos(start), attributes=dict(attributes)
    )
    done.end(end_time=max(_nanos(end), _nanos(start)))


def _nanos(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


def task_attributes(task: Task) -> dict[str, str | int]:
    """What a span about a task carries: its id, type and attempt."""
    return {
        "task_runner.task.id": task.id,
        "task_runner.task.type": task.type,
        "task_runner.task.attempt": task.attempts,
    }
