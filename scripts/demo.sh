#!/usr/bin/env bash
# The demo: set everything up, then run two awesomerpc backends, the bridge and Envoy, send
# requests through Envoy, print who answered, and stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.run_demo
