"""The local run as a user meets it: the real `task-runner db` and `dev` commands, busy
ports, Ctrl-C at any moment, a child that dies, a database killed with SIGKILL, dev.sh.

Every process a test starts carries a mark in its environment, inherited by everything it
starts in turn; "nothing left behind" means no live process in /proc carries the mark.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from service.localdb import LocalDatabase, LocalDatabaseError, free_port
from tests.helpers import TASK_RUNNER, call_api, wait_until

ROOT = Path(__file__).resolve().parent.parent
MARK = "LOCAL_RUN_TEST_MARK"
# Poll often: the moment a test interrupts at is the moment it tests.
POLL = 0.02

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URL")) or not Path(TASK_RUNNER).exists(),
    reason="needs the embedded database and the installed task-runner command",
)


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries this mark."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> list[str]:
    """A process's arguments ([] once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode() for part in raw.split(b"\0") if part]


def listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp shows them) listening on this port."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


class Run:
    """A real `task-runner` command, its output in files."""

    def __init__(self, args: list[str], directory: Path, *, env: dict[str, str]) -> None:
        self.mark = uuid.uuid4().hex
        name = f"{args[0]}-{self.mark[:6]}"
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TASK_RUNNER_") and k != "MONGODB_URL"
        }
        full_env = {**clean, MARK: self.mark, "PYTHONUNBUFFERED": "1", **env}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [TASK_RUNNER, *args], stdout=out, stderr=err, env=full_env, cwd=directory
            )

    def output(self) -> str:
        """stdout and stderr so far."""
        return self.out.read_text() + self.err.read_text()

    def stderr(self) -> str:
        """stderr so far."""
        return self.err.read_text()

    def wait_for(self, text: str, *, within: float = 60.0) -> None:
        """Wait until `text` appears in the output while the command runs."""

        def seen() -> bool:
            if text in self.output():
                return True
            assert self.process.poll() is None, f"exited early:\n{self.output()}"
            return False

        wait_until(seen, within=within, interval=POLL, what=f"{text!r} in the output")

    def children(self, word: str) -> list[int]:
        """Marked processes (other than the command itself) whose arguments contain `word`."""
        return [
            pid
            for pid in marked(self.mark)
            if pid != self.process.pid and any(word in arg for arg in command_line(pid))
        ]

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the command."""
        self.process.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the command; return its exit code once nothing it started is left."""
        code = self.process.wait(timeout)
        left = marked(self.mark)
        assert left == [], f"left behind: {[command_line(pid) for pid in left]}"
        return code

    def kill_everything(self) -> None:
        """Kill whatever is still running (a failed test must not leak processes)."""
        for pid in [self.process.pid, *marked(self.mark)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start real `task-runner` commands; whatever is left is killed at the end."""
    started: list[Run] = []

    def start(*args: str, **env: str) -> Run:
        started.append(Run(list(args), tmp_path, env=env))
        return started[-1]

    yield start
    for command in started:
        command.kill_everything()


@pytest.fixture
def ports() -> tuple[int, int]:
    """A free port for the API and one for the local database."""
    return free_port(), free_port()


def dev_args(ports: tuple[int, int], data: Path) -> list[str]:
    api, db = ports
    return ["dev", "--port", str(api), "--local-db-port", str(db), "--local-db-path", str(data)]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_db_refuses_a_busy_port(run: Callable[..., Run], busy_port: int, tmp_path: Path) -> None:
    db = run("db", "--local-db-port", str(busy_port), "--local-db-path", str(tmp_path / "data"))
    assert db.finish() == 1
    assert "Traceback" not in db.output()
    line = db.stderr().strip().splitlines()[-1]
    assert line.startswith("task-runner db: ")
    assert f"port {busy_port}" in line and "--local-db-port" in line
    assert "listening" not in db.output()


def test_dev_refuses_a_port_held_by_another_database(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path
) -> None:
    api_port, db_port = ports
    other = LocalDatabase(port=db_port, path=str(tmp_path / "other"), sync_on_commit=False)
    other.start()
    client: MongoClient[dict[str, object]] = MongoClient(other.url)
    try:
        client.task_runner.tasks.insert_one({"other": True})
        dev = run(*dev_args(ports, tmp_path / "new"))
        assert dev.finish() == 1
        line = dev.stderr().strip().splitlines()[-1]
        assert f"port {db_port}" in line and "--local-db-port" in line, dev.output()
        assert "Traceback" not in dev.output()
        assert "ready at" not in dev.output() and listening(api_port) == []
        assert not (tmp_path / "new").exists()
        assert client.task_runner.tasks.count_documents({}) == 1
    finally:
        client.close()
        other.stop()


def test_the_database_answering_must_be_ours(
    ports: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the port is taken between the check and the bind, another server is refused."""
    _, db_port = ports
    other = LocalDatabase(port=db_port, path=":memory:", sync_on_commit=False)
    other.start()
    try:
        ours = LocalDatabase(port=db_port, path=str(tmp_path / "ours"))
        monkeypatch.setattr(ours, "_check_port_free", lambda: None)
        with pytest.raises(LocalDatabaseError, match=f"port {db_port}"):
            ours.start()
        assert ours.process is not None and ours.process.poll() is not None
        assert other.process is not None and other.process.poll() is None
    finally:
        other.stop()


def test_dev_refuses_a_busy_api_port(
    run: Callable[..., Run], busy_port: int, ports: tuple[int, int], tmp_path: Path
) -> None:
    dev = run(*dev_args((busy_port, ports[1]), tmp_path / "data"))
    assert dev.finish() == 1
    line = one_line(dev.stderr())
    assert f"127.0.0.1:{busy_port}" in line and "--port" in line
    assert listening(ports[1]) == []


def test_api_refuses_a_busy_port(run: Callable[..., Run], busy_port: int, mongodb_url: str) -> None:
    api = run("api", "--host", "127.0.0.1", "--port", str(busy_port), MONGODB_URL=mongodb_url)
    assert api.finish() == 1
    assert "Traceback" not in api.output()
    line = api.stderr().strip().splitlines()[-1]
    assert f"127.0.0.1:{busy_port}" in line and "address already in use" in line


MOMENTS = ["0.3s", "0.7s", "db spawned", "db ready", "children spawned", "running"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_at_any_moment_leaves_nothing(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path, moment: str
) -> None:
    dev = run(*dev_args(ports, tmp_path / "data"))
    if moment.endswith("s"):
        time.sleep(float(moment[:-1]))  # a moment in time, not a condition: nothing to poll
    elif moment == "db spawned":
        wait_until(
            lambda: bool(dev.children("secantus")),
            within=30,
            interval=POLL,
            what="SecantusDB spawned",
        )
    elif moment == "db ready":
        dev.wait_for("ready at")
    elif moment == "children spawned":
        wait_until(
            lambda: bool(dev.children("worker")), within=30, interval=POLL, what="a worker spawned"
        )
    else:
        dev.wait_for("Ctrl-C stops")
    dev.interrupt()
    assert dev.finish() == 0, dev.output()
    assert "Traceback" not in dev.output()
    assert listening(ports[0]) == [] and listening(ports[1]) == []


def api_call(port: int, method: str, path: str, body: object = None) -> dict[str, object]:
    """The JSON answer ({} for an empty one) of a request that must succeed."""
    status, answer = call_api(f"http://127.0.0.1:{port}{path}", method, body)
    assert 200 <= status < 300, (status, answer)
    return dict(answer or {})


def test_a_second_ctrl_c_skips_the_grace_period(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path
) -> None:
    dev = run(
        *dev_args(ports, tmp_path / "data"),
        "--workers",
        "1",
        "--foo-seconds",
        "120",
        "--shutdown-grace",
        "120",
    )
    dev.wait_for("Ctrl-C stops")
    task = api_call(ports[0], "POST", "/tasks", {"type": "foo"})
    wait_until(
        lambda: api_call(ports[0], "GET", f"/tasks/{task['id']}")["state"] == "STARTED",
        within=30,
        interval=POLL,
        what="the task started",
    )
    dev.interrupt()
    dev.wait_for("running tasks get 120")
    started = time.monotonic()
    dev.interrupt()
    assert dev.finish(timeout=30) == 0, dev.output()
    assert time.monotonic() - started < 20
    assert "Traceback" not in dev.output()


def test_dev_names_a_child_that_exits(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path
) -> None:
    dev = run(*dev_args(ports, tmp_path / "data"))
    dev.wait_for("Ctrl-C stops")
    victim = dev.children("worker")[0]
    os.kill(victim, signal.SIGKILL)
    assert dev.finish() == 1
    assert f"(pid {victim}) exited unexpectedly (killed by SIGKILL)" in dev.stderr()
    assert "worker " in dev.stderr().split(f"(pid {victim})")[0].splitlines()[-1]


def test_dev_listens_on_loopback_and_runs_the_installed_command(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path
) -> None:
    impostor = tmp_path / "service"
    impostor.mkdir()
    (impostor / "__init__.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nraise SystemExit(3)\n"
    )
    dev = run(*dev_args(ports, tmp_path / "data"))
    dev.wait_for("Ctrl-C stops")
    assert f"API on http://127.0.0.1:{ports[0]} (this machine only)" in dev.stderr()
    assert listening(ports[0]) == ["0100007F"]
    assert api_call(ports[0], "DELETE", "/") is not None  # dev enables delete-all
    assert not (tmp_path / "imported").exists()
    dev.interrupt()
    assert dev.finish() == 0


def test_acknowledged_writes_survive_sigkill_of_the_database(
    run: Callable[..., Run], ports: tuple[int, int], tmp_path: Path
) -> None:
    """`task-runner db` syncs on commit: every insert it acknowledged is there after SIGKILL."""
    data = tmp_path / "data"
    args = ["db", "--local-db-port", str(ports[1]), "--local-db-path", str(data)]
    db = run(*args)
    db.wait_for("listening")
    url = f"mongodb://127.0.0.1:{ports[1]}/?directConnection=true"
    client: MongoClient[dict[str, object]] = MongoClient(url, serverSelectionTimeoutMS=20_000)
    inserted = 300
    for number in range(inserted):
        client.durability.docs.insert_one({"n": number})
    for pid in marked(db.mark):  # the whole tree at once, the server included
        os.kill(pid, signal.SIGKILL)
    db.process.wait()
    wait_until(lambda: marked(db.mark) == [], within=10, interval=POLL, what="every process gone")
    again = run(*args)
    again.wait_for("listening")
    try:
        assert client.durability.docs.count_documents({}) == inserted
    finally:
        client.close()
        again.interrupt()
        assert again.finish() == 0


def stub_venv(project: Path) -> Path:
    """A .venv whose python and task-runner only record what dev.sh asked of them."""
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = project / "calls.log"
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'echo "python $*" >> {log}\n'
        'if [ "$1 $2 $3" = "-m pip install" ]; then\n'
        f"  d={project}/.venv/lib/python3/site-packages/task_runner-0.1.0.dist-info\n"
        '  mkdir -p "$d" && date +%s%N > "$d/RECORD"\n'
        "fi\n"
    )
    (bin_dir / "task-runner").write_text(f'#!/bin/sh\necho "task-runner $*" >> {log}\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return log


def test_dev_sh_installs_only_when_the_project_changed(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "dev.sh", project / "scripts" / "dev.sh")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    (project / "service").mkdir()
    (project / "service" / "cli.py").write_text("# v1\n")
    log = stub_venv(project)

    def dev_sh() -> tuple[bool, str]:
        log.write_text("")
        result = subprocess.run(
            ["bash", str(project / "scripts" / "dev.sh"), "--workers", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        calls = log.read_text()
        assert "task-runner dev --workers 3" in calls
        return "-m pip install" in calls, result.stdout + result.stderr

    installed, said = dev_sh()
    assert installed and "installing" in said
    installed, said = dev_sh()
    assert not installed and "up to date" in said
    (project / "service" / "__pycache__").mkdir()
    (project / "service" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"x")
    assert dev_sh()[0] is False  # bytecode is not the project
    (project / "service" / "cli.py").write_text("# v2\n")
    assert dev_sh()[0] is True  # an installed copy goes stale when the code changes
    assert dev_sh()[0] is False
    (project / "setup.cfg").write_text((ROOT / "setup.cfg").read_text() + "\n")
    assert dev_sh()[0] is True
    # Something else (scripts/test.sh) installed over it: dev.sh's install is gone.
    record = next((project / ".venv").rglob("RECORD"))
    record.write_text("another install\n")
    assert dev_sh()[0] is True


def test_the_embedded_servers_claim_write_is_mended() -> None:
    """SecantusDB's findAndModify writes its document under `{_id, $and: [query]}`, which its
    write path scanned the collection for; the server service.localdb starts looks it up by
    `_id` (docs/performance.md, the embedded database's envelope). This fails when a
    SecantusDB release renames what is mended, where the mend would silently not apply."""
    from secantus.storage import Storage

    from service.localdb import index_fenced_writes

    index_fenced_writes()
    index_fenced_writes()  # once only, however often called
    mended = Storage._try_index_id_keys
    assert getattr(mended, "indexes_fenced_writes", False)
    assert not getattr(mended.__closure__[0].cell_contents, "indexes_fenced_writes", False)
