"""The database clock: what time MongoDB thinks it is, learned from its `hello` reply.

Due-ness and staleness are judged on this clock, never on the local one alone, because pods'
clocks drift. The offset is measured once at start-up and refreshed now and then; reading
the clock costs no round trip.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

logger = logging.getLogger(__name__)


def to_millis(value: datetime) -> datetime:
    """Drop what BSON dates cannot hold (below a millisecond), so stored == returned."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class DbClock:
    """Local time plus the measured offset to the database server's clock."""

    def __init__(self, *, skew: float = 0.0, resync_every: float = 60.0) -> None:
        # `skew` shifts this process's idea of local time: a fault-injection knob
        # (TASK_RUNNER_CLOCK_SKEW) that lets tests run a worker whose clock is wrong.
        self._skew = timedelta(seconds=skew)
        self._offset = timedelta(0)
        self._uncertainty = timedelta(0)
        self._resync_every = resync_every
        self._synced_at: float | None = None

    def local_now(self) -> datetime:
        """This machine's clock (as skewed for tests)."""
        return datetime.now(UTC) + self._skew

    def now(self) -> datetime:
        """The database's current time, as best this process knows it, in milliseconds."""
        return to_millis(self.local_now() + self._offset)

    def surely_now(self) -> datetime:
        """A time the database's clock has certainly reached: the estimate less its error.

        What is due and what is stale are decided on this, so a measurement error can make
        a task start or a dead worker's task come back a few milliseconds late, never early.
        """
        return to_millis(self.local_now() + self._offset - self._uncertainty)

    @property
    def offset(self) -> timedelta:
        """Database time minus local time."""
        return self._offset

    def needs_sync(self) -> bool:
        """True when the offset was never measured or is older than the resync period."""
        return self._synced_at is None or time.monotonic() - self._synced_at > self._resync_every

    async def sync(self, admin_db: Any, *, samples: int = 3) -> None:
        """Measure the offset from the server's `hello` reply (`localTime`).

        The server read its clock somewhere within the round trip, so a sample is off by
        at most half its round trip: of several samples, the fastest one is kept.
        """
        best: tuple[timedelta, timedelta] | None = None
        for _ in range(samples):
            before = self.local_now()
            reply = await admin_db.command("hello")
            after = self.local_now()
            server = reply["localTime"]
            if server.tzinfo is None:
                server = server.replace(tzinfo=UTC)
            round_trip = after - before
            if best is None or round_trip < best[0]:
                best = (round_trip, server - (before + round_trip / 2))
        assert best is not None
        round_trip, self._offset = best
        # Half the round trip, plus the millisecond the server's clock is truncated to.
        self._uncertainty = round_trip / 2 + timedelta(milliseconds=1)
        self._synced_at = time.monotonic()
        logger.debug(
            "database clock offset %.3fs (round trip %.3fs)",
            self._offset.total_seconds(),
            round_trip.total_seconds(),
        )
        if abs(self._offset) > timedelta(seconds=1):
            logger.warning(
                "local clock is off the database clock by %.3fs; using the database's",
                -self._offset.total_seconds(),
            )
