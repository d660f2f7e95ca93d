#!/usr/bin/env bash
# Run everything locally: SecantusDB, the API on 127.0.0.1:3030 and two workers. Ctrl-C
# stops it all. Extra arguments go to `task-runner dev` (see `task-runner dev --help`).
#
# The project is installed into .venv (created if missing) with the embedded database, but
# only when it changed since dev.sh last installed it: the install is a copy, not editable,
# so "changed" means setup.cfg, pyproject.toml or any file under service/ (bytecode aside),
# or an install made since by something else (scripts/test.sh installs into .venv too).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "dev.sh: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
    say "creating .venv and upgrading pip in it"
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
fi

# A fingerprint of the sources and of the installed copy's RECORD (its list of files).
fingerprint() {
    python3 - <<'PY'
import hashlib
from pathlib import Path

digest = hashlib.sha256()
files = [Path("setup.cfg"), Path("pyproject.toml")]
files += sorted(
    p for p in Path("service").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
)
files += sorted(Path(".venv/lib").glob("python*/site-packages/task_runner-*.dist-info/RECORD"))
for path in files:
    if path.is_file():
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
print(digest.hexdigest())
PY
}

stamp=.venv/.task-runner-dev-stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(fingerprint)" ]; then
    say "the installed task-runner is up to date; not reinstalling"
else
    say "installing task-runner with the local database into .venv (the project changed)..."
    rm -f "$stamp"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check '.[localdb]'
    fingerprint > "$stamp"
    say "installed"
fi
say "starting: task-runner dev $*"
exec .venv/bin/task-runner dev "$@"
