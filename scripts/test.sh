#!/usr/bin/env bash
# Set up, then run the test suite. pytest's exit code is kept as it is:
# "no tests collected" (5) fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
