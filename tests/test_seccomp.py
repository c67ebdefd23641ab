"""The seccomp filter in the real kernel: each check installs a filter in a forked child, makes raw syscalls
and reports their results (or dies by SIGSYS); the security-relevant ones also run as uid 65534."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from sandlock_core import _sys, bpf, seccomp, syscalls
from sandlock_core.seccomp import FilterSpec, build_filter

from support import run_as_nobody

ARCH = syscalls.native_arch()
NR = syscalls.table(ARCH)
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# Shared by the tests here and the unprivileged runs (executed as the prologue of their script).
PROBE_SRC = r'''
import errno, json, os, resource
from sandlock_core import _sys, seccomp, syscalls

def probe(spec, calls, flags=0):
    """Fork; the child installs build_filter(spec) and makes each raw syscall (name or nr, *args).
    Returns (results, status): results[i] is the return value or -errno; status is the wait status."""
    blob = seccomp.build_filter(spec)
    nrs = [syscalls.number(c[0], spec.arch) if isinstance(c[0], str) else c[0] for c in calls]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        me = os.getpid()
        forks = {syscalls.number(n, spec.arch) for n in ("clone", "clone3", "fork", "vfork")}
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS would dump core
            _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
            _sys.seccomp_set_filter(blob, flags)
            out = []
            for nr, call in zip(nrs, calls):
                try:
                    ret = _sys.raw_syscall(nr, *call[1:])
                except OSError as e:
                    ret = -e.errno
                if ret == 0 and nr in forks and os.getpid() != me:  # a clone that should have been denied made a child
                    os._exit(0)
                out.append(ret)
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(99)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    status = os.waitpid(pid, 0)[1]
    return (json.loads(data) if data else None), status
'''
exec(compile(PROBE_SRC, "<probe>", "exec"), globals())

EPERM, ENOSYS = -errno.EPERM, -errno.ENOSYS
M1 = -1  # all-ones argument: invalid for every blocklisted call should the filter let it through

# What the Python child itself needs in allowlist mode to report (json, os.write, os.getpid, os._exit).
PY_NEEDS = ("write", "exit_group", "exit", "getpid", "mmap", "munmap", "brk", "mremap", "madvise",
            "rt_sigreturn", "rt_sigprocmask", "futex", "close")


def default_spec(**kw) -> FilterSpec:
    return seccomp.deny_only_spec(arch=ARCH, **kw)


def nrs(*names) -> frozenset:
    return frozenset(NR[n] for n in names if n in NR)


def assert_ok(status):
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"


def assert_sigsys(status):
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, f"child status {status:#x}"


# ---------------------------------------------------------------- spec / program shape (no kernel)

def test_constants():
    assert (seccomp.SECCOMP_RET_KILL_PROCESS, seccomp.SECCOMP_RET_ERRNO, seccomp.SECCOMP_RET_USER_NOTIF,
            seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_TRAP) == (
        0x80000000, 0x00050000, 0x7FC00000, 0x7FFF0000, 0x00030000)
    assert seccomp.RET_ALLOW == seccomp.SECCOMP_RET_ALLOW


def test_notify_and_deny_overlap_is_an_error():
    with pytest.raises(ValueError, match="getpid"):
        build_filter(FilterSpec(arch=ARCH, notify=nrs("getpid"), deny=nrs("getpid", "mount")))
    with pytest.raises(ValueError, match="errno_actions"):
        build_filter(FilterSpec(arch=ARCH, notify=nrs("getpid"), errno_actions=((NR["getpid"], 1),)))


@pytest.mark.parametrize("field", ["notify", "deny", "allow_only", "errno_actions"])
@pytest.mark.parametrize("bad", [-1, 1 << 30, "read"])
def test_a_number_that_is_no_syscall_number_is_refused_in_every_field(field, bad):
    # The filter compares unsigned: a negative entry would sort first in the binary search and never be reached.
    value = ((bad, 5),) if field == "errno_actions" else frozenset([bad])
    with pytest.raises(ValueError, match=f"FilterSpec.{field}: .* is not a syscall number"):
        build_filter(FilterSpec(arch=ARCH, **{field: value}))


def test_build_filter_is_cached_and_fast():
    import time
    spec = default_spec(no_udp=True)
    t = time.perf_counter()
    a = build_filter(spec)
    first = time.perf_counter() - t
    assert build_filter(default_spec(no_udp=True)) is a
    assert first < 0.05
    assert build_filter(default_spec(no_udp=False)) != a


def test_layout_starts_with_arch_check_and_x32_kill():
    insns = bpf.disassemble(build_filter(default_spec()))
    assert insns[0] == (bpf.LD_W_ABS, 0, 0, seccomp.OFF_ARCH)
    assert insns[1][0] == bpf.JMP_JEQ_K and insns[1][3] == syscalls.AUDIT_ARCH[ARCH]
    assert insns[2] == (bpf.LD_W_ABS, 0, 0, seccomp.OFF_NR)
    if ARCH == "x86_64":
        assert insns[3][0] == bpf.JMP_JGE_K and insns[3][3] == syscalls.X32_SYSCALL_BIT
    assert insns[-1] == (bpf.RET_K, 0, 0, seccomp.SECCOMP_RET_KILL_PROCESS)


def _data(nr, *args, arch=None):
    a = [x & 0xFFFFFFFFFFFFFFFF for x in args] + [0] * (6 - len(args))
    return struct.pack("=iIQ6Q", nr, arch or syscalls.AUDIT_ARCH[ARCH], 0, *a)


def test_arg_filtered_notified_syscalls_reach_the_supervisor_only_when_the_args_pass():
    spec = FilterSpec(arch=ARCH, notify=nrs("clone", "socket", "ioctl", "prctl", "clone3", "openat"),
                      deny=nrs("mount"))
    blob = build_filter(spec)
    run = lambda nr, *a: bpf.run(blob, _data(nr, *a))  # noqa: E731
    notif, eperm = seccomp.RET_USER_NOTIF, seccomp.RET_ERRNO | errno.EPERM
    assert run(NR["clone"], seccomp.CLONE_NEWUSER | 17) == eperm
    assert run(NR["clone"], 17) == notif
    assert run(NR["socket"], 2, 3) == eperm and run(NR["socket"], 2, 1) == notif
    assert run(NR["ioctl"], 0, 0x5412) == eperm and run(NR["ioctl"], 0, 0x5413) == notif
    assert run(NR["prctl"], 4) == eperm and run(NR["prctl"], 3) == notif
    assert run(NR["clone3"]) == seccomp.RET_ERRNO | errno.ENOSYS  # never notified: libc falls back to clone
    assert run(NR["openat"]) == notif and run(NR["mount"]) == eperm and run(NR["getpid"]) == seccomp.RET_ALLOW


def test_allowlist_program_semantics():
    spec = FilterSpec(arch=ARCH, notify=nrs("openat"), deny=nrs("write"),
                      allow_only=nrs("read", "write", "openat"))
    blob = build_filter(spec)
    run = lambda nr: bpf.run(blob, _data(nr))  # noqa: E731
    assert run(NR["read"]) == seccomp.RET_ALLOW
    assert run(NR["openat"]) == seccomp.RET_USER_NOTIF
    assert run(NR["write"]) == seccomp.RET_ERRNO | errno.EPERM   # deny beats allow
    assert run(NR["getpid"]) == seccomp.RET_ERRNO | errno.EPERM


def test_many_syscalls_in_each_list_build_and_dispatch():
    every = sorted(NR.values())
    assert len(every) > 300
    notify, deny = frozenset(every[::2]), frozenset(every[1::2])
    blob = build_filter(FilterSpec(arch=ARCH, notify=notify, deny=deny, deny_clone_namespaces=False,
                                   clone3_enosys=False, deny_tty_inject=False, no_raw_sockets=False,
                                   deny_set_dumpable=False))
    assert all(jt <= 255 and jf <= 255 for _, jt, jf, _ in bpf.disassemble(blob))
    for nr in every:
        want = seccomp.RET_USER_NOTIF if nr in notify else seccomp.RET_ERRNO | errno.EPERM
        assert bpf.run(blob, _data(nr)) == want
    assert bpf.run(blob, _data(NR["getpid"], arch=syscalls.AUDIT_ARCH_I386)) == seccomp.RET_KILL_PROCESS
    allow = build_filter(FilterSpec(arch=ARCH, allow_only=frozenset(every[:350])))
    assert bpf.run(allow, _data(every[349])) == seccomp.RET_ALLOW
    assert bpf.run(allow, _data(every[350])) == seccomp.RET_ERRNO | errno.EPERM


def test_every_syscall_number_reaches_its_answer_in_a_short_path(monkeypatch):
    """A binary search, not a list: the kernel runs the program for each syscall number when it attaches it
    (a 340-instruction list cost ~0.3 ms of every start-up) and on every filtered syscall. The big program is
    the supervised isolate_pids' (under a pid namespace far fewer syscalls are notified)."""
    from sandlock_core import Policy, Sandbox
    monkeypatch.setenv("SANDLOCK_PIDS_SUPERVISED", "1")
    blob = Sandbox(Policy(max_memory="512M", max_processes=64, num_cpus=2, isolate_pids=True))._plan.filter
    longest = max(bpf.execute(blob, _data(nr))[1] for nr in range(max(NR.values()) + 2))
    assert len(blob) // 8 > 300 and longest <= 30, longest


def test_allowlist_numbers_adds_the_baseline():
    got = seccomp.allowlist_numbers(["getppid"], ARCH)
    assert NR["getppid"] in got and NR["execve"] in got and NR["exit_group"] in got
    assert got == nrs("getppid", *seccomp.ALLOWLIST_BASELINE)
    from sandlock_core.errors import PolicyError
    with pytest.raises(PolicyError, match="allow_syscalls.*getpidd"):
        seccomp.allowlist_numbers(["getpidd"], ARCH)


def test_deny_only_spec():
    spec = seccomp.deny_only_spec()
    assert spec.arch == ARCH and spec.notify == frozenset() and spec.allow_only is None
    assert spec.deny == syscalls.numbers(syscalls.DEFAULT_BLOCKLIST, ARCH)
    assert seccomp.deny_only_spec(deny=["mount", NR["getppid"]]).deny == nrs("mount", "getppid")
    assert seccomp.deny_only_spec(deny=frozenset(), no_udp=True).no_udp


# ---------------------------------------------------------------- the kernel

def test_every_default_blocklist_syscall_gets_eperm():
    names = [n for n in syscalls.DEFAULT_BLOCKLIST if n in NR]
    assert len(names) >= 33
    res, status = probe(default_spec(), [(n, M1, M1, M1, M1, M1, M1) for n in names] + [("getppid",)])
    assert_ok(status)
    assert dict(zip(names, res)) == {n: EPERM for n in names}
    assert res[-1] == os.getpid()


def test_without_the_filter_those_calls_are_not_eperm():
    """Control for the test above: as root the all-ones arguments fail, but not with EPERM from us."""
    if os.geteuid() != 0:
        pytest.skip("as non-root the kernel itself may say EPERM")
    res, status = probe(FilterSpec(arch=ARCH, deny_clone_namespaces=False, clone3_enosys=False,
                                   deny_tty_inject=False, no_raw_sockets=False, deny_set_dumpable=False),
                        [("sethostname", M1, M1), ("unshare", M1), ("iopl", M1), ("reboot", M1, M1, M1, M1)])
    assert_ok(status)
    assert all(r < 0 and r != EPERM for r in res), res


def test_clone_namespace_flags_denied_plain_fork_works():
    sigchld = signal.SIGCHLD
    calls = [("clone", seccomp.CLONE_NEWUSER | sigchld, 0, 0, 0, 0),
             ("clone", seccomp.CLONE_NEWNET | sigchld, 0, 0, 0, 0),
             ("clone", seccomp.CLONE_NEWNS | seccomp.CLONE_NEWPID | sigchld, 0, 0, 0, 0),
             ("clone", (1 << 32) | seccomp.CLONE_NEWUTS | sigchld, 0, 0, 0, 0)]
    res, status = probe(default_spec(), calls)
    assert_ok(status)
    assert res == [EPERM] * 4


PY_FORK = r'''
import os, sys
from sandlock_core import _sys, seccomp
_sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
_sys.seccomp_set_filter(seccomp.build_filter(seccomp.deny_only_spec()), 0)
pid = os.fork()                      # glibc fork: clone(2) without namespace flags
if pid == 0:
    os._exit(7)
_, st = os.waitpid(pid, 0)
sp = os.posix_spawn("/bin/true", ["true"], {})   # glibc: clone3 first, ENOSYS -> clone(CLONE_VFORK)
_, st2 = os.waitpid(sp, 0)
print(os.waitstatus_to_exitcode(st), os.waitstatus_to_exitcode(st2))
'''


def test_fork_and_posix_spawn_work_under_the_filter_clone3_enosys():
    res = subprocess.run([sys.executable, "-c", PY_FORK], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["7", "0"]


def test_clone3_gets_enosys():
    # Without the filter clone3(NULL, 0) is EINVAL; with it, ENOSYS before the kernel looks at anything.
    res, status = probe(default_spec(), [("clone3", 0, 0), ("clone3", M1, 88)])
    assert_ok(status)
    assert res == [ENOSYS, ENOSYS]
    res, status = probe(default_spec(clone3_enosys=False), [("clone3", 0, 0)])
    assert_ok(status)
    assert res == [-errno.EINVAL]


def test_tty_injection_ioctls_denied():
    r, w = os.pipe()
    try:
        calls = [("ioctl", r, seccomp.TIOCSTI, 0), ("ioctl", r, seccomp.TIOCLINUX, 0),
                 ("ioctl", r, (1 << 32) | seccomp.TIOCSTI, 0),   # the kernel ignores the high half
                 ("ioctl", r, 0x5413, 0)]                          # TIOCGWINSZ: allowed (ENOTTY on a pipe)
        res, status = probe(default_spec(), calls)
        assert_ok(status)
        assert res == [EPERM, EPERM, EPERM, -errno.ENOTTY]
        res, status = probe(default_spec(deny_tty_inject=False), calls[:1])
        assert res == [-errno.ENOTTY]
    finally:
        os.close(r)
        os.close(w)


SOCK_NONBLOCK = 0o4000


def _socket_calls():
    return [("socket", 2, 3, 1),                      # AF_INET SOCK_RAW ICMP
            ("socket", 10, 3 | SOCK_NONBLOCK, 58),    # AF_INET6 SOCK_RAW|NONBLOCK ICMPv6
            ("socket", 2, 2, 0),                      # AF_INET SOCK_DGRAM
            ("socket", 10, 2 | SOCK_NONBLOCK, 0),     # AF_INET6 SOCK_DGRAM|NONBLOCK
            ("socket", 2, 1, 0),                      # AF_INET SOCK_STREAM
            ("socket", 1, 2, 0)]                      # AF_UNIX SOCK_DGRAM


def test_raw_sockets_denied_udp_allowed_unless_no_udp():
    res, status = probe(default_spec(), _socket_calls())
    assert_ok(status)
    assert res[:2] == [EPERM, EPERM]
    assert all(fd >= 0 for fd in res[2:]), res
    res, status = probe(default_spec(no_udp=True), _socket_calls())
    assert_ok(status)
    assert res[:4] == [EPERM] * 4
    assert all(fd >= 0 for fd in res[4:]), res


def test_raw_sockets_allowed_when_switched_off():
    if os.geteuid() != 0:
        pytest.skip("raw sockets need CAP_NET_RAW")
    res, status = probe(default_spec(no_raw_sockets=False), _socket_calls()[:1])
    assert_ok(status)
    assert res[0] >= 0 or res[0] in (-errno.EAFNOSUPPORT, -errno.EPROTONOSUPPORT)


def test_set_dumpable_denied_get_allowed():
    res, status = probe(default_spec(), [("prctl", _sys.PR_SET_DUMPABLE, 0), ("prctl", 3)])  # 3 = GET_DUMPABLE
    assert_ok(status)
    assert res == [EPERM, 1]


def test_errno_actions():
    res, status = probe(default_spec(errno_actions=((NR["getppid"], errno.EXDEV),)), [("getppid",), ("getpid",)])
    assert_ok(status)
    assert res[0] == -errno.EXDEV and res[1] > 0


def test_notify_without_listener_gives_enosys():
    """A USER_NOTIF result with no listener attached: the kernel answers ENOSYS (verified on 6.18)."""
    spec = FilterSpec(arch=ARCH, notify=nrs("getppid", "clone"), deny=nrs("mount"))
    res, status = probe(spec, [("getppid",), ("getpid",), ("mount", M1, M1, M1, M1, M1),
                               ("clone", seccomp.CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)])
    assert_ok(status)
    assert res[0] == ENOSYS and res[1] > 0 and res[2] == EPERM
    assert res[3] == EPERM  # the argument filter runs before the notify set


def test_allowlist_mode():
    allowed = nrs("getppid", "uname", *PY_NEEDS) - nrs("getpid")
    spec = FilterSpec(arch=ARCH, allow_only=allowed, notify=nrs("gettid"))
    res, status = probe(spec, [("getppid",), ("getuid",), ("gettid",), ("getpid",)])
    assert_ok(status)
    assert res[0] == os.getpid() and res[1] == EPERM and res[2] == ENOSYS
    assert res[3] == EPERM  # getpid is not listed in build_filter's input


def test_x32_syscall_number_is_killed():
    if ARCH != "x86_64":
        pytest.skip("x32 exists on x86_64 only")
    res, status = probe(default_spec(), [(NR["getpid"] | syscalls.X32_SYSCALL_BIT,)])
    assert_sigsys(status)
    # nr == -1 is not x32: it falls through (the kernel answers ENOSYS)
    res, status = probe(default_spec(), [(0xFFFFFFFF,), (-1,)])
    assert_ok(status)
    assert res == [ENOSYS, ENOSYS]


INT80_C = r"""
/* Reads a seccomp program from argv[1], installs it, then makes an i386 getpid through int 0x80. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

int main(int argc, char **argv)
{
    if (argc > 1) {
        static unsigned char buf[65536];
        FILE *f = fopen(argv[1], "rb");
        if (!f) return 10;
        size_t n = fread(buf, 1, sizeof(buf), f);
        fclose(f);
        struct sock_fprog prog = { (unsigned short)(n / 8), (struct sock_filter *)buf };
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return 11;
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) return 12;
    }
    long ret = 20; /* i386 __NR_getpid */
    __asm__ volatile ("int $0x80" : "+a"(ret) : : "memory");
    return ret == (long)getpid() ? 0 : 13;
}
"""


@pytest.fixture(scope="module")
def int80_binary(tmp_path_factory):
    if ARCH != "x86_64":
        pytest.skip("int 0x80 is an x86 thing")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the int 0x80 test program")
    d = tmp_path_factory.mktemp("int80")
    src, exe = d / "int80.c", d / "int80"
    src.write_text(INT80_C)
    res = subprocess.run([gcc, "-O0", "-o", str(exe), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot compile the int 0x80 program: {res.stderr[-300:]}")
    return exe


def test_int80_from_a_64bit_process_is_killed(int80_binary, tmp_path):
    # Control: without a filter the i386 entry works on this kernel.
    res = subprocess.run([str(int80_binary)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"this kernel has no working int 0x80 (IA32 emulation off?): exit {res.returncode}")
    prog = tmp_path / "filter.bin"
    prog.write_bytes(build_filter(default_spec()))
    res = subprocess.run([str(int80_binary), str(prog)], capture_output=True,
                         preexec_fn=lambda: __import__("resource").setrlimit(
                             __import__("resource").RLIMIT_CORE, (0, 0)))
    assert res.returncode == -signal.SIGSYS, res


# ---------------------------------------------------------------- unprivileged

NOBODY_CHECKS = PROBE_SRC + textwrap.dedent(r'''
    import signal, errno
    from sandlock_core.seccomp import FilterSpec
    arch = syscalls.native_arch()
    NR = syscalls.table(arch)
    M1 = -1
    out = {"uid": os.getuid()}
    names = [n for n in syscalls.DEFAULT_BLOCKLIST if n in NR]
    res, st = probe(seccomp.deny_only_spec(), [(n, M1, M1, M1, M1, M1, M1) for n in names])
    out["blocklist"] = [st, dict(zip(names, res))]
    res, st = probe(seccomp.deny_only_spec(),
                    [("clone", 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0), ("unshare", 0x10000000),
                     ("clone3", 0, 0)])
    out["clone"] = [st, res]
    allowed = frozenset(NR[n] for n in ("getppid", "write", "exit_group", "exit", "mmap", "munmap", "brk",
                                        "mremap", "madvise", "rt_sigreturn", "rt_sigprocmask", "futex",
                                        "close", "getpid"))
    res, st = probe(FilterSpec(arch=arch, allow_only=allowed), [("getppid",), ("getuid",), ("gettid",)])
    out["allow"] = [st, res]
    res, st = probe(seccomp.deny_only_spec(), [("socket", 2, 3, 1), ("socket", 2, 2, 0)])
    out["socket"] = [st, res]
    print(json.dumps(out))
''')


def test_filters_hold_for_an_unprivileged_user():
    res = run_as_nobody(NOBODY_CHECKS)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["uid"] == 65534 or os.geteuid() != 0
    st, blocked = out["blocklist"]
    assert st == 0 and len(blocked) >= 33 and set(blocked.values()) == {EPERM}, blocked
    st, clone = out["clone"]
    assert st == 0 and clone == [EPERM, EPERM, ENOSYS]
    st, allow = out["allow"]
    assert st == 0 and allow[0] > 0 and allow[1:] == [EPERM, EPERM]
    st, sock = out["socket"]
    assert st == 0 and sock[0] == EPERM and sock[1] >= 0


def test_ping_sockets_follow_no_raw_sockets():
    """socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP) is raw network access: refused unless raw sockets are allowed."""
    from sandlock_core import Policy, Sandbox
    code = ("import socket, errno\n"
            "for fam, proto in ((socket.AF_INET, 1), (socket.AF_INET6, 58), (socket.AF_INET, 0)):\n"
            "    try:\n"
            "        socket.socket(fam, socket.SOCK_DGRAM, proto).close(); print('ok')\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n")
    refused = Sandbox(Policy()).run(["/usr/bin/python3", "-I", "-S", "-c", code]).stdout.split()
    assert refused == [b"EPERM", b"EPERM", b"ok"]
    allowed = Sandbox(Policy(no_raw_sockets=False)).run(["/usr/bin/python3", "-I", "-S", "-c", code]).stdout.split()
    assert b"EPERM" not in allowed  # the kernel's ping_group_range may still say EACCES: that is not us
