#!/usr/bin/env bash
# Every test: set-up, the tiny test guest, then pytest (unit, golden, host and guest tests).
# Extra arguments go to pytest, e.g. scripts/test.sh -k render
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DMZCTL_TEST_GUEST="$(scripts/build-test-guest.sh)"
DMZCTL_DEBIAN_GUEST="$(scripts/build-debian-guest.sh)"; export DMZCTL_DEBIAN_GUEST
export DMZCTL_NO_SKIP=1
export DMZCTL_TEST_GUEST
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
# pytest's 5 means it collected no test: that is a failure here, not a pass.
exit "$rc"
