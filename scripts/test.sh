#!/usr/bin/env bash
# Set up the machine (scripts/setup.sh) and run the whole test suite.
# Extra arguments go to pytest (e.g. -k egress, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
set +e
.venv/bin/python -m pytest -ra --durations=10 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure, not a pass.
[ "$rc" = 5 ] && echo "test.sh: no tests were collected" >&2 && exit 1
exit "$rc"
