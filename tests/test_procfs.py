"""The virtual /proc: num_cpus, meminfo, isolate_pids, sensitive files (see sandlock_core/procfs.py)."""
import errno
import os

import pytest

from sandlock_core import Policy, Sandbox, syscalls
from sandlock_core.plan import Plan
from support import run_as_nobody

PY = ["/usr/bin/python3", "-I", "-S", "-c"]


def run(policy, code, timeout=60):
    return Sandbox(policy).run([*PY, code], timeout=timeout)


# ---- num_cpus ----
def test_nproc_cpu_count_affinity_and_cpuinfo_show_num_cpus():
    sb = Sandbox(Policy(num_cpus=3))
    assert sb.run(["nproc"]).stdout == b"3\n"
    r = sb.run([*PY, "import os; print(os.cpu_count(), len(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(0)))"])
    assert r.stdout == b"3 3 [0, 1, 2]\n"
    r = sb.run(["sh", "-c", "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online"])
    assert r.stdout == b"3\n0-2\n"


def test_sched_getaffinity_with_a_too_small_buffer_is_einval():
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(128)
print(libc.syscall(204, 0, 8, buf), ctypes.get_errno())
print(libc.syscall(204, 0, 128, buf), buf.raw[:24].hex())
"""
    r = Sandbox(Policy(num_cpus=70)).run(["/usr/bin/python3", "-I", "-c", code])
    assert r.stdout.split(b"\n")[0] == f"-1 {errno.EINVAL}".encode()
    assert r.stdout.split(b"\n")[1] == b"16 ffffffffffffffff3f" + b"0" * 30


# ---- meminfo ----
def test_meminfo_reflects_max_memory():
    r = Sandbox(Policy(max_memory="256M")).run(["sh", "-c", "head -3 /proc/meminfo; free -k | head -2"])
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["MemTotal:", "262144", "kB"]
    free = int(lines[1].split()[1])
    assert 200000 < free < 262144 and lines[2].split()[1] == str(free)


def test_virtual_files_are_sealed_memfds_and_read_only():
    code = """
import errno, fcntl, os
fd = os.open("/proc/meminfo", os.O_RDONLY)
print(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), fcntl.fcntl(fd, 1034) & 8 == 8)
try:
    os.open("/proc/meminfo", os.O_RDWR)
except OSError as e:
    print(e.errno)
"""
    r = run(Policy(max_memory="256M"), code)
    assert r.stdout == f"True True\n{errno.EACCES}\n".encode(), r.stderr


# ---- sensitive files ----
SENSITIVE = ["/proc/kcore", "/proc/kallsyms", "/proc/keys", "/proc/sysrq-trigger", "/proc/kmsg", "/sys/firmware",
             "/sys/kernel/security"]


def _sensitive_code(tmp):
    return f"""
import os
link = {tmp!r} + "/lnk"
os.symlink("/proc/kallsyms", link)
os.chdir("/proc")
for p in {SENSITIVE!r} + [link, "kcore", "./self/../kallsyms", "/proc//keys"]:
    try:
        os.close(os.open(p, os.O_RDONLY))
        print(p, "opened")
    except OSError as e:
        print(p, e.errno)
"""


def test_sensitive_files_are_eacces(tmp_path, pid_mode):
    r = run(Policy(isolate_pids=True), _sensitive_code(str(tmp_path)))
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(SENSITIVE) + 4, r.stderr
    for line in lines:
        assert line.endswith(f" {errno.EACCES}"), line


# ---- isolate_pids ----
def test_ps_aux_shows_only_the_sandbox(pid_mode):
    r = Sandbox(Policy(isolate_pids=True)).run(["sh", "-c", "sleep 5 & ps -eo pid,ppid,comm; kill %1"])
    rows = [line.split() for line in r.stdout.decode().splitlines()[1:]]
    pids = {int(row[0]) for row in rows}
    if pid_mode == "namespace":  # pid 1 is the sandbox's own init, the program pid 2
        assert sorted(row[2] for row in rows) == ["ps", "sandlock-init", "sh", "sleep"], r.stdout
        assert ["1", "0", "sandlock-init"] in rows and ["2", "1", "sh"] in rows
    else:
        assert sorted(row[2] for row in rows) == ["ps", "sh", "sleep"], r.stdout
        assert 1 not in pids
    assert os.getpid() not in pids
    r = Sandbox(Policy(isolate_pids=True)).run(["ps", "aux"])
    lines = r.stdout.splitlines()
    assert len(lines) == 2 + (pid_mode == "namespace") and lines[-1].endswith(b"ps aux"), r.stdout


FOREIGN = """
import ctypes, os, sys
host = int(sys.argv[1])
me = os.getpid()
out = []
def attempt(what, fn):
    try:
        fn()
        out.append(f"{what} ok")
    except OSError as e:
        out.append(f"{what} {e.errno}")
attempt("open", lambda: open(f"/proc/{host}/status").read())
attempt("open1", lambda: open("/proc/1/cmdline").read())
attempt("readlink", lambda: os.readlink(f"/proc/{host}/exe"))
attempt("dir", lambda: os.listdir(f"/proc/{host}"))
attempt("self", lambda: open("/proc/self/status").read())
attempt("mypid", lambda: open(f"/proc/{me}/status").read())
attempt("thread-self", lambda: open("/proc/thread-self/stat").read())
attempt("mtab", lambda: open("/etc/mtab").read())
attempt("dotdot", lambda: open(f"/proc/self/../{host}/status").read())
os.symlink(f"/proc/{host}/environ", sys.argv[2] + "/l")
attempt("symlink", lambda: open(sys.argv[2] + "/l").read())
os.chdir("/proc")
attempt("relative", lambda: open(f"{host}/status").read())
d = os.open("/proc", os.O_RDONLY)
attempt("dirfd", lambda: os.close(os.open(f"{host}/stat", os.O_RDONLY, dir_fd=d)))
attempt("affinity", lambda: os.sched_getaffinity(host))
# under a pid namespace the sandbox's own init (pid 1) is listed too
try:
    mine = sorted({me, 1}) if open("/proc/1/comm").read() == "sandlock-init\\n" else [me]
except OSError:
    mine = [me]
listed = {int(x) for x in os.listdir("/proc") if x.isdigit()}
out.append(f"listed {sorted(listed) == mine}")
# the legacy getdents and getdents64, with a buffer that holds a few entries only
libc = ctypes.CDLL(None, use_errno=True)
for nr, off in ((217, 19), (78, 18)):
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    buf = ctypes.create_string_buffer(200)
    names = []
    while True:
        n = libc.syscall(nr, fd, buf, 200)
        if n <= 0:
            break
        raw, i = buf.raw[:n], 0
        while i < n:
            reclen = int.from_bytes(raw[i + 16:i + 18], "little")
            names.append(raw[i + off:i + reclen].split(b"\\0")[0])
            i += reclen
    os.close(fd)
    pids = sorted(int(x) for x in names if x.isdigit())
    out.append(f"getdents{nr} {pids == mine} {b'meminfo' in names}")
print("\\n".join(out))
"""
FOREIGN_EXPECT = [f"open {errno.ENOENT}", f"open1 {errno.ENOENT}", f"readlink {errno.ENOENT}", f"dir {errno.ENOENT}",
                  "self ok", "mypid ok", "thread-self ok", "mtab ok", f"dotdot {errno.ENOENT}",
                  f"symlink {errno.ENOENT}", f"relative {errno.ENOENT}", f"dirfd {errno.ENOENT}",
                  f"affinity {errno.ESRCH}", "listed True", "getdents217 True True", "getdents78 True True"]


def _foreign_expect(pid_mode):
    """/proc/1 is the sandbox's own init under a pid namespace (the host's pid 1 is out of reach either way)."""
    return [("open1 ok" if x.startswith("open1 ") and pid_mode == "namespace" else x) for x in FOREIGN_EXPECT]


def test_foreign_processes_are_hidden_and_refused(tmp_path, pid_mode):
    r = Sandbox(Policy(isolate_pids=True)).run([*PY, FOREIGN, str(os.getpid()), str(tmp_path)], timeout=60)
    assert r.stdout.decode().splitlines() == _foreign_expect(pid_mode), r.stderr


PID_CALLS = """
import ctypes, os, resource, sys, time
NR_TKILL, NR_TGKILL = TKILL, TGKILL
host, victim, host_pgid = (int(x) for x in sys.argv[1:4])
libc = ctypes.CDLL(None, use_errno=True)
def sc(*a):
    if libc.syscall(*a) < 0:
        raise OSError(ctypes.get_errno(), "")
out = []
def attempt(what, fn):
    try:
        fn()
        out.append(f"{what} ok")
    except OSError as e:
        out.append(f"{what} {e.errno}")
me = os.getpid()
kid = os.fork()
if kid == 0:
    time.sleep(30)
    os._exit(0)
for who, pid in (("host", host), ("victim", victim), ("me", me), ("kid", kid)):
    attempt(f"{who} kill0", lambda: os.kill(pid, 0))
    attempt(f"{who} tkill0", lambda: sc(NR_TKILL, pid, 0))
    attempt(f"{who} tgkill0", lambda: sc(NR_TGKILL, pid, pid, 0))
    attempt(f"{who} pidfd", lambda: os.close(os.pidfd_open(pid)))
    attempt(f"{who} getpriority", lambda: os.getpriority(os.PRIO_PROCESS, pid))
    attempt(f"{who} getpgid", lambda: os.getpgid(pid))
    attempt(f"{who} getsid", lambda: os.getsid(pid))
    attempt(f"{who} affinity", lambda: os.sched_getaffinity(pid))
    attempt(f"{who} prlimit", lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE))
    attempt(f"{who} stat", lambda: os.stat(f"/proc/{pid}"))
    attempt(f"{who} access", lambda: os.access(f"/proc/{pid}/status", os.R_OK) or os.stat(f"/proc/{pid}/status"))
    attempt(f"{who} statdir", lambda: os.stat(f"/proc/{pid}/task"))
attempt("victim kill9", lambda: os.kill(victim, 9))
attempt("host group", lambda: os.killpg(host_pgid, 0))
attempt("broadcast", lambda: os.kill(-1, 0))
attempt("own group", lambda: os.killpg(os.getpgid(0), 0))
print("\\n".join(out))
""".replace("TKILL, TGKILL", f'{syscalls.number("tkill")}, {syscalls.number("tgkill")}')
E, S = errno.ESRCH, errno.ENOENT
PID_EXPECT = (
    [f"{who} {x} {E}" for who in ("host", "victim") for x in ("kill0", "tkill0", "tgkill0", "pidfd", "getpriority",
                                                              "getpgid", "getsid", "affinity", "prlimit")]
    + [f"{who} {x} {S}" for who in ("host", "victim") for x in ("stat", "access", "statdir")])
PID_OK = [f"{who} {x} ok" for who in ("me", "kid") for x in ("kill0", "tkill0", "tgkill0", "pidfd", "getpriority",
          "getpgid", "getsid", "affinity", "prlimit", "stat", "access", "statdir")]
PID_TAIL = [f"victim kill9 {E}", f"host group {E}", "broadcast ok", "own group ok"]


def _check_pid_calls(lines):
    rows = {line.rsplit(" ", 1)[0]: line for line in lines}
    got = [rows.get(x.rsplit(" ", 1)[0]) for x in PID_EXPECT + PID_OK + PID_TAIL]
    assert got == PID_EXPECT + PID_OK + PID_TAIL


def test_pid_syscalls_and_proc_names_of_foreign_processes_are_esrch_and_enoent(pid_mode):
    import subprocess
    victim = subprocess.Popen(["sleep", "60"])
    try:
        r = Sandbox(Policy(isolate_pids=True)).run(
            [*PY, PID_CALLS, str(os.getpid()), str(victim.pid), str(os.getpgid(0))], timeout=60)
        _check_pid_calls(r.stdout.decode().splitlines())
        assert victim.poll() is None  # SIGKILL from the sandbox never reached it
    finally:
        victim.kill()
        victim.wait()


def _nobody_mode(lines, pid_mode):
    """The first line a uid-65534 run printed: whether its plan used the pid namespace (as that user)."""
    if lines and lines[0] == "pidns False" and pid_mode == "namespace":
        pytest.skip("uid 65534 gets no user + pid namespace here (the supervised mode ran)")
    assert lines and lines[0] == f"pidns {pid_mode == 'namespace'}", lines
    return lines[1:]


def test_pid_syscalls_as_an_unprivileged_user(pid_mode):
    code = f"""
import os, subprocess
from sandlock_core import Policy, Sandbox
victim = subprocess.Popen(["sleep", "60"])
sb = Sandbox(Policy(isolate_pids=True))
print("pidns", sb._plan.pidns)
r = sb.run(["/usr/bin/python3", "-I", "-S", "-c", {PID_CALLS!r},
            str(os.getppid()), str(victim.pid), str(os.getpgid(0))])
print(r.stdout.decode(), end="")
print("alive", victim.poll() is None)
victim.kill()
"""
    p = run_as_nobody(code)
    lines = _nobody_mode(p.stdout.splitlines(), pid_mode)
    _check_pid_calls(lines)
    assert lines[-1] == "alive True", p.stderr


def test_a_symlink_flipped_between_own_and_foreign_entries_never_opens_the_foreign_one(shared_tmp, pid_mode):
    """The check and the open are one on-behalf step: a thread flipping a link between this process's
    /proc entry and the host's can make an open fail, never return the host's file."""
    code = f"""
import os, sys, threading
host, me, link = sys.argv[1], os.getpid(), {str(shared_tmp / "flip")!r}
stop = False
def flip():
    i = 0
    while not stop:
        tmp = link + ".t"
        os.symlink(f"/proc/{{host if i % 2 else me}}/status", tmp)
        os.replace(tmp, link)
        i += 1
threading.Thread(target=flip, daemon=True).start()
seen = set()
for _ in range(1500):
    try:
        with open(link) as f:
            seen.add([l for l in f if l.startswith("Pid:")][0].split()[1])
    except (OSError, IndexError):
        pass
stop = True
print(sorted(seen))
"""
    r = Sandbox(Policy(isolate_pids=True)).run([*PY, code, str(os.getpid())], timeout=120)
    seen = eval(r.stdout)
    assert str(os.getpid()) not in seen and seen, (r.stdout, r.stderr)


NR_FSTATAT = syscalls.number("newfstatat") or syscalls.number("fstatat64")


def test_ordinary_stat_access_and_open_are_unchanged_under_isolate_pids(tmp_path, pid_mode):
    code = f"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
d = {str(tmp_path)!r}
fd = os.open(d + "/new", os.O_CREAT | os.O_WRONLY, 0o600)
buf = ctypes.create_string_buffer(256)
print(os.stat(d + "/new").st_size, os.fstat(fd).st_mode & 0o777, os.access(d + "/new", os.W_OK),
      libc.syscall({NR_FSTATAT}, fd, None, buf, 0x1000), libc.syscall({NR_FSTATAT}, fd, b"", buf, 0x1000))
for f in (os.stat, os.lstat, lambda p: os.open(p, os.O_RDONLY)):
    try:
        f(d + "/missing")
    except OSError as e:
        print(e.errno)
os.symlink(d + "/new", d + "/lnk")
print(os.lstat(d + "/lnk").st_size == len(d + "/new"), os.stat(d + "/lnk").st_size)
"""
    r = run(Policy(isolate_pids=True), code)
    assert r.stdout.decode().split() == ["0", "384", "True", "0", "0"] + [str(errno.ENOENT)] * 3 + ["True", "0"], \
        r.stderr


def test_the_c_fast_path_answers_as_the_python_handlers_do(tmp_path, pid_mode):
    """Absolute names on the root file system are answered in C (native.c, sl_proc_wait_recv); a second handler
    on the same syscalls sends everything to Python. Both must give the same answers, for names longer than
    the C path's first 256-byte copy too."""
    code = f"""
import os, sys
d, host = {str(tmp_path)!r}, sys.argv[1]
open(d + "/f", "w").close()
os.symlink(f"/proc/{{host}}/status", d + "/to-host")
out = []
for what, fn in (("stat", os.stat), ("lstat", os.lstat), ("access", lambda p: os.access(p, os.R_OK) or 1/0),
                 ("open", lambda p: os.close(os.open(p, os.O_RDONLY)))):
    for p in (d + "/f", d + "/missing", d + "/missing/x", d + "/to-host", f"/proc/{{host}}", "/proc/self/status",
              d + "/../" + os.path.basename(d) + "/f", "f",
              d + "/" + "./" * 150 + "f", d + "/" + "./" * 150 + "missing", "/" + "./" * 150 + f"proc/{{host}}"):
        try:
            os.chdir(d)
            fn(p)
            out.append(f"{{what}} ok")
        except (OSError, ZeroDivisionError) as e:
            out.append(f"{{what}} {{getattr(e, 'errno', 'false')}}")
fd = os.open(d + "/new", os.O_CREAT | os.O_WRONLY)
out.append(f"creat {{os.fstat(fd).st_size}}")
os.mkdir(d + "/many")
for i in range(300):
    open(f"{{d}}/many/{{i}}", "w").close()
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(200)
for target in (d + "/many", d + "/f", None):
    dfd = os.open(target, os.O_RDONLY) if target else 999
    names = 0
    while True:
        got = libc.syscall(NR_GETDENTS64, dfd, buf, 200)
        if got <= 0:
            break
        i = 0
        while i < got:
            names += 1
            i += int.from_bytes(buf.raw[i + 16:i + 18], "little")
    out.append(f"list {{names}} {{got}} {{ctypes.get_errno() if got < 0 else 0}}")
print(" ".join(out))
""".replace("NR_GETDENTS64", str(syscalls.number("getdents64")))
    names = ("stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2", "open", "openat",
             "getdents64")
    fast = Sandbox(Policy(isolate_pids=True)).run([*PY, code, str(os.getpid())])
    import shutil
    os.unlink(tmp_path / "to-host")
    os.unlink(tmp_path / "new")
    shutil.rmtree(tmp_path / "many")
    slow = Sandbox(Policy(isolate_pids=True), handlers={n: (lambda sup, n: None) for n in names}).run(
        [*PY, code, str(os.getpid())])
    assert fast.stdout == slow.stdout and fast.stdout, (fast.stdout, slow.stdout, fast.stderr)
    want = []
    for what in ("stat", "lstat", "access", "open"):
        no = "false" if what == "access" else str(errno.ENOENT)  # os.access answers False
        to_host = "ok" if what == "lstat" else no
        want += [f"{what} {x}" for x in ("ok", no, no, to_host, no, "ok", "ok", "ok", "ok", no, no)]
    lists = ["list 302 0 0", f"list 0 -1 {errno.ENOTDIR}", f"list 0 -1 {errno.EBADF}"]
    assert fast.stdout.decode().split() == " ".join(want + ["creat 0"] + lists).split(), fast.stdout


@pytest.fixture
def shared_tmp():
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="sandlock-procfs-")
    os.chmod(d, 0o777)
    yield __import__("pathlib").Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_isolation_and_sensitive_files_as_an_unprivileged_user(shared_tmp, pid_mode):
    tmp_path = shared_tmp
    code = f"""
import os, sys
from sandlock_core import Policy, Sandbox
sb = Sandbox(Policy(isolate_pids=True))
print("pidns", sb._plan.pidns)
r = sb.run(["/usr/bin/python3", "-I", "-S", "-c", {FOREIGN!r}, str(os.getppid()), {str(tmp_path)!r}])
print(r.stdout.decode(), end="")
r = sb.run(["/usr/bin/python3", "-I", "-S", "-c", {_sensitive_code(str(tmp_path / "s"))!r}])
print(r.stdout.decode(), end="")
"""
    (tmp_path / "s").mkdir(mode=0o777)
    os.chmod(tmp_path / "s", 0o777)
    p = run_as_nobody(code)
    lines = _nobody_mode(p.stdout.splitlines(), pid_mode)
    assert lines[:len(FOREIGN_EXPECT)] == _foreign_expect(pid_mode), p.stderr
    assert len(lines) == len(FOREIGN_EXPECT) + len(SENSITIVE) + 4
    assert all(line.endswith(f" {errno.EACCES}") for line in lines[len(FOREIGN_EXPECT):]), lines


def test_isolate_pids_with_deterministic_dirs_is_sorted_and_filtered(tmp_path, pid_mode):
    for name in ("b", "c", "a"):
        (tmp_path / name).write_text("")
    mine = '["1", str(os.getpid())]' if pid_mode == "namespace" else "[str(os.getpid())]"
    code = f"""
import os
print(os.listdir({str(tmp_path)!r}))
print([x for x in os.listdir("/proc") if x.isdigit()] == {mine}, os.listdir("/proc") == sorted(os.listdir("/proc")))
"""
    r = run(Policy(isolate_pids=True, deterministic_dirs=True), code)
    assert r.stdout == b"['a', 'b', 'c']\nTrue True\n", r.stderr


def test_nothing_is_notified_without_these_fields(monkeypatch):
    assert not Plan(Policy()).want_listener
    names = set(Plan(Policy(num_cpus=2)).names.values())
    assert {"openat", "sched_getaffinity"} <= names and "getdents64" not in names
    monkeypatch.setenv("SANDLOCK_PIDS_SUPERVISED", "1")
    names = set(Plan(Policy(isolate_pids=True)).names.values())
    assert {"openat", "getdents64", "getdents", "readlink", "readlinkat", "newfstatat", "kill"} <= names
