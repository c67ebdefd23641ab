#!/usr/bin/env bash
# Run the whole test suite. As root, the security suite then runs a second time with everything as uid 65534
# (scripts/test-unprivileged.sh); pass pytest arguments to run just those tests, as the current user only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider
if [ "$(id -u)" = 0 ]; then
  echo "== the security suite again as uid 65534 (scripts/test-unprivileged.sh)"
  scripts/test-unprivileged.sh
fi
