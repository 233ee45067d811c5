#!/usr/bin/env bash
# Set up, then run the test suite. pytest's exit code is kept as it is:
# "no tests collected" (5) fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the viewer's end-to-end test drives Debian's Chromium; install it where we may (it skips without it)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "could not install chromium: the viewer's browser test will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
