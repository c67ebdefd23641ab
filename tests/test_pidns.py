"""isolate_pids by a user + mount + pid namespace (native.c "pid namespace", plan.pid_namespace_mode): the kernel
hides every other process; pid 1 is the sandbox's own C init, the program pid 2. Real processes, exact errnos.
The supervised fallback is covered by the ``pid_mode`` tests of test_procfs.py and tests/security."""
import errno
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from sandlock_core import Policy, Sandbox, syscalls
from sandlock_core.plan import Plan, pidns_usable
from support import run_as_nobody

PY = ["/usr/bin/python3", "-I", "-S", "-c"]

pytestmark = pytest.mark.skipif(not pidns_usable(), reason="this kernel refuses a user + pid namespace with its own "
                                "/proc here (isolate_pids then uses the supervised mode)")


@pytest.fixture(autouse=True)
def _namespace_mode(monkeypatch):
    monkeypatch.delenv("SANDLOCK_PIDS_SUPERVISED", raising=False)


def run(policy, code, *args, timeout=60):
    return Sandbox(policy).run([*PY, code, *map(str, args)], timeout=timeout)


def _host_procs_with(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


def _gone(marker: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _host_procs_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


IDENTITY = f"""
import errno, os, sys
host = int(sys.argv[1])
print(os.getpid(), os.getppid(), os.getpgid(0) == os.getpid())
print(open("/proc/1/comm").read().strip(), os.stat("/proc/1/status").st_size == 0)
print(sorted(int(x) for x in os.listdir("/proc") if x.isdigit()))
for what, fn in (("kill", lambda: os.kill(host, 0)), ("stat", lambda: os.stat(f"/proc/{{host}}/status")),
                 ("pidfd", lambda: os.close(os.pidfd_open(host))), ("kill1", lambda: os.kill(1, signal_zero)),
                 # the init holds a copy of the caller's memory: out of reach (Landlock, non-dumpable)
                 ("mem1", lambda: open("/proc/1/mem", "rb").read(1)), ("environ1", lambda: open("/proc/1/environ").read()),
                 ("kill1term", lambda: os.kill(1, 9))):
    try:
        fn()
        print(what, "ok")
    except OSError as e:
        print(what, e.errno)
""".replace("signal_zero", "0")


def test_pid_1_is_the_sandboxs_init_and_the_host_is_out_of_reach():
    r = run(Policy(isolate_pids=True), IDENTITY, os.getpid())
    assert r.stdout.decode().splitlines() == [
        "2 1 True", "sandlock-init True", "[1, 2]", f"kill {errno.ESRCH}", f"stat {errno.ENOENT}",
        f"pidfd {errno.ESRCH}", "kill1 ok", f"mem1 {errno.EACCES}", f"environ1 {errno.EACCES}", "kill1term ok"], \
        r.stderr


def test_exit_codes_and_signals_are_exact():
    sb = Sandbox(Policy(isolate_pids=True))
    r = sb.run([*PY, "import sys; sys.exit(7)"])
    assert (r.exit_code, r.signal, r.reason.value) == (7, None, "exited")
    for sig in (signal.SIGSEGV, signal.SIGKILL, signal.SIGTERM, signal.SIGABRT):
        r = sb.run([*PY, f"import os; os.kill(os.getpid(), {int(sig)})"])
        assert (r.exit_code, r.signal, r.reason.value) == (-sig, sig, "signaled"), (sig, r)
    r = sb.run(["/nonexistent/program"])
    assert r.exit_code == 127 and "execve" in (r.error or "") + r.stderr.decode()


def test_signals_to_the_init_reach_the_program_and_the_root_pid_is_the_program():
    sb = Sandbox(Policy(isolate_pids=True))
    p = sb.popen([*PY, "import time; print('up', flush=True); time.sleep(60)"], stderr=-3)
    try:
        assert p.stdout.readline() == b"up\n"
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            assert b"time.sleep(60)" in f.read()  # the host pid of the program, not of its init
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            init = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{init}/comm", "rb") as f:
            assert f.read() == b"sandlock-init\n"
        with open(f"/proc/{init}/cmdline", "rb") as f:
            assert not f.read().strip(b"\0")  # the caller's argv is blanked in the init's copy
        os.kill(init, signal.SIGTERM)  # forwarded to the program
        assert p.wait(timeout=10) == -signal.SIGTERM
    finally:
        p.kill()


def test_a_detached_grandchild_is_killed_at_timeout_and_at_the_end():
    marker = uuid.uuid4().hex
    r = Sandbox(Policy(isolate_pids=True)).run(
        ["sh", "-c", f"setsid sh -c 'exec sleep 300 {marker}' & sleep 300"], timeout=1)
    assert r.reason.value == "timeout"
    assert _gone(marker)
    marker = uuid.uuid4().hex
    r = Sandbox(Policy(isolate_pids=True)).run(["sh", "-c", f"(setsid sh -c 'exec sleep 300 {marker}' &); exit 3"])
    assert r.exit_code == 3
    assert _gone(marker)  # left in the namespace when the program ended: killed, as without a namespace


def test_supervisor_death_kills_the_namespace():
    marker = uuid.uuid4().hex
    root = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    script = f"""
import sys; sys.path[:0] = [{root!r}]
from sandlock_core import Policy, Sandbox
Sandbox(Policy(isolate_pids=True)).run(["sh", "-c", "setsid sh -c 'exec sleep 300 {marker}' & sleep 300"])
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while not _host_procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_procs_with(marker)
    proc.kill()
    proc.wait()
    assert _gone(marker)


def _state_becomes(pid: int, want, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if want(f.read().rsplit(b")", 1)[1].split()[0]):
                return True
        time.sleep(0.02)
    return False


def test_pause_and_resume_stop_the_program():
    sb = Sandbox(Policy(isolate_pids=True, max_cpu=50))
    p = sb.popen([*PY, "import time; print('up', flush=True); time.sleep(60)"], stderr=-3)
    try:
        assert p.stdout.readline() == b"up\n"
        p.pause()
        assert _state_becomes(p.pid, lambda s: s == b"T")
        p.resume()
        assert _state_becomes(p.pid, lambda s: s != b"T")
    finally:
        p.kill()
        p.wait(timeout=10)


def test_max_processes_and_the_figures_do_not_count_the_init():
    code = """
import os
for i in range(6):  # one at a time: with the root, 2 processes at most
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("forked")
"""
    r = run(Policy(isolate_pids=True, max_processes=2, max_memory="256M"), code)
    assert r.stdout == b"forked\n", r.stderr
    assert r.processes == 7, r.processes  # the root and 6 children: the init is not one of them
    # the init is a copy of the caller (this pytest process): its memory is not the sandbox's
    assert r.peak_memory is not None and r.peak_memory < 64 << 20, r.peak_memory
    r = run(Policy(isolate_pids=True, max_processes=2), """
import os
a = os.fork()
if a == 0:
    try:
        os.fork()
        print("third allowed", flush=True)
    except OSError as e:
        print("third", e.errno, flush=True)
    os._exit(0)
os.waitpid(a, 0)
""")
    assert r.stdout == f"third {errno.EAGAIN}\n".encode(), (r.stdout, r.stderr)


def test_no_stat_listing_or_pid_syscall_is_notified():
    plan = Plan(Policy(isolate_pids=True))
    assert plan.pidns
    names = set(plan.names[nr] for nr in plan.handlers)
    hidden = {"newfstatat", "statx", "stat", "lstat", "access", "faccessat", "faccessat2", "getdents64", "getdents",
              "readlink", "readlinkat", "kill", "tkill", "tgkill", "pidfd_open", "setpgid", "sched_getaffinity"}
    assert not names & hidden, names & hidden
    assert {"open", "openat"} <= names  # the sensitive files stay refused
    r = run(Policy(isolate_pids=True), "import json, sqlite3, os; os.stat('/proc/self'); os.listdir('/proc')")
    assert r.success and r.notifications < 100, (r.notifications, r.stderr)


def test_mount_unshare_and_setns_stay_refused():
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, args in (("unshare", (0x10000000,)), ("unshare", (0x20000000,)), ("setns", (0, 0)),
                   ("mount", (b"none", b"/tmp", b"tmpfs", 0, None)), ("umount2", (b"/proc", 2)),
                   ("chroot", (b"/tmp",))):
    nr = {{"unshare": {syscalls.number("unshare")}, "setns": {syscalls.number("setns")},
          "mount": {syscalls.number("mount")}, "umount2": {syscalls.number("umount2")},
          "chroot": {syscalls.number("chroot")}}}[name]
    r = libc.syscall(nr, *args)
    print(name, r, ctypes.get_errno() if r < 0 else 0)
"""
    r = run(Policy(isolate_pids=True), code)
    assert r.stdout.decode().splitlines() == [
        f"unshare -1 {errno.EPERM}", f"unshare -1 {errno.EPERM}", f"setns -1 {errno.EPERM}",
        f"mount -1 {errno.EPERM}", f"umount2 -1 {errno.EPERM}", f"chroot -1 {errno.EPERM}"], r.stderr


def test_proc_is_mounted_nosuid_nodev_noexec_and_landlock_still_applies(tmp_path):
    (tmp_path / "secret").write_text("x")
    code = f"""
top = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == "/proc"][-1]
print(sorted(set(top[5].split(",")) & {{"nosuid", "nodev", "noexec"}}), top[-3])
try:
    open({str(tmp_path / "secret")!r}).read()
    print("read")
except OSError as e:
    print(e.errno)
"""
    r = run(Policy(isolate_pids=True, fs_readable=["/usr", "/lib", "/lib64", "/etc", "/proc"]), code)
    assert r.stdout.decode().splitlines() == ["['nodev', 'noexec', 'nosuid'] proc", str(errno.EACCES)], r.stderr


def test_combinations_that_resolve_names_on_behalf_use_the_supervised_mode(tmp_path):
    assert Plan(Policy(isolate_pids=True)).pidns
    assert not Plan(Policy(isolate_pids=True, fs_denied=[str(tmp_path)])).pidns
    assert not Plan(Policy(isolate_pids=True, workdir=str(tmp_path))).pidns
    assert not Plan(Policy(isolate_pids=True, net_allow_hosts=["127.0.0.1"])).pidns
    assert not Plan(Policy(isolate_pids=True), policy_fn=lambda event, ctx: None).pidns
    assert not Plan(Policy(isolate_pids=True), supervised=False).pidns
    # an allowlist replaces the deny list, which holds the mount syscalls the namespace mode must refuse
    assert not Plan(Policy(isolate_pids=True, allow_syscalls=["read", "write", "exit_group"])).pidns
    # a confined Python function goes on in the forked child: no init can stand above it
    sb = Sandbox(Policy(isolate_pids=True))
    assert sb._plan.pidns and not sb._fork_plan().pidns
    r = sb.run_function(lambda: 0 if str(os.getppid()) not in os.listdir("/proc") else 1)
    assert r.exit_code == 0, r.stderr


def test_as_an_unprivileged_user(tmp_path):
    code = f"""
import os, sys
from sandlock_core import Policy, Sandbox
sb = Sandbox(Policy(isolate_pids=True))
print("pidns", sb._plan.pidns)
r = sb.run(["/usr/bin/python3", "-I", "-S", "-c", {IDENTITY!r}, str(os.getppid())])
print(r.stdout.decode(), end="")
r = sb.run(["/usr/bin/python3", "-I", "-S", "-c", "import os; print(os.stat('/').st_uid, flush=True); os.kill(os.getpid(), 11)"])
print(r.stdout.decode().strip(), r.signal)
"""
    p = run_as_nobody(code)
    lines = p.stdout.splitlines()
    if lines[:1] == ["pidns False"]:
        pytest.skip("uid 65534 gets no user + pid namespace here")
    # unmapped ids (root's) show as the overflow id 65534 to an unprivileged sandbox
    assert lines == ["pidns True", "2 1 True", "sandlock-init True", "[1, 2]", f"kill {errno.ESRCH}",
                     f"stat {errno.ENOENT}", f"pidfd {errno.ESRCH}", "kill1 ok", f"mem1 {errno.EACCES}",
                     f"environ1 {errno.EACCES}", "kill1term ok", "65534 11"], (lines, p.stderr)


def test_cpu_time_counts_every_process_of_the_namespace():
    """The init reaps the sandbox (not the reaper) and reports its children's CPU time with the status."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    code = f"import os\nif os.fork() == 0:\n    exec({burn!r})\n    os._exit(0)\nexec({burn!r})\nos.wait()\n"
    r = run(Policy(isolate_pids=True), code)
    assert r.success, r.stderr
    assert 0.5 <= r.cpu_time < 5, r.cpu_time


def test_the_metadata_guard_resolves_names_in_the_sandboxs_view(tmp_path):
    """chmod & co. are done on behalf under fs_writable: absolute names are walked from the child's root, so
    /proc/<n> there is the sandbox's process n, never the supervisor's or a host process's."""
    (tmp_path / "f").write_text("")
    code = f"""
import os
os.chmod({str(tmp_path / "f")!r}, 0o600)
print(oct(os.stat({str(tmp_path / "f")!r}).st_mode & 0o777))
for p in ("/etc/hostname", "/proc/1/status", "/proc/self/status"):
    try:
        os.chmod(p, 0o600)
        print(p, "changed")
    except OSError as e:
        print(p, e.errno in (1, 2, 13, 30))
"""
    r = run(Policy(isolate_pids=True, fs_readable=["/usr", "/lib", "/lib64", "/etc", "/proc"],
                   fs_writable=[str(tmp_path)]), code)
    assert r.stdout.decode().splitlines() == ["0o600", "/etc/hostname True", "/proc/1/status True",
                                              "/proc/self/status True"], r.stderr


def test_where_the_kernel_refuses_the_namespaces_the_plan_falls_back_to_the_supervised_mode():
    """Inside a sandbox (its filter refuses new namespaces) the probe says no, and isolate_pids is supervised."""
    root = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    code = ("import sys; sys.path[:0] = [%r]\n"
            "from sandlock_core._native import lib\n"
            "from sandlock_core import Policy\n"
            "from sandlock_core.plan import Plan\n"
            "print(lib.sl_pidns_probe() != 0, Plan(Policy(isolate_pids=True)).pidns)\n") % root
    r = Sandbox(Policy()).run([sys.executable, "-c", code])
    assert r.stdout == b"True False\n", r.stderr


def test_a_refused_namespace_at_run_time_falls_back_to_the_supervised_mode():
    """The probe passed but the kernel refuses the run's namespaces (here: inside a sandbox whose filter
    refuses them, the probe's answer forced): the run is made again with the supervised isolate_pids."""
    root = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    code = ("import sys; sys.path[:0] = [%r]\n"
            "from sandlock_core import plan, Policy, Sandbox\n"
            "plan._pidns_ok[:] = [True]\n"
            "sb = Sandbox(Policy(isolate_pids=True))\n"
            "before = sb._plan.pidns\n"
            "r = sb.run(['/bin/true'])\n"
            "print(before, sb._plan.pidns, 'CLONE_NEWPID' in (r.error or ''))\n") % root
    r = Sandbox(Policy()).run([sys.executable, "-c", code])
    # the supervised retry then fails on its own (nested under another supervisor), not at the namespace
    assert r.stdout == b"True False False\n", (r.stdout, r.stderr)
