"""A thread flipping a path between an outside file and a workdir file while another thread keeps opening it
for writing: where the kernel acts on the flipped string (the supervisor let an outside path through), Landlock
must refuse the workdir, so the host tree stays untouched (as root and as uid 65534)."""
from __future__ import annotations

import os
import sys

from support import run_as_nobody

RACER = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
target, outside = sys.argv[1], sys.argv[2]
a, b = target.encode() + b"\0", outside.encode() + b"\0"
buf = ctypes.create_string_buffer(max(len(a), len(b)))
stop = []
def flip():
    while not stop:
        ctypes.memmove(buf, b, len(b))
        ctypes.memmove(buf, a, len(a))
t = threading.Thread(target=flip)
t.start()
for _ in range(20000):
    fd = libc.open(buf, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if fd >= 0:
        libc.write(fd, b"RACED\n", 6)
        libc.close(fd)
stop.append(1)
t.join()
"""

DRIVER = r"""
import os, sys, tempfile
from sandlock_core import Policy, Sandbox
base = tempfile.mkdtemp()
os.chmod(base, 0o755)
wd, out = os.path.join(base, "wd"), os.path.join(base, "out")
os.mkdir(wd); os.mkdir(out)
open(os.path.join(wd, "f"), "w").write("orig\n")
ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
pol = Policy(workdir=wd, cwd=wd, fs_readable=ro, fs_writable=[out])
r = Sandbox(pol).dry_run(["/usr/bin/python3", "-I", "-S", "-c", sys.argv[1], os.path.join(wd, "f"),
                          os.path.join(out, "o.txt")], timeout=120)
assert r.exit_code == 0, r.stderr
outside = open(os.path.join(out, "o.txt")).read().count("RACED")
host = open(os.path.join(wd, "f")).read()
print("OUTSIDE", outside, "HOST", repr(host), "CHANGES", [(c.kind, c.path) for c in r.changes])
"""


def _check(out: str):
    line = [x for x in out.splitlines() if x.startswith("OUTSIDE")][0]
    assert "HOST 'orig\\n'" in line, line  # the workdir file on the host was never written
    assert int(line.split()[1]) > 0, line  # the racer did get writes through (outside)


def test_flipped_write_path_never_reaches_the_host_workdir():
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", DRIVER, RACER], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    _check(r.stdout)


def test_flipped_write_path_never_reaches_the_host_workdir_unprivileged():
    r = run_as_nobody(DRIVER, RACER, timeout=180)
    assert r.returncode == 0, r.stderr
    _check(r.stdout)
