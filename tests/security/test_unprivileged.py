"""The escape attempts again with everything (supervisor, sandbox, host peers) running as uid 65534: what root
gets from capabilities must not be what holds the line."""
from __future__ import annotations

import ast
import os

import pytest

from support import run_as_nobody

ATTACKS = r'''
import ctypes, errno, os, socket, sys, tempfile, threading, time
from sandlock_core import Policy, Sandbox
PY = sys.executable
RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
d = tempfile.mkdtemp()
os.chmod(d, 0o755)
w = d + "/w"
os.makedirs(w + "/a/private")
open(w + "/a/private/key", "w").write("k3y")
open(w + "/secret", "w").write("s3cret")
open(w + "/ok", "w").write("fine")
sup = os.getpid()
marker = ctypes.create_string_buffer(b"UNTOUCHED")
r, wp = os.pipe2(os.O_CLOEXEC)
os.write(wp, b"SUPERVISOR-PIPE")
gated = Policy(fs_readable=RO + ["/proc"], fs_writable=[w], fs_denied=[w + "/secret", w + "/a/private"])
out = {}

def probe(name, sb, code):
    wrapped = "import ctypes, errno, os, socket, sys\ntry:\n" + "\n".join("    " + l for l in code.splitlines()) + \
              "\n    print('OK')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, e.errno))\n"
    res = sb.run([PY, "-I", "-S", "-c", wrapped], timeout=30)
    out[name] = res.stdout.decode().strip().splitlines()[-1] if res.stdout.strip() else f"exit {res.exit_code}"

libc = "libc = ctypes.CDLL(None, use_errno=True); libc.syscall.restype = ctypes.c_long\n"
for pname, pol in (("gated", gated), ("net", Policy(net_allow_hosts=["127.0.0.1"])),
                   ("signals", Policy(isolate_signals=True))):
    sb = Sandbox(pol)
    marker.value = b"UNTOUCHED"
    probe(f"ptrace-supervisor/{pname}", sb, libc + f"r = libc.syscall(101, 16, {sup}, 0, 0)\n"
          "if r < 0: raise OSError(ctypes.get_errno(), 'ptrace')")
    probe(f"process_vm_writev/{pname}", sb, libc + f"r = libc.syscall(311, {sup}, 0, 0, 0, 0, 0)\n"
          "if r < 0: raise OSError(ctypes.get_errno(), 'pvw')")
    probe(f"mem-supervisor/{pname}", sb, f"fd = os.open('/proc/{sup}/mem', os.O_RDWR)\n"
          f"os.pwrite(fd, b'PWNED!!!', {ctypes.addressof(marker)})")
    out[f"mem-marker/{pname}"] = marker.value.decode()
    probe(f"supervisor-fd/{pname}", sb, f"fd = os.open('/proc/self/fd/{r}', os.O_RDONLY | os.O_NONBLOCK)\n"
          "print(os.read(fd, 100).decode())")
    probe(f"kill-supervisor/{pname}", sb, f"os.kill({sup}, 0)")
    probe(f"unshare-user/{pname}", sb, libc + "r = libc.syscall(272, 0x10000000)\n"
          "if r < 0: raise OSError(ctypes.get_errno(), 'unshare')")
sb = Sandbox(gated)
probe("read-denied", sb, f"open({w!r} + '/secret').read()")
probe("proc-self-root-denied", sb, f"open('/proc/self/root' + {w!r} + '/secret').read()")
probe("hardlink-denied", sb, f"os.link({w!r} + '/secret', {w!r} + '/hl'); open({w!r} + '/hl').read()")
probe("rename-ancestor", sb, f"os.rename({w!r} + '/a', {w!r} + '/b'); print(open({w!r} + '/b/private/key').read())")
bad = socket.socket(); bad.bind(("127.0.0.2", 0)); bad.listen(4); bad.setblocking(False)
probe("connect-forbidden", Sandbox(Policy(net_allow_hosts=["127.0.0.1"])),
      f"s = socket.socket(); s.settimeout(5); s.connect(('127.0.0.2', {bad.getsockname()[1]}))")
try:
    bad.accept(); out["connect-forbidden-accepted"] = "yes"
except BlockingIOError:
    out["connect-forbidden-accepted"] = "no"
print(os.getuid(), repr(out))
'''

EXPECTED = {
    **{f"{k}/{p}": v for p in ("gated", "net", "signals") for k, v in (
        ("ptrace-supervisor", "EPERM"), ("process_vm_writev", "EPERM"), ("mem-marker", "UNTOUCHED"),
        ("unshare-user", "EPERM"))},
    "kill-supervisor/signals": "EPERM",
    "read-denied": "EACCES", "proc-self-root-denied": "EACCES", "hardlink-denied": "EACCES",
    "rename-ancestor": "EACCES", "connect-forbidden": "ECONNREFUSED", "connect-forbidden-accepted": "no",
}
REFUSED = ("EACCES", "EPERM", "ENOENT")


@pytest.fixture(scope="module")
def outcomes():
    res = run_as_nobody(ATTACKS, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    uid, _, rest = res.stdout.strip().splitlines()[-1].partition(" ")
    assert uid == str(65534 if os.geteuid() == 0 else os.geteuid())
    return ast.literal_eval(rest)


@pytest.mark.parametrize("attack", sorted(EXPECTED))
def test_as_nobody(outcomes, attack):
    assert outcomes[attack] == EXPECTED[attack], (attack, outcomes[attack])


@pytest.mark.parametrize("pname", ["gated", "net", "signals"])
def test_as_nobody_supervisor_memory_and_fds_are_out_of_reach(outcomes, pname):
    assert outcomes[f"mem-supervisor/{pname}"] in REFUSED, outcomes
    assert outcomes[f"supervisor-fd/{pname}"] in REFUSED, outcomes
