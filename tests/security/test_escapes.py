"""Escape attempts with real code inside the sandbox: blocked syscalls through every entry, namespaces,
kernel attack surface, and tampering with the supervisor or host processes.

The supervisor is this test process (the Sandbox's caller): os.getpid() here.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import subprocess

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.seccomp import (CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID,
                                   CLONE_NEWTIME, CLONE_NEWUSER, CLONE_NEWUTS)

from .helpers import SYSTEM_RO, compile_c

HERE = os.path.dirname(__file__)
ATTACKER_DIR: list[str] = []
X86_64 = platform.machine() == "x86_64"

# Policies that put a supervisor between the child and the world (fs_denied, net_allow_hosts), plus the
# plain Landlock ones. Every attack below must fail under each.
SUPERVISED = {
    "fs_denied": lambda tmp: Policy(fs_denied=[str(tmp / "secret")]),
    "net_allow_hosts": lambda tmp: Policy(net_allow_hosts=["127.0.0.1"]),
    "fs_readable+proc": lambda tmp: Policy(fs_readable=[*SYSTEM_RO, "/proc", str(tmp), ATTACKER_DIR[0]]),
    "isolate_signals": lambda tmp: Policy(isolate_signals=True),
}


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    with open(os.path.join(HERE, "attacker.c")) as f:
        exe = compile_c(f.read(), tmp_path_factory.mktemp("attacker"), "attacker")
    ATTACKER_DIR[:] = [os.path.dirname(exe)]
    return exe


def results(res) -> dict[str, tuple[int, int]]:
    """{what: (return, errno)} from the attacker's report lines."""
    out = {}
    for line in res.stdout.decode().splitlines():
        what, ret, err = line.split()
        out[what] = (int(ret), int(err))
    return out


@pytest.fixture
def host_sleeper():
    """A host process (not in any sandbox) the attacks aim at."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


# ---- kernel attack surface -------------------------------------------------------------------------------

@pytest.mark.parametrize("attack, name", [("io_uring", "io_uring_setup"), ("userfaultfd", "userfaultfd"),
                                          ("bpf", "bpf"), ("perf", "perf_event_open")])
def test_kernel_attack_surface_is_eperm(attacker, attack, name):
    res = Sandbox(Policy()).run([attacker, attack])
    assert results(res)[name] == (-1, errno.EPERM), res


# i386 numbers of the default blocklist (int 0x80), plus getpid: the foreign entry itself is what gets the
# process killed, whatever the number. x32 uses the native numbers with __X32_SYSCALL_BIT.
I386 = {"getpid": 20, "mount": 21, "umount2": 52, "pivot_root": 217, "swapon": 87, "swapoff": 115, "reboot": 88,
        "sethostname": 74, "setdomainname": 121, "kexec_load": 283, "init_module": 128, "finit_module": 350,
        "delete_module": 129, "unshare": 310, "setns": 346, "perf_event_open": 336, "bpf": 357,
        "userfaultfd": 374, "keyctl": 288, "add_key": 286, "request_key": 287, "ptrace": 26,
        "process_vm_readv": 347, "process_vm_writev": 348, "open_by_handle_at": 342, "name_to_handle_at": 341,
        "ioperm": 101, "iopl": 110, "quotactl": 131, "acct": 51, "lookup_dcookie": 253, "nfsservctl": 169,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "personality": 136}


def _x64_numbers() -> dict[str, int]:
    from sandlock_core import syscalls
    out = {"getpid": 39}
    for name in syscalls.DEFAULT_BLOCKLIST:
        nr = syscalls.number(name, "x86_64")
        if nr is not None:
            out[name] = nr
    return out


def test_the_i386_table_here_covers_the_blocklist():
    from sandlock_core import syscalls
    assert set(syscalls.DEFAULT_BLOCKLIST) <= set(I386)


@pytest.mark.skipif(not X86_64, reason="the int 0x80 and x32 entries exist on x86_64 only")
@pytest.mark.parametrize("entry", ["int80", "x32"])
def test_blocked_syscalls_through_foreign_abis_are_killed(attacker, entry):
    table = I386 if entry == "int80" else _x64_numbers()
    sb = Sandbox(Policy())
    for name, nr in table.items():
        res = sb.run([attacker, entry, str(nr)])
        assert res.signal == signal.SIGSYS, (name, res)
        assert res.stdout == b"", (name, res)


FLAGS = {"NEWNS": CLONE_NEWNS, "NEWCGROUP": CLONE_NEWCGROUP, "NEWUTS": CLONE_NEWUTS, "NEWIPC": CLONE_NEWIPC,
         "NEWUSER": CLONE_NEWUSER, "NEWPID": CLONE_NEWPID, "NEWNET": CLONE_NEWNET, "NEWTIME": CLONE_NEWTIME}


def test_clone_and_clone3_with_each_namespace_flag(attacker):
    sb = Sandbox(Policy())
    assert results(sb.run([attacker, "clone", "0"]))["clone"][0] > 0  # plain fork still works
    for name, flag in FLAGS.items():
        assert results(sb.run([attacker, "clone", hex(flag)]))["clone"] == (-1, errno.EPERM), name
        # clone3 keeps its flags in memory: refused whole, libc falls back to clone
        assert results(sb.run([attacker, "clone3", hex(flag)]))["clone3"] == (-1, errno.ENOSYS), name
    assert results(sb.run([attacker, "clone3", "0"]))["clone3"] == (-1, errno.ENOSYS)


# ---- the supervisor and host processes -------------------------------------------------------------------

@pytest.mark.parametrize("policy", list(SUPERVISED))
def test_ptrace_of_the_supervisor_a_host_process_and_a_sibling(attacker, policy, tmp_path, host_sleeper):
    sb = Sandbox(SUPERVISED[policy](tmp_path))
    for target in (os.getpid(), host_sleeper.pid):
        r = results(sb.run([attacker, "ptrace", str(target)]))
        assert r["ptrace"] == (-1, errno.EPERM) and r["seize"] == (-1, errno.EPERM), (target, r)
    res = sb.run(["sh", "-c", f"sleep 30 & {attacker} ptrace $!; kill $!"])
    r = results(res)
    assert r["ptrace"] == (-1, errno.EPERM) and r["seize"] == (-1, errno.EPERM), res


@pytest.mark.parametrize("policy", list(SUPERVISED))
def test_process_vm_writev_into_the_supervisor(attacker, policy, tmp_path):
    marker = ctypes.create_string_buffer(b"UNTOUCHED")
    r = results(Sandbox(SUPERVISED[policy](tmp_path)).run(
        [attacker, "vmwrite", str(os.getpid()), hex(ctypes.addressof(marker))]))
    assert r["vmwrite"] == (-1, errno.EPERM) and r["vmread"] == (-1, errno.EPERM)
    assert marker.value == b"UNTOUCHED"


@pytest.mark.parametrize("policy", list(SUPERVISED))
def test_writing_proc_pid_mem_of_the_supervisor(attacker, policy, tmp_path):
    """/proc/PID/mem is ptrace by another name: a child that can write it rewrites the supervisor that
    enforces fs_denied and net_allow_hosts."""
    marker = ctypes.create_string_buffer(b"UNTOUCHED")
    res = Sandbox(SUPERVISED[policy](tmp_path)).run(
        [attacker, "mem", str(os.getpid()), hex(ctypes.addressof(marker))])
    r = results(res)
    assert marker.value == b"UNTOUCHED", f"the sandboxed child rewrote the supervisor's memory: {r}"
    assert r["mem-open"][0] == -1 and r["mem-open"][1] in (errno.EACCES, errno.EPERM), r


@pytest.mark.parametrize("policy", ["fs_readable+proc", "isolate_signals"])
def test_writing_proc_pid_mem_of_a_host_process(attacker, policy, tmp_path, host_sleeper):
    """With a Landlock domain the kernel refuses ptrace access to anything outside it. (Without one, a
    policy that confines no files leaves other processes of the same user as open as their files.)"""
    r = results(Sandbox(SUPERVISED[policy](tmp_path)).run([attacker, "mem", str(host_sleeper.pid), "0x1000"]))
    assert r["mem-open"][0] == -1 and r["mem-open"][1] in (errno.EACCES, errno.EPERM), r


def test_isolate_signals_refuses_kill_of_the_supervisor_and_host_processes(attacker, host_sleeper):
    sb = Sandbox(Policy(isolate_signals=True))
    # SIGURG is ignored by default: harmless to this test process should the refusal fail
    r = results(sb.run([attacker, "kill", str(os.getpid()), str(int(signal.SIGURG))]))
    assert r["kill"] == (-1, errno.EPERM), r
    assert r["pidfd_send_signal"] == (-1, errno.EPERM), r
    r = results(sb.run([attacker, "kill", str(host_sleeper.pid), str(int(signal.SIGTERM))]))
    assert r["kill"] == (-1, errno.EPERM) and r["pidfd_send_signal"] == (-1, errno.EPERM), r
    assert host_sleeper.poll() is None
    # inside the sandbox signals still work
    res = sb.run(["sh", "-c", f"sleep 30 & {attacker} kill $! 15; wait"])
    assert results(res)["kill"] == (0, 0), res


# ---- policy_fn: the execve freeze ------------------------------------------------------------------------

def test_policy_fn_exec_denial_cannot_be_raced_through_shared_memory(attacker, tmp_path):
    """policy_fn judges an execve only when the caller's memory is frozen, then CONTINUEs. Here the path lives
    in a MAP_SHARED page that a forked sibling (its own mm, still running) keeps flipping between an allowed
    and a denied binary; the attacker closed fd 0 first. The denied binary must never run."""
    def on_event(event, ctx):
        if event.syscall in ("execve", "execveat") and event.path_contains("/usr/bin/id"):
            return True
        return 0

    if not os.path.exists("/usr/bin/id"):
        pytest.skip("needs /usr/bin/id")
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, ATTACKER_DIR[0]]), policy_fn=on_event)
    res = sb.run([attacker, "shmexec", "/bin/true", "/usr/bin/id", "300"], timeout=120)
    assert b"shmexec" in res.stdout, res
    ran_denied = res.stdout.count(b"uid=")
    assert ran_denied == 0, f"/usr/bin/id ran {ran_denied} times despite policy_fn denying it: {res.stdout[-200:]!r}"
