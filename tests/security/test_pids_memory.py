"""Reviewer's findings on max_memory and isolate_pids: each bypass really attempted by a confined process."""
import errno
import json
import os
import tempfile

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
