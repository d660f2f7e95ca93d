#!/usr/bin/env bash
# Install the project with its test extra into .venv (created if missing), and Debian's
# chromium for the dashboard's browser tests where it is missing, and run the tests.
# Extra arguments go to pytest. With MONGODB_URL set, the tests use that server instead of
# starting SecantusDB.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboard's tests drive Debian's Chromium (TASK_RUNNER_CHROMIUM names another binary);
# install it when missing, without questions (as root, as in CI; else through sudo).
chromium="${TASK_RUNNER_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    echo "test.sh: $chromium is missing; installing Debian's chromium package" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check '.[test]'
exec .venv/bin/python -m pytest "$@"
