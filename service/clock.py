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
        self._resync_every = resync_every
        self._synced_at: float | None = None

    def local_now(self) -> datetime:
        """This machine's clock (as skewed for tests)."""
        return datetime.now(UTC) + self._skew

    def now(self) -> datetime:
        """The database's current time, as best this process knows it, in milliseconds."""
        return to_millis(self.local_now() + self._offset)

    @property
    def offset(self) -> timedelta:
        """Database time minus local time."""
        return self._offset

    def needs_sync(self) -> bool:
        """True when the offset was never measured or is older than the resync period."""
        return self._synced_at is None or time.monotonic() - self._synced_at > self._resync_every

    async def sync(self, admin_db: Any) -> None:
        """Measure the offset from the server's `hello` reply (`localTime`)."""
        before = self.local_now()
        reply = await admin_db.command("hello")
        after = self.local_now()
        server = reply["localTime"]
        if server.tzinfo is None:
            server = server.replace(tzinfo=UTC)
        # The server read its clock somewhere in the round trip; the midpoint is the best guess.
        self._offset = server - (before + (after - before) / 2)
        self._synced_at = time.monotonic()
        if abs(self._offset) > timedelta(seconds=1):
            logger.warning(
                "local clock is off the database clock by %.3fs; using the database's",
                -self._offset.total_seconds(),
            )
