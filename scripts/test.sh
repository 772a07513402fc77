#!/usr/bin/env bash
# Sets everything up and runs every test: unit, integration (real Envoy), docker (pytest-docker,
# whenever a Docker engine is reachable) and the benchmark's quick mode. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
