"""Build the artefacts of build.sh twice bare and twice in the sandbox; compare their sha256.

    python examples/reproducible-build/check.py          # exit 0: sandboxed builds identical, bare ones differ

The sandbox runs the build as any CI would (`sandlock run ... -- ./build.sh out`), with the same start time
and seed both times.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools + wheel (Debian python3-wheel); the venv may lack the wheel package
PYTHON = os.environ.get("PYTHON", "/usr/bin/python3")
SANDBOX_FLAGS = ["--time-start", "2000-01-01T00:00:00Z", "--freeze-time", "--random-seed", "42",
                 "--deterministic-dirs", "--normalize-mtime", "--hostname", "build",
                 "-r", "/", "-w", "/tmp", "-w", "/dev/null"]


def digests(out: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(out))}


def build(sandboxed: bool) -> dict[str, str]:
    out = tempfile.mkdtemp(prefix="repro-out-", dir="/tmp")
    env = dict(os.environ, PYTHON=PYTHON)
    cmd = [os.path.join(HERE, "build.sh"), out]
    if sandboxed:
        cmd = [sys.executable, "-m", "sandlock_core.cli", "run", *SANDBOX_FLAGS, "-w", out, "--", *cmd]
    subprocess.run(cmd, check=True, env=env)
    return digests(out)


def main() -> int:
    bare = [build(False), build(False)]
    boxed = [build(True), build(True)]
    for label, (a, b) in (("bare", bare), ("sandboxed", boxed)):
        for name in a:
            print(f"{label:10s} {name:28s} {a[name][:16]}  {b[name][:16]}  {'same' if a[name] == b[name] else 'DIFFERENT'}")
    ok = boxed[0] == boxed[1] and all(bare[0][k] != bare[1][k] for k in bare[0])
    print("reproducible in the sandbox, not without it" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
