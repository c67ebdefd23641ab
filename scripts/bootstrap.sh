#!/usr/bin/env bash
# Create .venv and install pytest-sandlock with its test extras (compiles the cffi module).
# The system interpreter is preferred: an unprivileged user must be able to run it (tests drop to uid 65534),
# and a pyenv interpreter under root's 0700 home cannot be.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SANDLOCK_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import venv, ensurepip" 2>/dev/null; then PY=/usr/bin/python3; else PY=python3; fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# compat mode: a plain .pth path entry; the default editable finder costs ~25 ms at every start-up
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every start-up would compile the sources again.
.venv/bin/python -m compileall -q sandlock_core pytest_sandlock >/dev/null
# The `sandlock` command without `site` (~2 ms of every start-up): pip cannot write an interpreter flag into
# its console script, so sandlock_core/launcher.py replaces it (pip's comes back with any later pip install).
.venv/bin/python -m sandlock_core.launcher .venv/bin/sandlock || true  # it says why; pip's script works too
