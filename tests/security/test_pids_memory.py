"""Reviewer's findings on max_memory and isolate_pids: each bypass really attempted by a confined process."""
import errno
import json
import os
import subprocess
import sys

import pytest

from sandlock_core import Policy, Sandbox
from support import run_as_nobody

PY = ["/usr/bin/python3", "-I", "-S", "-c"]
MiB = 1 << 20

# ---- max_memory: memory that is allocated without a request the filter used to let through ----
LIBC = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.shmat.restype = ctypes.c_void_p
n = int(sys.argv[1]) << 20
"""
SHM_PRIVATE = LIBC + """
sid = libc.shmget(0, ctypes.c_size_t(n), 0o600)  # IPC_PRIVATE creates a segment without IPC_CREAT
if sid < 0:
    print("errno", ctypes.get_errno()); sys.exit()
p = libc.shmat(sid, None, 0)
libc.shmctl(sid, 0, None)  # IPC_RMID: freed at detach
ctypes.memset(p, 1, n)
print("filled")
"""
SHARED_ANON = LIBC + """
prot = int(sys.argv[2])
p = libc.mmap(None, n, prot, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | 0x8000, -1, 0)  # 0x8000: MAP_POPULATE
if p in (None, 2**64 - 1):
    print("errno", ctypes.get_errno()); sys.exit()
if prot == 0:  # PROT_NONE, made accessible later: charged at mmap already
    libc.mprotect(ctypes.c_void_p(p), n, mmap.PROT_READ | mmap.PROT_WRITE)
    ctypes.memset(p, 1, n)
print("filled")
"""


def test_a_private_sysv_segment_is_charged():
    sb = Sandbox(Policy(max_memory="64M"))
    big = sb.run([*PY, SHM_PRIVATE, "256"], timeout=60)
    assert big.stdout == f"errno {errno.ENOMEM}\n".encode(), (big.stdout, big.stderr)
    assert any(d.syscall == "shmget" and d.errno == errno.ENOMEM for d in big.denials)
    small = sb.run([*PY, SHM_PRIVATE, "16"], timeout=60)
    assert small.stdout == b"filled\n", small.stderr


@pytest.mark.parametrize("prot", [1, 0], ids=["PROT_READ", "PROT_NONE"])
def test_a_shared_anonymous_mapping_is_charged_whatever_its_protection(prot):
    p = str(prot)
    sb = Sandbox(Policy(max_memory="64M"))
    big = sb.run([*PY, SHARED_ANON, "256", p], timeout=60)
    assert big.stdout == f"errno {errno.ENOMEM}\n".encode(), (big.stdout, big.stderr)
    small = sb.run([*PY, SHARED_ANON, "16", p], timeout=60)
    assert small.stdout == b"filled\n", small.stderr


def test_memory_bypasses_are_refused_as_an_unprivileged_user():
    code = f"""
import json
from sandlock_core import Policy, Sandbox
sb = Sandbox(Policy(max_memory="64M"))
out = [sb.run({PY!r} + [c, "256", "1"], timeout=60).stdout.decode() for c in ({SHM_PRIVATE!r}, {SHARED_ANON!r})]
print(json.dumps(out))
"""
    p = run_as_nobody(code)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [f"errno {errno.ENOMEM}\n"] * 2


def test_a_memfd_mapping_is_file_storage_and_not_charged():
    """The documented choice: memfds and tmpfs files are file storage (they can be filled with write(2), which
    no filter could charge), so mapping one, even MAP_SHARED|MAP_POPULATE, is not counted."""
    code = LIBC + """
fd = os.memfd_create("x")
os.ftruncate(fd, n)
p = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | 0x8000, fd, 0)
print("mapped" if p not in (None, 2**64 - 1) else ctypes.get_errno())
"""
    r = Sandbox(Policy(max_memory="64M")).run([*PY, code, "96"], timeout=60)
    assert r.stdout == b"mapped\n", r.stderr


# ---- isolate_pids: signals that reach a host process without naming it in kill(pid) ----
def _run_driver(code: str, as_nobody: bool) -> str:
    if as_nobody:
        p = run_as_nobody(code, timeout=90)
    else:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                           env={**os.environ, "PYTHONPATH": root}, cwd="/")
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p.stdout


# On a pty, run_foreground leaves the sandbox in the caller's process group (new_pgrp=False, as the CLI runs):
# a host process of that group (here a sibling of the supervisor) must not get the sandbox's kill(0).
KILL0_DRIVER = r'''
import os, pty, signal, sys, time
pid, fd = pty.fork()
if pid == 0:
    from sandlock_core import Policy, Sandbox
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    r, w = os.pipe()
    host = os.fork()  # a host process in the caller's group
    if host == 0:
        hit = []
        signal.signal(signal.SIGUSR1, lambda *a: hit.append(1))
        os.write(w, b"r")
        time.sleep(2)
        os._exit(7 if hit else 0)
    os.read(r, 1)
    code = """
import os, signal, time
mine = []
signal.signal(signal.SIGUSR1, lambda *a: mine.append(1))
r, w = os.pipe()
kid = os.fork()
if kid == 0:   # in the sandbox and in the same group: gets it, as with the kernel
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    os.write(w, b"r")
    time.sleep(1.5)
    os._exit(3 if got else 4)
os.read(r, 1)
os.kill(0, signal.SIGUSR1)
print("kid", os.waitstatus_to_exitcode(os.waitpid(kid, 0)[1]), "self", len(mine), flush=True)
"""
    res = Sandbox(Policy(isolate_pids=True)).run_foreground(["/usr/bin/python3", "-c", code])
    time.sleep(0.2)
    status = os.waitstatus_to_exitcode(os.waitpid(host, 0)[1])
    print("RESULT", res.exit_code, "supervisor", len(got), "host", status, flush=True)
    os._exit(0)
out = b""
while True:
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
os.waitpid(pid, 0)
print(out.decode())
'''


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
def test_kill_0_reaches_the_sandbox_processes_of_the_group_and_no_host_process(as_nobody):
    out = _run_driver(KILL0_DRIVER, as_nobody)
    assert "kid 3 self 1" in out, out
    assert "RESULT 0 supervisor 0 host 0" in out, out
