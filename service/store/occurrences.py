"""When a schedule's occurrences fall: `every` N seconds from an anchor, or a cron
expression in a time zone."""

from __future__ import annotations

import logging
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import CroniterError, croniter

from service.clock import to_millis
from service.models import MissedPolicy, Schedule

logger = logging.getLogger(__name__)

_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, kw_only=True)
class Timing:
    """When a schedule recurs, as the API checked it: `cron` (five fields, in `timezone`)
    or `every` seconds; optional bounds; the missed policy."""

    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    missed: str = MissedPolicy.LATEST.value


def next_occurrence(schedule: Schedule, after: datetime, *, inclusive: bool) -> datetime | None:
    """The schedule's first occurrence after `after` (or at it, if `inclusive`), not before
    start_at; None when it falls after end_at or the schedule cannot say."""
    if schedule.start_at is not None and after < schedule.start_at:
        after, inclusive = schedule.start_at, True
    found: datetime | None = None
    if schedule.every is not None and schedule.anchor is not None:
        step = round(schedule.every * 1000)
        elapsed = (after - schedule.anchor) // _MS
        count = max(0, -(-elapsed // step) if inclusive else elapsed // step + 1)
        found = _plus(schedule.anchor, count * step)
    elif schedule.cron is not None:
        start = after - _MS if inclusive else after
        found = _cron_step(schedule, start, forward=True)
    if found is None or (schedule.end_at is not None and found > schedule.end_at):
        return None
    return to_millis(found)


def latest_occurrence(schedule: Schedule, now: datetime) -> datetime | None:
    """The schedule's last occurrence at or before `now`, never before its stored next one
    (None if that is after `now`): what the missed policy `latest` creates."""
    first = schedule.next_at
    if first is None or first > now:
        return None
    if schedule.end_at is not None:
        now = min(now, schedule.end_at)
    found: datetime | None = None
    if schedule.every is not None and schedule.anchor is not None:
        step = round(schedule.every * 1000)
        found = _plus(schedule.anchor, (now - schedule.anchor) // _MS // step * step)
    elif schedule.cron is not None:
        found = _cron_step(schedule, now + _MS, forward=False)
    return first if found is None or found < first else to_millis(found)


def _cron_step(schedule: Schedule, start: datetime, *, forward: bool) -> datetime | None:
    """croniter's next (or previous) match strictly after (before) `start`, in the
    schedule's time zone, as UTC."""
    assert schedule.cron is not None
    try:
        zone = zoneinfo.ZoneInfo(schedule.timezone)
        matches = croniter(schedule.cron, start.astimezone(zone))
        found = matches.get_next(datetime) if forward else matches.get_prev(datetime)
    except (ArithmeticError, LookupError, TypeError, ValueError, CroniterError):
        return None  # a stored expression this version cannot read: no occurrences
    assert isinstance(found, datetime)
    return found.astimezone(UTC)


def _plus(moment: datetime, milliseconds: int) -> datetime | None:
    """`moment` plus that many milliseconds; None past the dates Python can hold."""
    try:
        return moment + milliseconds * _MS
    except OverflowError:
        return None


def timing_problems(schedule: Schedule) -> tuple[str, ...]:
    """What stops the schedule's cron expression or time zone from giving occurrences."""
    if schedule.cron is None:
        return ()
    try:
        zone = zoneinfo.ZoneInfo(schedule.timezone)
    except (LookupError, ValueError, TypeError):
        return (f"timezone {schedule.timezone!r} is not a time zone",)
    try:
        croniter(schedule.cron, datetime.now(zone))
    except (ArithmeticError, LookupError, TypeError, ValueError, CroniterError):
        return (f"cron {schedule.cron!r} is not a five-field cron expression",)
    return ()
