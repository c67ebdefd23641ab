"""Shared test helpers: running code as an unprivileged user, feature probes for skips."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import sandlock_core

NOBODY_UID = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups"]


@functools.lru_cache(maxsize=None)
def _nobody_pythonpath() -> str:
    """A world-readable copy of the packages, so uid 65534 can import them wherever the checkout lives."""
    base = tempfile.mkdtemp(prefix="sandlock-nobody-")
    os.chmod(base, 0o755)
    for pkg in ("sandlock_core", "pytest_sandlock"):
        src = os.path.dirname(sys.modules[pkg].__file__) if pkg in sys.modules else None
        if src is None:
            src = os.path.join(os.path.dirname(os.path.dirname(sandlock_core.__file__)), pkg)
        shutil.copytree(src, os.path.join(base, pkg), ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(base):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return base


def nobody_python() -> list[str]:
    """argv prefix that runs a Python interpreter as uid 65534 with our packages importable.

    Uses the system interpreter: the developer's interpreter may live under root's 0700 home. When the
    tests already run unprivileged, this is just the current interpreter.
    """
    if os.geteuid() != 0:
        return [sys.executable]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run tests as an unprivileged user")
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return [*SETPRIV, "/usr/bin/env", f"PYTHONPATH={_nobody_pythonpath()}", "HOME=/tmp", py, "-B"]


def run_as_nobody(code: str, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` as an unprivileged user; capture text output."""
    return subprocess.run([*nobody_python(), "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", **kw)


def userns_unavailable() -> str | None:
    """Why this kernel gives no unprivileged user namespace (None when it does): for skip reasons."""
    if not os.path.exists("/proc/self/ns/user"):
        return "no user namespaces in this kernel"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if f.read().strip() == "0":
                return "user.max_user_namespaces is 0"
    except OSError:
        pass
    return None


# ---- copy-on-write comparisons (test_cow.py, test_cow_overlay.py) ----
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e",
           "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
           "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
GIT_INDEX = os.path.join(".git", "index")  # holds inode numbers and ctimes: differs per copy


def tree_snapshot(root) -> dict:
    """path -> (type, mode, content or target) for every entry under root (mtimes and inodes left out)."""
    import stat
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            elif rel == GIT_INDEX:
                out[rel] = ("f", stat.S_IMODE(st.st_mode))
            else:
                with open(full, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), f.read())
    return out


def expected_changes(before: dict, after: dict) -> list[tuple[str, str]]:
    """The A/M/D list a dry run must report for two snapshots."""
    ch = []
    for p in sorted(set(before) | set(after)):
        if p not in after:
            ch.append(("D", p))
        elif p not in before:
            ch.append(("A", p))
        elif before[p] != after[p]:
            ch.append(("M", p))
    return ch


def make_tree(root):
    os.makedirs(root / "src" / "deep" / "er")
    (root / "README").write_text("hello\nworld\n")
    (root / "src" / "a.c").write_text("int a(void) { return 1; }\n")
    (root / "src" / "deep" / "x.txt").write_text("x\n")
    (root / "src" / "deep" / "er" / "y.txt").write_text("y\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "tool.sh", 0o755)
    os.symlink("README", root / "link")
    return root


def still_running(pids, seconds: float) -> list[int]:
    """The pids still running (not dead, not a zombie) after waiting up to ``seconds`` for them to end."""
    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + seconds
    alive = [p for p in pids if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if running(p)]
    return alive
