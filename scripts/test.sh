#!/usr/bin/env bash
# Install the project with its test extra into .venv (created if missing) and run the tests.
# Extra arguments go to pytest. With MONGODB_URL set, the tests use that server instead of
# starting SecantusDB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check '.[test]'
exec .venv/bin/python -m pytest "$@"
