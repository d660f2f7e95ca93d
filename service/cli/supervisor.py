"""The processes `db` and `dev` start: watched while they run, stopped in order, never left
behind, whatever signal arrives when."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.early import SIGINT_IGNORED

if TYPE_CHECKING:
    from service.localdb import LocalDatabase

logger = logging.getLogger(__name__)

# How long children get beyond their own grace period, and after a second Ctrl-C.
STOP_MARGIN = 10.0
HURRY = 5.0


class Signals:
    """SIGINT and SIGTERM, counted rather than raised: whatever `db` and `dev` are doing
    (starting a child, waiting for one), they look at the count at safe points and stop
    what they started, so an interruption never leaves a child without its parent."""

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None  # the last signal received
        for signum in (signal.SIGTERM,) if SIGINT_IGNORED else (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1
        self.last = signum

    def again(self) -> str:
        """How to ask, once more, for a stop now: as the last stop was asked for."""
        if self.last == signal.SIGTERM:
            return "send SIGTERM again to stop now"
        return "Ctrl-C again to stop now"

    def requested(self) -> bool:
        """True once a stop was asked for."""
        return self.count > 0


@dataclasses.dataclass
class Child:
    """A process we started, by the name the log gives it."""

    name: str
    process: subprocess.Popen[bytes]

    def __str__(self) -> str:
        return f"{self.name} (pid {self.process.pid})"


class Stop(Exception):
    """Stop everything now and exit with `status`."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Stack:
    """The processes `db` or `dev` started: watched while they run, stopped in order."""

    def __init__(self, signals: Signals, *, grace: float) -> None:
        self.signals = signals
        self.grace = grace
        self.children: list[Child] = []
        self.db: LocalDatabase | None = None

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        """Start `task-runner COMMAND...` as a child."""
        # Own session: a terminal's Ctrl-C reaches only this parent, which stops the
        # children in order (clients first, the database last).
        process = subprocess.Popen(
            [*task_runner_command(), *command], env=env, start_new_session=True
        )
        self.children.append(Child(name, process))

    def watched(self) -> list[Child]:
        """The database's process (if we started one), then the children."""
        db = (
            []
            if self.db is None or self.db.process is None
            else [Child("database", self.db.process)]
        )
        return db + self.children

    def check(self) -> None:
        """Raise Stop when a stop was asked for or a child has ended."""
        if self.signals.requested():
            raise Stop(0)
        for child in self.watched():
            if child.process.poll() is not None:
                from service.localdb import exit_description

                logger.error(
                    "%s exited unexpectedly (%s); stopping the others",
                    child,
                    exit_description(child.process),
                )
                raise Stop(1)

    def supervise(self) -> int:
        """Wait until a stop is asked for (0) or a child ends on its own (1)."""
        try:
            while True:
                self.check()
                time.sleep(0.1)
        except Stop as stop:
            return stop.status

    def stop(self) -> None:
        """Stop the children (SIGTERM, their grace period), then the database.

        A second signal asks the children to stop now, a third or the end of the grace
        period kills them; nothing started here outlives this call.
        """
        running = [c for c in self.children if c.process.poll() is None]
        if running or self.db is not None:
            logger.info("stopping%s", f"; {self.signals.again()}" if running else "")
        self._stop(running, self.grace + STOP_MARGIN)
        if self.db is not None and self.db.process is not None:
            self._stop([Child("database", self.db.process)], 15.0)
            self.db.stop(kill=True)

    def _stop(self, children: list[Child], patience: float) -> None:
        _send(children, signal.SIGTERM)
        seen = self.signals.count
        deadline = time.monotonic() + patience
        while any(c.process.poll() is None for c in children):
            if self.signals.count > seen:
                # Once more: a worker stops at once on its second signal; a third is SIGKILL.
                seen = self.signals.count
                logger.info("stopping now")
                _send(children, signal.SIGTERM)
                deadline = min(deadline, time.monotonic() + (0 if seen >= 3 else HURRY))
            if time.monotonic() >= deadline:
                for child in children:
                    if child.process.poll() is None:
                        logger.warning("%s did not stop in time; killing it", child)
                        _kill_group(child.process)
                break
            time.sleep(0.05)
        for child in children:
            child.process.wait()


def _send(children: list[Child], signum: int) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signum)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def task_runner_command() -> list[str]:
    """The installed `task-runner` command: never a `service` folder of the working directory."""
    script = Path(sys.executable).with_name("task-runner")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-P", "-m", "service.cli"]
