#!/usr/bin/env bash
# Run the whole test suite (as root it also runs the security tests as uid 65534 through setpriv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
