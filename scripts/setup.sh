#!/usr/bin/env bash
# Create .venv in the checkout (if missing) and install nemt with what it needs.
# torch is pinned to the CPU wheel 2.13.0 and installed first, so that nothing
# pulls a CUDA build in through a looser range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${NEMT_EXTRAS:-test}]"
