#!/usr/bin/env bash
# Install the project with the embedded database into .venv (created if missing) and run
# everything locally: SecantusDB, the API on port 3030 and two workers. Ctrl-C stops it all.
# Extra arguments go to `task-runner dev` (see `task-runner dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check '.[localdb]'
exec .venv/bin/task-runner dev "$@"
