"""The embedded local database: a SecantusDB server in a child process.

For `task-runner db` / `dev` and the tests, when MONGODB_URL is not set. SecantusDB speaks
MongoDB's wire protocol; it is installed with the `localdb` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

logger = logging.getLogger(__name__)

START_SCRIPT = "import sys; from secantus.cli import main; sys.exit(main())"


class LocalDatabase:
    """Start, wait for and stop a SecantusDB server on 127.0.0.1:`port`."""

    def __init__(self, *, port: int, path: str, log_level: str = "WARNING") -> None:
        self.port = port
        self.path = path
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A MongoDB URL for this server."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and return once it answers."""
        if self.path != ":memory:":
            Path(self.path).mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-c",
            START_SCRIPT,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            self.path,
            "--log-level",
            self.log_level,
        ]
        if importlib.util.find_spec("secantus") is None:
            raise SystemExit(
                "the local database needs SecantusDB: pip install '.[localdb]' "
                "(or set MONGODB_URL to use a MongoDB server)"
            )
        # Own session: Ctrl-C on a terminal must not stop the database before its clients.
        self.process = subprocess.Popen(command, start_new_session=True)
        self.wait_ready(timeout)
        logger.info("local database (SecantusDB) ready at %s, data in %s", self.url, self.path)

    def wait_ready(self, timeout: float) -> None:
        """Poll with `ping` until the server answers or the deadline passes."""
        deadline = time.monotonic() + timeout
        client: MongoClient[dict[str, object]] = MongoClient(
            self.url, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"local database exited with {self.process.returncode}")
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"local database not ready after {timeout}s") from None
                    time.sleep(0.1)
        finally:
            client.close()

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL with kill=True) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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
    db = LocalDatabase(port=free_port(), path=":memory:")
    db.start()
    try:
        yield db.url
    finally:
        db.stop()
