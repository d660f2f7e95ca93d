"""The embedded local database: a SecantusDB server in a child process.

For `task-runner db` / `dev` and the tests, when MONGODB_URL is not set. SecantusDB speaks
MongoDB's wire protocol; it is installed with the `localdb` extra.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

logger = logging.getLogger(__name__)

START_SCRIPT = "import sys; from service.localdb import run_secantus; sys.exit(run_secantus())"
PORT_HINT = "choose another with --local-db-port (TASK_RUNNER_LOCAL_DB_PORT)"
PATH_HINT = "choose another with --local-db-path (TASK_RUNNER_LOCAL_DB_PATH)"


class LocalDatabaseError(RuntimeError):
    """The local database could not be started; the message says why and what to do."""


class StartInterrupted(Exception):
    """A stop was asked for while the local database was starting; it has been stopped."""


class LocalDatabase:
    """Start, wait for and stop a SecantusDB server on 127.0.0.1:`port`.

    With `sync_on_commit` (the default) the server syncs its log on every commit, so a write
    it acknowledged survives SIGKILL; only throwaway in-memory servers should turn it off.
    """

    def __init__(
        self, *, port: int, path: str, log_level: str = "WARNING", sync_on_commit: bool = True
    ) -> None:
        self.port = port
        self.path = path
        self.log_level = log_level
        self.sync_on_commit = sync_on_commit
        self.process: subprocess.Popen[bytes] | None = None
        self._output = _Output()

    @property
    def url(self) -> str:
        """A MongoDB URL for this server."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def command(self) -> list[str]:
        """The server's command line."""
        # -P: never import a `secantus` folder that happens to be in the working directory.
        command = [sys.executable, "-P", "-c", START_SCRIPT, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--storage-path", self.path]
        command += ["--log-level", self.log_level]
        return [*command, "--sync-on-commit"] if self.sync_on_commit else command

    def start(
        self, *, timeout: float = 30.0, interrupted: Callable[[], bool] | None = None
    ) -> None:
        """Start the server and return once it answers as the process started here.

        Raises LocalDatabaseError (port or data directory taken, server exited) or, when
        `interrupted()` turns true meanwhile, StartInterrupted; either way nothing is left
        running.
        """
        if importlib.util.find_spec("secantus") is None:
            raise LocalDatabaseError(
                "the local database needs SecantusDB: pip install '.[localdb]' "
                "(or set MONGODB_URL to use a MongoDB server)"
            )
        self._check_port_free()
        if self.path != ":memory:":
            Path(self.path).mkdir(parents=True, exist_ok=True)
        # Own session: Ctrl-C on a terminal must not stop the database before its clients.
        self.process = subprocess.Popen(
            self.command(), start_new_session=True, stderr=subprocess.PIPE
        )
        self._output = _Output()
        self._output.follow(self.process)
        try:
            self.wait_ready(timeout, interrupted=interrupted)
        except BaseException:
            self.stop(kill=True)
            raise
        self._output.forward()
        logger.info("local database (SecantusDB) ready at %s, data in %s", self.url, self.path)

    def _check_port_free(self) -> None:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as exc:
                raise LocalDatabaseError(self._port_taken(exc.strerror or str(exc))) from None

    def _port_taken(self, reason: str) -> str:
        return (
            f"cannot start the local database on port {self.port}: {reason}; another server "
            f"(another task-runner, or one left running) holds it: stop it, or {PORT_HINT}"
        )

    def wait_ready(self, timeout: float, *, interrupted: Callable[[], bool] | None = None) -> None:
        """Poll until this process's server answers; fail if it exits or another answers."""
        deadline = time.monotonic() + timeout
        client: MongoClient[dict[str, object]] = MongoClient(
            self.url, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )
        try:
            while True:
                if interrupted is not None and interrupted():
                    raise StartInterrupted()
                self._check_alive()
                try:
                    status = client.admin.command("serverStatus")
                except PyMongoError:
                    if time.monotonic() > deadline:
                        raise LocalDatabaseError(
                            f"the local database did not answer within {timeout:g}s"
                        ) from None
                    time.sleep(0.05)
                    continue
                self._check_ours(status.get("pid"))
                return
        finally:
            client.close()

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        self._output.wait_closed()
        said = self._output.text()
        if "Address already in use" in said:
            raise LocalDatabaseError(self._port_taken("address already in use"))
        if "resource busy" in said.lower():
            raise LocalDatabaseError(
                f"cannot start the local database: its data directory {self.path} is in use "
                f"by another server: stop it, or {PATH_HINT}"
            )
        last = said.strip().splitlines()[-1:] or ["no output"]
        raise LocalDatabaseError(
            f"the local database exited during start-up ({exit_description(self.process)}): "
            f"{last[0]}"
        )

    def _check_ours(self, pid: object) -> None:
        # The port answered; make sure it is the server started here, not one that took
        # the port between the check and our server's bind (ours then exits).
        if self.process is not None and pid != self.process.pid:
            raise LocalDatabaseError(
                self._port_taken(f"a server that is not this one (pid {pid}) answers there")
            )

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL with kill=True) and wait for it.

        A server that does not stop within `timeout` is killed, with its process group.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                if kill:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                process.wait()
        self._output.close()


class _Output:
    """A child's stderr: held back while it starts (to explain a failure in one line),
    then passed through to ours."""

    def __init__(self) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=40)
        self._forward = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pipe: IO[bytes] | None = None

    def follow(self, process: subprocess.Popen[bytes]) -> None:
        self._pipe = process.stderr
        self._thread = threading.Thread(target=self._pump, name="localdb-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._pipe is not None
        for line in iter(self._pipe.readline, b""):
            with self._lock:
                if self._forward:
                    _write_stderr(line)
                else:
                    self._lines.append(line)

    def forward(self) -> None:
        with self._lock:
            self._forward = True
            for line in self._lines:
                _write_stderr(line)
            self._lines.clear()

    def text(self) -> str:
        with self._lock:
            return b"".join(self._lines).decode(errors="replace")

    def wait_closed(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        self.wait_closed()
        if self._pipe is not None:
            self._pipe.close()


def _write_stderr(data: bytes) -> None:
    # The file descriptor, not sys.stderr: this runs on a thread, and sys.stderr may be
    # swapped meanwhile (pytest's capture does).
    with contextlib.suppress(OSError):
        os.write(2, data)


def exit_description(process: subprocess.Popen[bytes]) -> str:
    """'exit status 1' or 'killed by SIGKILL' for a process that has ended."""
    code = process.returncode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    """MONGODB_URL when set; otherwise a throwaway in-memory SecantusDB on a free port,
    stopped on exit (for the tests and the benchmark)."""
    if os.environ.get("MONGODB_URL"):
        yield os.environ["MONGODB_URL"]
        return
    # Its data dies with it, so syncing every commit would only slow the tests down.
    db = LocalDatabase(port=free_port(), path=":memory:", sync_on_commit=False)
    db.start()
    try:
        yield db.url
    finally:
        db.stop()


def run_secantus() -> int:
    """The server process's entry point: SecantusDB's own, with its claim write indexed."""
    from secantus.cli import main

    index_fenced_writes()
    return int(main())


def index_fenced_writes() -> None:
    """Let SecantusDB find a findAndModify's document by `_id` when it writes it.

    Its findAndModify finds the document with the indexes, then writes it under the filter
    `{_id: <found>, $and: [<query>]}`, which its write path cannot match to an index (a
    top-level `$` key): every claim scanned the whole collection, and the claim slowed in
    proportion to the documents kept (4 claims a second at 10,000). Here such a filter is
    looked up by its `_id` alone; the write path still matches the whole filter against
    the document it gets, so what is written is unchanged. Where the server's code is not
    shaped as expected (another version), nothing is changed.
    """
    try:
        from secantus.storage import Storage
    except ImportError:
        return
    original = getattr(Storage, "_try_index_id_keys", None)
    if original is None or getattr(original, "indexes_fenced_writes", False):
        return

    def by_id_first(
        self: Any, db: str, coll: str, filter: dict[str, Any], *, collation: Any = None
    ) -> Any:
        if collation is None and set(filter) == {"_id", "$and"}:
            found = original(self, db, coll, {"_id": filter["_id"]})
            if found is not None:
                return found
        return original(self, db, coll, filter, collation=collation)

    by_id_first.indexes_fenced_writes = True  # type: ignore[attr-defined]
    Storage._try_index_id_keys = by_id_first
