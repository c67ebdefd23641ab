"""Reviewer's findings on max_memory and isolate_pids: each bypass really attempted by a confined process."""
import errno
import json
import os
import subprocess
import sys
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
def test_kill_0_reaches_the_sandbox_processes_of_the_group_and_no_host_process(as_nobody, pid_mode):
    out = _run_driver(KILL0_DRIVER, as_nobody)
    assert "kid 3 self 1" in out, out
    assert "RESULT 0 supervisor 0 host 0" in out, out


# fcntl/ioctl owner changes: with O_ASYNC the kernel signals the owner on I/O. Landlock's isolate_signals scope
# would stop the signal too: isolate_pids alone is tested here.
OWNER_SANDBOXED = r"""
import fcntl, json, os, signal, socket, struct, sys, time
host = int(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = 0
    except OSError as e:
        out[name] = e.errno
def arm(fd, wfd):  # F_SETSIG SIGUSR1 + O_ASYNC, then make the fd readable: the owner gets SIGUSR1
    fcntl.fcntl(fd, 10, signal.SIGUSR1)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    os.write(wfd, b"x")
r, w = os.pipe()
attempt("setown", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, host))
attempt("setown_group", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, -os.getpgid(host)))
attempt("setown_ex", lambda: fcntl.fcntl(r, 15, struct.pack("ii", 1, host)))      # F_OWNER_PID
attempt("setown_ex_tid", lambda: fcntl.fcntl(r, 15, struct.pack("ii", 0, host)))  # F_OWNER_TID
s1, s2 = socket.socketpair()  # FIOSETOWN and SIOCSPGRP are socket ioctls
attempt("fiosetown", lambda: fcntl.ioctl(s1.fileno(), 0x8901, struct.pack("i", host)))
attempt("siocspgrp", lambda: fcntl.ioctl(s1.fileno(), 0x8902, struct.pack("i", host)))
arm(r, w)
arm(s1.fileno(), s2.fileno())
# allowed: this process as the owner, through each call
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
for name, how in (("own_setown", lambda fd: fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())),
                  ("own_setown_ex", lambda fd: fcntl.fcntl(fd, 15, struct.pack("ii", 1, os.getpid()))),
                  ("own_fiosetown", lambda fd: fcntl.ioctl(fd, 0x8901, struct.pack("i", os.getpid())))):
    pair = socket.socketpair()
    a, b = pair[0].fileno(), pair[1].fileno()
    how(a)
    out[name] = [fcntl.fcntl(a, fcntl.F_GETOWN) == os.getpid()]
    arm(a, b)
    time.sleep(0.05)
    out[name].append(len(got))
    got.clear()
print(json.dumps(out))
"""
OWNER_DRIVER = r"""
import json, os, signal, sys, time
from sandlock_core import Policy, Sandbox
r, w = os.pipe()
host = os.fork()
if host == 0:  # a host process (its own group) that counts the signals it gets
    hit = []
    signal.signal(signal.SIGUSR1, lambda *a: hit.append(1))
    signal.signal(signal.SIGIO, lambda *a: hit.append(1))
    os.setpgid(0, 0)
    os.write(w, b"r")
    time.sleep(3)
    os._exit(len(hit))
os.read(r, 1)
res = Sandbox(Policy(isolate_pids=True)).run(["/usr/bin/python3", "-c", sys.argv[1], str(host)], timeout=60)
status = os.waitstatus_to_exitcode(os.waitpid(host, 0)[1])
print(json.dumps({"out": res.stdout.decode(), "err": res.stderr.decode()[-500:], "host": status}))
"""


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
def test_an_fd_owner_outside_the_sandbox_is_refused_and_signals_nobody(as_nobody, pid_mode):
    if as_nobody:
        p = run_as_nobody(OWNER_DRIVER, OWNER_SANDBOXED, timeout=90)
    else:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        p = subprocess.run([sys.executable, "-c", OWNER_DRIVER, OWNER_SANDBOXED], capture_output=True, text=True,
                           timeout=90, env={**os.environ, "PYTHONPATH": root}, cwd="/")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["out"], res["err"]
    out = json.loads(res["out"])
    refused = {k: v for k, v in out.items() if not k.startswith("own_")}
    assert refused == dict.fromkeys(refused, errno.ESRCH) and len(refused) == 6, out
    for own in ("own_setown", "own_setown_ex", "own_fiosetown"):  # the caller as the owner: set, and signalled
        assert out[own][0] is True and out[own][1] >= 1, out
    assert res["host"] == 0, res  # the host process got no signal


def test_only_owner_changes_among_fcntl_and_ioctl_reach_the_supervisor(pid_mode):
    code = """
import fcntl, os, sys, termios
r, w = os.pipe()
for i in range(int(sys.argv[1])):
    fcntl.fcntl(r, fcntl.F_GETFL); fcntl.fcntl(r, fcntl.F_GETOWN)
    fcntl.ioctl(r, termios.FIONREAD, b"    ")
"""
    sb = Sandbox(Policy(isolate_pids=True))
    none, many = (sb.run([*PY, code, k]) for k in ("0", "1000"))
    assert none.success and many.success, many.stderr
    assert many.notifications - none.notifications < 50, (none.notifications, many.notifications)


def test_owner_ioctls_and_chattr_ioctls_share_the_argument_filter(monkeypatch):
    """isolate_pids notifies two ioctl commands, the metadata guard chattr's: the filter notifies exactly
    those (tcgetattr and the like stay in the kernel) and still refuses fs-verity enabling itself. (The
    supervised isolate_pids: under a pid namespace the kernel decides the owner, nothing is notified.)"""
    monkeypatch.setenv("SANDLOCK_PIDS_SUPERVISED", "1")
    from sandlock_core import seccomp, syscalls
    from sandlock_core.plan import Plan
    d = tempfile.mkdtemp()
    spec = Plan(Policy(isolate_pids=True, fs_readable=["/"], fs_writable=[d])).spec
    ioctl = syscalls.number("ioctl")
    cmds = {c[3] for c in spec.notify_if_arg if c[0] == ioctl}
    assert cmds == {0x8901, 0x8902, *seccomp.FILEATTR_SET_IOCTLS}
    assert spec.fileattr_ioctl == seccomp.SECCOMP_RET_USER_NOTIF and ioctl in spec.notify


# ---- procfs: O_NOFOLLOW of open/openat, in C (absolute names) and in Python (relative names, /proc) ----
NOFOLLOW_CODE = r"""
import os, sys
d = sys.argv[1]
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
out = []
for path, kw in ((d + "/dangling", {}), ("dangling", {"dir_fd": dfd}), (d + "/link", {}),
                 ("/proc/self/exe", {}), ("/proc/self/cwd", {})):
    for fl in (os.O_RDONLY | os.O_NOFOLLOW, os.O_RDONLY):
        try:
            os.close(os.open(path, fl, **kw)); out.append(0)
        except OSError as e:
            out.append(e.errno)
print(out)
"""


@pytest.mark.parametrize("path", ["C", "Python"])
@pytest.mark.parametrize("policy", [{"max_memory": "256M"}, {"isolate_pids": True}], ids=["max_memory", "isolate_pids"])
def test_o_nofollow_of_a_link_is_eloop_as_with_the_kernel(path, policy, pid_mode):
    d = tempfile.mkdtemp(prefix="pfnf-")
    os.chmod(d, 0o755)
    os.symlink(d + "/nowhere", d + "/dangling")
    open(d + "/file", "w").close()
    os.symlink(d + "/file", d + "/link")
    argv = ["/usr/bin/python3", "-c", NOFOLLOW_CODE, d]
    bare = subprocess.run(argv, capture_output=True, text=True)
    loop, noent = errno.ELOOP, errno.ENOENT
    assert bare.stdout == f"[{loop}, {noent}, {loop}, {noent}, {loop}, 0, {loop}, 0, {loop}, 0]\n", bare
    names = ("open", "openat", "stat", "newfstatat", "statx")  # a user handler takes the chain off the C path
    handlers = {n: (lambda sup, n: None) for n in names} if path == "Python" else None
    r = Sandbox(Policy(**policy), handlers=handlers).run(argv, timeout=60)
    assert r.stdout.decode() == bare.stdout, (r.stdout, r.stderr)


# ---- procfs under a chroot or a mount namespace: names are the child's, resolved in its root ----
NS_CODE = r"""
import json, os, sys, tempfile
from sandlock_core import Policy, Sandbox
exec(sys.argv[1], globals())  # make_root
base = tempfile.mkdtemp(prefix="pfns-"); os.chmod(base, 0o755)
root = make_root(base + "/root", ("sh", "cat"))
os.makedirs(root + "/d/sub")
open(root + "/d/sub/f", "w").write("rel\n")
os.symlink("/d/sub", root + "/d/abs")  # an absolute link: the chroot's /d/sub
for d, _, _ in os.walk(root):
    os.chmod(d, 0o755)
out = {}
for name, kw in (("plain", {}), ("isolate_pids", {"isolate_pids": True}), ("max_memory", {"max_memory": "256M"})):
    r = Sandbox(Policy(chroot=root, fs_readable=[root], **kw)).run(
        ["/bin/sh", "-c", "cat /etc/marker; cd /d; cat sub/f abs/f /d/abs/f"])
    out[name] = [r.stdout.decode(), r.stderr.decode()]
wd = tempfile.mkdtemp(prefix="pfov-"); os.chmod(wd, 0o755)
for name, kw in (("overlay", {}), ("overlay_procfs", {"max_memory": "256M", "isolate_pids": True})):
    r = Sandbox(Policy(workdir=wd, cwd=wd, fs_isolation="overlayfs", **kw)).run(
        ["/bin/sh", "-c", f"echo hi > new.txt; cat {wd}/new.txt new.txt; head -c 9 /proc/meminfo; echo; "
                          f"cat /proc/1/status > /dev/null || echo hidden; cd /proc && cat 1/status > /dev/null || echo hidden"])
    out[name] = [r.stdout.decode(), r.stderr.decode()]
print(json.dumps(out))
"""


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
def test_procfs_resolves_names_in_the_childs_root(as_nobody):
    from test_chroot import MAKE_ROOT, _userns_works
    if _userns_works() is not None:
        pytest.skip(_userns_works())
    if as_nobody:
        p = run_as_nobody(NS_CODE, MAKE_ROOT, timeout=120)
    else:
        top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        p = subprocess.run([sys.executable, "-c", NS_CODE, MAKE_ROOT], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": top}, cwd="/")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for name in ("plain", "isolate_pids", "max_memory"):  # a file only inside the chroot, by every kind of name
        assert out[name][0] == "inside\nrel\nrel\nrel\n", (name, out[name])
    assert out["overlay"][0].startswith("hi\nhi\nMemTotal:"), out["overlay"]
    # procfs still acts inside the overlay: a file made there opens, the limit shows, host processes stay hidden
    assert out["overlay_procfs"][0] == "hi\nhi\nMemTotal:\nhidden\nhidden\n", out["overlay_procfs"]


@pytest.mark.parametrize("pids", [False, True], ids=["plain", "isolate_pids"])  # a pid namespace where allowed
def test_a_shared_mapping_of_dev_zero_is_charged_and_other_shared_files_are_not(pids):
    code = LIBC + """
fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o600)
if sys.argv[2] != "/dev/zero":
    os.ftruncate(fd, n)
p = libc.mmap(None, n, int(sys.argv[3]), mmap.MAP_SHARED | 0x8000, fd, 0)  # MAP_POPULATE
print("mapped" if p not in (None, 2**64 - 1) else ctypes.get_errno())
"""
    f = tempfile.mktemp(dir=tempfile.mkdtemp())
    sb = Sandbox(Policy(max_memory="64M", isolate_pids=pids))
    for prot in ("1", "3"):  # PROT_READ, PROT_READ|PROT_WRITE
        zero = sb.run([*PY, code, "256", "/dev/zero", prot], timeout=60)
        assert zero.stdout == f"{errno.ENOMEM}\n".encode(), (zero.stdout, zero.stderr)
        assert sb.run([*PY, code, "16", "/dev/zero", prot], timeout=60).stdout == b"mapped\n"
        # a file on disk: page cache, not counted (mapped beyond the limit)
        assert sb.run([*PY, code, "96", f, prot], timeout=60).stdout == b"mapped\n"
