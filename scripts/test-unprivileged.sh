#!/usr/bin/env bash
# The security suite again with everything (pytest, supervisor, sandboxes, host peers) running as uid 65534.
# Run as root after scripts/bootstrap.sh: it drops to uid 65534 itself, from a world-readable copy of the
# packages, the tests and the venv's site-packages (the checkout may sit under a 0700 home).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-unprivileged.sh: run it as root; it drops to uid 65534 itself" >&2; exit 2; }
command -v setpriv >/dev/null || { echo "test-unprivileged.sh: setpriv (util-linux) is needed" >&2; exit 2; }
read -r PY SITE < <(.venv/bin/python -c 'import sys, sysconfig; print(sys._base_executable, sysconfig.get_paths()["purelib"])')
work=$(mktemp -d /tmp/sandlock-unpriv.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r sandlock_core pytest_sandlock tests conftest.py pyproject.toml "$work/"
cp -r "$SITE" "$work/site"
rm -f "$work"/site/__editable__*.pth
mkdir "$work/home" "$work/.hypothesis"
chmod -R a+rX "$work"
chown 65534:65534 "$work/home" "$work/.hypothesis"
cd "$work"
exec setpriv --reuid=65534 --regid=65534 --clear-groups \
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8 PYTHONPATH="$work:$work/site" \
  PYTHONDONTWRITEBYTECODE=1 "$PY" -m pytest -q -p no:cacheprovider -m "not needs_root" tests/security "$@"
