#!/usr/bin/env bash
# The main job on the built-in synthetic phantoms: set up, then `nemt demo` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nemt demo "$@"
