"""Shared pieces of the adversarial suite: the system interpreter, read-only system trees, a C compiler fixture."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SYSTEM_RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]


def py(code: str, *args: str) -> list[str]:
    """argv running ``code`` with the system interpreter, isolated from site and the environment."""
    return [PY, "-I", "-S", "-c", textwrap.dedent(code), *args]


def compile_c(source: str, directory, name: str, *flags: str) -> str:
    """gcc ``source`` into ``directory/name`` (world-readable and executable); skips without gcc."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed for the raw-syscall attackers")
    directory = str(directory)
    os.chmod(directory, 0o755)
    src = os.path.join(directory, name + ".c")
    out = os.path.join(directory, name)
    with open(src, "w") as f:
        f.write(source)
    res = subprocess.run(["gcc", "-O1", "-o", out, src, *flags], capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"gcc failed:\n{res.stderr}")
    os.chmod(out, 0o755)
    return out
