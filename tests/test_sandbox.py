"""Sandbox.run end to end: real programs, real denials (exact errno), real allowed cases."""
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sandlock_core import ExitReason, Policy, PolicyError, Sandbox
from support import run_as_nobody, still_running

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SYSTEM_RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]


def py(code: str) -> list[str]:
    """argv running ``code`` with the system interpreter, isolated from site and the environment."""
    return [PY, "-I", "-S", "-c", textwrap.dedent(code)]


def errno_of(sb: Sandbox, code: str) -> str:
    """Run code that performs one operation; returns 'OK' or the errno name it failed with."""
    wrapped = "import errno, os, sys\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ") + \
              "\n    print('OK')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
    res = sb.run([PY, "-I", "-S", "-c", wrapped])
    assert res.exit_code == 0, res
    return res.stdout.decode().strip()


# ---- running and results -------------------------------------------------------------------------------

def test_run_captures_output_and_exit_code():
    res = Sandbox(Policy()).run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.stdout, res.stderr, res.exit_code, res.success) == (b"out\n", b"err\n", 3, False)
    assert res.reason is ExitReason.EXITED


def test_stdin_bytes_are_fed_and_default_stdin_is_closed():
    sb = Sandbox(Policy())
    assert sb.run(["cat"], stdin=b"x" * 200000).stdout == b"x" * 200000
    assert sb.run(["cat"]).stdout == b""


def test_command_not_found_is_127_with_message():
    res = Sandbox(Policy()).run(["/nonexistent/program"])
    assert res.exit_code == 127
    assert res.reason is ExitReason.SETUP_FAILED
    assert "execve" in res.error and "No such file" in res.error


def test_death_by_signal():
    res = Sandbox(Policy()).run(["sh", "-c", "kill -SEGV $$"])
    assert res.signal == signal.SIGSEGV and res.exit_code == -signal.SIGSEGV
    assert res.reason is ExitReason.SIGNALED


def test_timeout_kills_the_whole_sandbox_including_detached_grandchildren(tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    res = Sandbox(Policy()).run(["sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 60"],
                                timeout=1)
    assert res.reason is ExitReason.TIMEOUT
    assert time.monotonic() - start < 10
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_background_processes_do_not_outlive_the_run(tmp_path):
    pidfile = tmp_path / "pid"
    res = Sandbox(Policy()).run(["sh", "-c", f"(setsid sleep 60 & echo $! > {pidfile}) ; exit 0"])
    assert res.exit_code == 0
    pid = int(pidfile.read_text())
    time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_env_clean_env_and_cwd(tmp_path):
    res = Sandbox(Policy(clean_env=True, env={"FOO": "bar"}, cwd=str(tmp_path))).run(
        ["sh", "-c", "echo $FOO; pwd; env | cut -d= -f1 | sort | tr '\\n' ' '"])
    out = res.stdout.decode().splitlines()
    assert out[0] == "bar" and out[1] == str(tmp_path)
    assert set(out[2].split()) <= {"FOO", "PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG", "PWD", "SHLVL", "_"}


def test_inherited_fds_are_closed():
    r, w = os.pipe()  # not close-on-exec
    os.set_inheritable(w, True)
    try:
        res = Sandbox(Policy()).run(["ls", "/proc/self/fd"])
        fds = sorted(int(x) for x in res.stdout.split())
        assert fds == [0, 1, 2, 3]  # 3 is ls's own directory fd
    finally:
        os.close(r)
        os.close(w)


def test_max_open_files_sets_rlimit():
    res = Sandbox(Policy(max_open_files=37)).run(["sh", "-c", "ulimit -n"])
    assert res.stdout == b"37\n"


def test_no_coredump_and_no_randomize_memory():
    res = Sandbox(Policy(no_coredump=True, no_randomize_memory=True)).run(
        ["sh", "-c", "ulimit -c; cat /proc/self/personality"])
    core, pers = res.stdout.decode().split()
    assert core == "0" and int(pers, 16) & 0x0040000


# ---- filesystem (Landlock) -----------------------------------------------------------------------------

@pytest.fixture
def fs_sandbox(tmp_path):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    secret = tmp_path / "secret"
    for d in (ro, rw, secret):
        d.mkdir()
    (ro / "f").write_text("ro")
    (secret / "f").write_text("secret")
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(ro)], fs_writable=[str(rw)]))
    yield sb, ro, rw, secret
    sb.close()


def test_read_outside_the_allowed_tree_is_eacces(fs_sandbox):
    sb, ro, rw, secret = fs_sandbox
    assert errno_of(sb, f"open({str(secret / 'f')!r}).read()") == "EACCES"
    assert errno_of(sb, f"os.listdir({str(secret)!r})") == "EACCES"
    assert errno_of(sb, f"open({str(ro / 'f')!r}).read()") == "OK"


def test_write_to_read_only_path_is_eacces_and_writable_works(fs_sandbox):
    sb, ro, rw, secret = fs_sandbox
    assert errno_of(sb, f"open({str(ro / 'f')!r}, 'w')") == "EACCES"
    assert errno_of(sb, f"open({str(ro / 'new')!r}, 'w')") == "EACCES"
    assert errno_of(sb, f"open({str(rw / 'new')!r}, 'w').write('x'); os.unlink({str(rw / 'new')!r})") == "OK"


def test_nonexistent_policy_path_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="fs_readable"):
        Sandbox(Policy(fs_readable=[str(tmp_path / "missing")]))


# ---- fs_denied ------------------------------------------------------------------------------------------

@pytest.fixture
def deny_tree(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    (tree / "secret").write_text("s3cret")
    (tree / "private").mkdir()
    (tree / "private" / "key").write_text("k")
    os.symlink(tree / "secret", tree / "link-to-secret")
    os.link(tree / "secret", tree / "hardlink-to-secret")
    os.symlink(tree / "private", tree / "link-to-private")
    return tree


def test_fs_denied_file_dir_symlink_and_hard_link(deny_tree):
    t = deny_tree
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(t)], fs_denied=[str(t / "secret"), str(t / "private")]))
    assert errno_of(sb, f"print(open({str(t / 'ok')!r}).read(), end=' ')") == "fine OK"
    for victim in ("secret", "link-to-secret", "hardlink-to-secret", "private/key", "link-to-private/key"):
        assert errno_of(sb, f"open({str(t / victim)!r}).read()") == "EACCES", victim
    assert errno_of(sb, f"os.listdir({str(t / 'private')!r})") == "EACCES"
    res = sb.run(["cat", str(t / "secret")])
    assert res.exit_code != 0 and b"Permission denied" in res.stderr
    assert any(d.detail.endswith("secret") for d in res.denials)


def test_fs_denied_relative_paths_and_dirfd(deny_tree):
    t = deny_tree
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(t)], fs_denied=[str(t / "secret")], cwd=str(t)))
    assert errno_of(sb, "open('secret')") == "EACCES"
    assert errno_of(sb, "open('./private/../secret')") == "EACCES"
    assert errno_of(sb, f"d = os.open({str(t)!r}, os.O_RDONLY); os.open('secret', os.O_RDONLY, dir_fd=d)") == "EACCES"
    assert errno_of(sb, "print(open('ok').read(), end=' ')") == "fine OK"


def test_fs_denied_does_not_grant_what_landlock_refuses(deny_tree, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("x")
    t = deny_tree
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(t)], fs_denied=[str(t / "secret")]))
    # The supervisor opens on behalf of the child, but on a thread confined like the child: still EACCES.
    assert errno_of(sb, f"open({str(outside)!r})") == "EACCES"
    assert errno_of(sb, f"open({str(t / 'ok')!r}, 'w')") == "EACCES"


def test_fs_denied_exec_and_unlink(deny_tree, tmp_path):
    t = deny_tree
    tool = t / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    sb = Sandbox(Policy(fs_writable=[str(t)], fs_readable=SYSTEM_RO, fs_denied=[str(tool), str(t / "secret")]))
    res = sb.run([str(tool)])
    assert res.exit_code == 127 and "Permission denied" in res.error
    assert errno_of(sb, f"os.unlink({str(t / 'secret')!r})") == "EACCES"
    assert errno_of(sb, f"os.rename({str(t / 'secret')!r}, {str(t / 'moved')!r})") == "EACCES"
    assert errno_of(sb, f"os.unlink({str(t / 'ok')!r})") == "OK"


def test_fs_denied_fifo_does_not_block_the_supervisor(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=[str(tmp_path), "/dev/null"],
                        fs_denied=[str(tmp_path / "nope")]))
    # The reader blocks in open() until the writer arrives; both go through the supervisor.
    res = sb.run(["sh", "-c", f"cat {fifo} & echo through > {fifo}; wait"], timeout=20)
    assert res.stdout == b"through\n"


# ---- seccomp --------------------------------------------------------------------------------------------

BLOCKED_PROBE = """
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
from sandlock_core import syscalls
bad = []
for name in syscalls.DEFAULT_BLOCKLIST:
    nr = syscalls.number(name)
    if nr is None:
        continue
    r = libc.syscall(nr, -1, -1, -1, -1, -1, -1)
    e = ctypes.get_errno()
    if not (r == -1 and e == errno.EPERM):
        bad.append((name, r, errno.errorcode.get(e, e)))
print(bad)
"""


def test_each_blocklisted_syscall_is_eperm():
    code = "import sys; sys.path[:0] = %r\n" % ([os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))],)
    res = Sandbox(Policy()).run([PY, "-I", "-c", code + BLOCKED_PROBE])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == b"[]\n"


CLONE3_NEWUSER = """
import ctypes, errno, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
args = struct.pack('=11Q', 0x10000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0)  # CLONE_NEWUSER, exit_signal SIGCHLD
buf = ctypes.create_string_buffer(args)
r = libc.syscall(435, buf, len(args))
print(errno.errorcode.get(ctypes.get_errno()) if r < 0 else ('child' if r == 0 else 'parent'))
"""


def test_clone3_with_newuser_is_refused_and_clone_newuser_too():
    sb = Sandbox(Policy())
    assert sb.run(py(CLONE3_NEWUSER)).stdout == b"ENOSYS\n"
    assert sb.run(["unshare", "-U", "true"]).exit_code != 0
    # ordinary process creation still works (glibc falls back from clone3 to clone)
    assert sb.run(["sh", "-c", "true & wait; echo ok"]).stdout == b"ok\n"


def test_allowlist_mode_denies_an_unlisted_syscall(tmp_path):
    src = tmp_path / "p.c"
    src.write_text("#include <stdio.h>\n#include <unistd.h>\n#include <errno.h>\n#include <sys/syscall.h>\n"
                   "int main(){long r=syscall(SYS_getppid); printf(\"%ld %d\\n\", r, errno); return 0;}\n")
    exe = tmp_path / "p"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(exe), str(src)], check=True)
    base = ["execve", "brk", "arch_prctl", "set_tid_address", "set_robust_list", "rseq", "prlimit64", "uname",
            "readlink", "getrandom", "mprotect", "newfstatat", "fstat", "write", "exit_group", "ioctl"]
    res = Sandbox(Policy(allow_syscalls=base)).run([str(exe)])
    assert res.stdout.decode().split() == ["-1", str(errno.EPERM)], res
    res = Sandbox(Policy(allow_syscalls=base + ["getppid"])).run([str(exe)])
    assert res.stdout.decode().split()[0] != "-1"


def test_deny_syscalls_replaces_the_blocklist():
    code = "import os; os.getcwd()"
    res = Sandbox(Policy(deny_syscalls=["getcwd"])).run(py(code))
    assert b"PermissionError" in res.stderr
    assert Sandbox(Policy()).run(py(code)).exit_code == 0
    res = Sandbox(Policy(deny_syscalls=["getcwd"])).run(["unshare", "-U", "true"])
    assert res.exit_code == 0  # unshare is no longer blocked once the list is replaced


def test_raw_sockets_and_udp():
    code = """
    import socket
    for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
        try:
            socket.socket(socket.AF_INET, kind, 1 if kind == socket.SOCK_RAW else 0).close(); print('ok')
        except OSError as e:
            print(e.errno)
    """
    assert Sandbox(Policy()).run(py(code)).stdout.split() == [str(errno.EPERM).encode(), b"ok"]
    assert Sandbox(Policy(no_udp=True)).run(py(code)).stdout.split() == [str(errno.EPERM).encode()] * 2


# ---- network ports and scopes (Landlock) ---------------------------------------------------------------

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_tcp_bind_and_connect_port_rules():
    allowed, other = _free_port(), _free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    target = srv.getsockname()[1]
    code = f"""
    import socket
    def attempt(fn):
        s = socket.socket()
        try:
            fn(s); print('ok')
        except OSError as e:
            print(e.errno)
        finally:
            s.close()
    attempt(lambda s: s.bind(('127.0.0.1', {allowed})))
    attempt(lambda s: s.bind(('127.0.0.1', {other})))
    attempt(lambda s: s.connect(('127.0.0.1', {target})))
    attempt(lambda s: s.connect(('127.0.0.1', {other})))
    """
    try:
        res = Sandbox(Policy(net_bind=[allowed], net_connect=[target])).run(py(code))
    finally:
        srv.close()
    assert res.stdout.decode().split() == ["ok", str(errno.EACCES), "ok", str(errno.EACCES)]


def test_isolate_signals_and_ipc():
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0sandlock-test-" + str(os.getpid()).encode())
    abstract.listen()
    code = f"""
    import os, socket
    try:
        os.kill({os.getpid()}, 0); print('ok')
    except OSError as e:
        print(e.errno)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(b'\\0sandlock-test-{os.getpid()}'); print('ok')
    except OSError as e:
        print(e.errno)
    os.kill(os.getpid(), 0); print('self-ok')
    """
    try:
        open_res = Sandbox(Policy()).run(py(code))
        scoped = Sandbox(Policy(isolate_signals=True, isolate_ipc=True)).run(py(code))
    finally:
        abstract.close()
    assert open_res.stdout.split() == [b"ok", b"ok", b"self-ok"]
    assert scoped.stdout.split() == [str(errno.EPERM).encode(), str(errno.EPERM).encode(), b"self-ok"]


# ---- the same, unprivileged ----------------------------------------------------------------------------

NOBODY_SUITE = r"""
import errno, os, sys, tempfile, textwrap
from sandlock_core import Policy, Sandbox
RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
d = tempfile.mkdtemp()
os.makedirs(d + "/tree/private")
open(d + "/tree/ok", "w").write("fine")
open(d + "/tree/secret", "w").write("s")
os.symlink(d + "/tree/secret", d + "/tree/link")
def probe(sb, code):
    w = "import errno, os\ntry:\n    " + code + "\n    print('OK')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    return sb.run([sys.executable, "-I", "-S", "-c", w]).stdout.decode().strip()
sb = Sandbox(Policy(fs_readable=RO + [d + "/tree"], fs_writable=[d + "/rw"] if os.makedirs(d + "/rw") is None else [],
                    fs_denied=[d + "/tree/secret"], isolate_signals=True))
out = [probe(sb, "open('/root/.bashrc')" if os.path.exists('/root') else "open('/proc/1/environ')"),
       probe(sb, f"open({d!r} + '/tree/ok').read()"),
       probe(sb, f"open({d!r} + '/tree/link').read()"),
       probe(sb, f"open({d!r} + '/tree/ok', 'w')"),
       probe(sb, f"open({d!r} + '/rw/x', 'w').write('1')"),
       probe(sb, "os.kill(1, 0)"),
       probe(Sandbox(Policy()), "os.unshare(0x10000000) if hasattr(os, 'unshare') else (_ for _ in ()).throw(OSError(errno.EPERM, ''))")]
print(os.getuid(), out)
"""


def test_confinement_as_an_unprivileged_user():
    res = run_as_nobody(NOBODY_SUITE)
    assert res.returncode == 0, res.stderr
    uid, _, rest = res.stdout.strip().partition(" ")
    assert uid == "65534"
    assert eval(rest) == ["EACCES", "OK", "EACCES", "EACCES", "OK", "EPERM", "EPERM"]


# ---- supervisor hygiene --------------------------------------------------------------------------------

def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_leaked_fds_threads_or_zombies_after_1000_runs(tmp_path):
    import threading
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_denied=[str(tmp_path / "x")]))  # with a supervisor
    sb.run(["true"])

    def children() -> set:  # this process's children, zombies included (other tests may have left some)
        out = set()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(f.read().split())
        return out

    before = children()
    fds, threads = _fd_count(), threading.active_count()
    for _ in range(1000):
        assert sb.run(["true"]).exit_code == 0
    sb.close()
    assert _fd_count() <= fds
    assert threading.active_count() <= threads
    assert children() <= before


def test_handler_exception_fails_closed():
    def broken(sup, n):
        raise RuntimeError("boom")
    res = Sandbox(Policy(), handlers={"getcwd": broken}).run(py("import os; os.getcwd()"))
    assert b"PermissionError" in res.stderr
    assert res.denials and res.denials[0].detail == "internal error: boom"


def test_supervisor_death_kills_the_sandbox(tmp_path):
    pidfile = tmp_path / "pids"
    script = f"""
import sys; sys.path[:0] = {[os.path.dirname(os.path.dirname(__import__('sandlock_core').__file__))]!r}
from sandlock_core import Policy, Sandbox
Sandbox(Policy()).run(["sh", "-c", "setsid sleep 60 & echo $! >> {pidfile}; sleep 60 & echo $! >> {pidfile}; sleep 60"])
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(pidfile.read_text().split() if pidfile.exists() else []) < 2:
        time.sleep(0.05)
    pids = [int(p) for p in pidfile.read_text().split()]
    proc.kill()
    proc.wait()
    assert not still_running(pids, 1.0)


# ---- architecture escapes (x86_64) ---------------------------------------------------------------------

ARCH_ESCAPES = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long r;
    if (!strcmp(argv[1], "int80")) {            /* i386 getpid through the 32-bit entry */
        __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20) : "memory");
    } else if (!strcmp(argv[1], "x32")) {       /* x32 ABI: getpid | __X32_SYSCALL_BIT */
        r = syscall(39 | 0x40000000);
    } else {
        r = syscall(SYS_getpid);
    }
    printf("survived %ld\n", r);
    return 0;
}
"""


@pytest.fixture(scope="module")
def arch_escapes(tmp_path_factory):
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("the int 0x80 and x32 entries exist on x86_64 only")
    d = tmp_path_factory.mktemp("arch")
    (d / "a.c").write_text(ARCH_ESCAPES)
    subprocess.run(["gcc", "-O1", "-o", str(d / "a"), str(d / "a.c")], check=True)
    return str(d / "a")


@pytest.mark.parametrize("entry", ["int80", "x32"])
def test_foreign_syscall_entries_are_killed(arch_escapes, entry):
    assert subprocess.run([arch_escapes, "native"], capture_output=True).returncode == 0
    res = Sandbox(Policy()).run([arch_escapes, entry])
    assert res.signal == signal.SIGSYS, res
    assert b"survived" not in res.stdout


# ---- confine() and the notified set --------------------------------------------------------------------

def test_confine_applies_to_the_calling_process(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            from sandlock_core import confine
            confine(Policy(fs_readable=SYSTEM_RO))
            out = []
            for path in (str(secret), "/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd"):
                try:
                    open(path).read()
                    out.append("OK")
                except OSError as e:
                    out.append(errno.errorcode[e.errno])
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.unshare(0x10000000)  # CLONE_NEWUSER: in the default blocklist
            out.append("OK" if rc == 0 else errno.errorcode[ctypes.get_errno()])
            os.write(w, " ".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    got = os.read(r, 100).decode().split()
    assert got == ["EACCES", "OK", "EPERM"]


def test_confine_refuses_policies_that_need_a_supervisor(tmp_path):
    from sandlock_core import confine
    with pytest.raises(PolicyError, match="supervisor"):
        confine(Policy(fs_readable=SYSTEM_RO, fs_denied=[str(tmp_path)]))


def test_a_plain_filesystem_policy_notifies_nothing():
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=["/tmp"], net_bind=[8080], isolate_ipc=True))
    # Only the metadata syscalls (chmod, chown, utimes, xattrs: Landlock has no right for them) are notified,
    # and chattr's ioctls through an argument filter (ioctl itself is not in the notify set).
    from sandlock_core.metadata import Metadata
    from sandlock_core import seccomp, syscalls
    guard = set(Metadata(sb._plan.policy).handlers()) | {"ioctl"}
    assert set(sb._plan.names[nr] for nr in sb._plan.handlers) <= guard
    assert syscalls.number("ioctl") not in sb._plan.spec.notify
    assert sb._plan.spec.fileattr_ioctl == seccomp.SECCOMP_RET_USER_NOTIF
    res = sb.run(["sh", "-c", "ls /usr >/dev/null; echo done"])
    assert res.stdout == b"done\n" and res.notifications == 0
    # A read-only policy needs no supervisor at all: metadata changes are refused in the filter.
    ro = Sandbox(Policy(fs_readable=SYSTEM_RO, net_bind=[8080], isolate_ipc=True, isolate_signals=True))
    assert not ro._plan.want_listener and ro._plan.handlers == {}
    res = ro.run(["sh", "-c", "ls /usr >/dev/null; chmod 644 /etc/hostname 2>/dev/null || echo refused"])
    assert res.stdout == b"refused\n" and res.notifications == 0


DOCKER_LIKE = r"""
import sys, os
from sandlock_core import Policy, Sandbox, _sys, seccomp, syscalls
# What Docker's default profile does: pidfd_getfd fails with EPERM for this process and its children.
spec = seccomp.deny_only_spec(deny=frozenset(), errno_actions=((syscalls.number("pidfd_getfd"), 1),))
_sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
_sys.seccomp_set_filter(seccomp.build_filter(spec), _sys.SECCOMP_FILTER_FLAG_TSYNC)
from sandlock_core.check import rows
print(dict((name, ok) for name, ok, _ in rows())["pidfd_getfd"])
d = sys.argv[1]
ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
res = Sandbox(Policy(fs_readable=ro + [d], fs_denied=[d + "/secret"])).run(["cat", d + "/ok", d + "/secret"])
print(res.stdout.decode().strip(), res.exit_code, b"Permission denied" in res.stderr)
"""


def test_listener_handoff_works_where_pidfd_getfd_is_blocked(tmp_path):
    (tmp_path / "ok").write_text("fine")
    (tmp_path / "secret").write_text("s")
    res = subprocess.run([sys.executable, "-c", DOCKER_LIKE, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["False", "fine 1 True"]


def test_record_denials_reports_blocklisted_syscalls():
    res = Sandbox(Policy(), record_denials=True).run(["unshare", "-U", "true"])
    assert res.exit_code != 0
    assert any(d.syscall == "unshare" and d.errno == errno.EPERM for d in res.denials)


def test_nested_supervised_sandbox_fails_with_a_clear_error(tmp_path):
    inner = (f"import sys; sys.path[:0] = {[os.path.dirname(os.path.dirname(__import__('sandlock_core').__file__))]!r}\n"
             "from sandlock_core import Policy, Sandbox\n"
             f"r = Sandbox(Policy(fs_denied=[{str(tmp_path / 'x')!r}])).run(['true'])\n"
             "print(r.exit_code, r.error)\n")
    res = Sandbox(Policy(fs_denied=[str(tmp_path / "y")])).run([sys.executable, "-c", inner])
    code, _, msg = res.stdout.decode().partition(" ")
    assert code == "127" and "already runs under a sandlock supervisor" in msg


def test_run_function_applies_the_policy_environment(tmp_path):
    out = tmp_path / "env"
    def body():
        out.write_text(os.environ.get("FOO", "-") + " " + os.environ.get("SECRET_TOKEN", "-"))
    os.environ["SECRET_TOKEN"] = "x"
    try:
        res = Sandbox(Policy(clean_env=True, env={"FOO": "bar"})).run_function(body)
    finally:
        del os.environ["SECRET_TOKEN"]
    assert res.exit_code == 0 and out.read_text() == "bar -"


def test_run_function_kills_what_the_function_left_running(tmp_path):
    """A background child, and a setsid'd double-forked daemon: both die with the run (the reaper kills what the
    root left behind), whose code is the function's."""
    pids = tmp_path / "pids"

    def body():
        subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! >> {pids}; (setsid sh -c 'sleep 300 & echo $! >> "
                                      f"{pids}') & wait"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 2:
            time.sleep(0.02)
        return 3

    res = Sandbox(Policy()).run_function(body, timeout=60)
    assert (res.exit_code, res.reason) == (3, ExitReason.EXITED), res
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    alive = still_running(started, 0)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == []


def test_fs_denied_holes_in_read_only_trees_are_enforced_by_the_kernel(deny_tree):
    """Without any supervisor, the carved Landlock ruleset alone refuses the hole (read and exec)."""
    from sandlock_core import landlock
    t = deny_tree
    tool = t / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    info = landlock.build_ruleset(readable=[*SYSTEM_RO, str(t)], carve=[str(t / "secret"), str(t / "private"),
                                                                       str(tool)])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            landlock.confine_self(info)
            out = []
            for name in ("ok", "secret", "link-to-secret", "hardlink-to-secret", "private/key",
                         "link-to-private/key"):
                try:
                    open(t / name).read()
                    out.append("OK")
                except OSError as e:
                    out.append(errno.errorcode[e.errno])
            try:
                subprocess.run([str(tool)], capture_output=True)
                out.append("exec-OK")
            except PermissionError:
                out.append("exec-EACCES")
            out.append(str(len(os.listdir(t)) > 0))
            os.write(w, " ".join(out).encode())
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    info.close()
    assert os.read(r, 200).decode().split() == ["OK", "EACCES", "EACCES", "EACCES", "EACCES", "EACCES", "exec-EACCES",
                                                    "True"]


def test_nested_writable_sandbox_falls_back_to_refusing_metadata_changes(tmp_path):
    """Inside a supervised sandbox no second listener is allowed; a policy whose only supervised part is the
    metadata guard still runs, with chmod/chown/utimes/xattrs refused in the filter instead."""
    w = tmp_path / "w"
    w.mkdir()
    pkg = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    inner = (f"import sys; sys.path.insert(0, {pkg!r})\n"
             "from sandlock_core import Policy, Sandbox\n"
             f"sb = Sandbox(Policy(fs_readable={SYSTEM_RO!r}, fs_writable=[{str(w)!r}, '/dev/null']))\n"
             f"r = sb.run(['sh', '-c', 'echo hi > {w}/x; cat {w}/x; chmod 600 {w}/x || echo refused'])\n"
             "print(r.exit_code, r.stdout, bool(sb.missing))\n")
    outer = Sandbox(Policy(fs_readable=[*SYSTEM_RO, pkg, str(w)], fs_writable=[str(w), "/dev/null"]))
    res = outer.run([sys.executable, "-c", inner])
    assert res.stdout.decode().strip() == "0 b'hi\\nrefused\\n' True", res


def test_a_handler_on_a_syscall_the_child_makes_before_the_handoff_does_not_deadlock():
    """getpid is called by the confining child before the supervisor exists: it is asked before the filter."""
    seen = []
    res = Sandbox(Policy(), handlers={"getpid": lambda sup, n: seen.append(n.pid)}).run(
        ["sh", "-c", "echo $$"], timeout=30)
    assert res.exit_code == 0 and res.stdout.strip().isdigit()
    assert seen  # the shell's own getpid reached the handler


def test_handlers_on_both_handoff_syscalls_are_refused():
    with pytest.raises(PolicyError, match="write and sendmsg"):
        Sandbox(Policy(), handlers={"write": lambda sup, n: None, "sendmsg": lambda sup, n: None}).run(["true"])


def test_a_handoff_that_never_comes_fails_instead_of_hanging(monkeypatch):
    """The wait for the child's listener is bounded: here the supervisor listens on a socket the child
    cannot reach (as if the child were stuck before the hand-off), and the run ends in an error."""
    from sandlock_core import spawn as _spawn
    monkeypatch.setattr(_spawn, "HANDOFF_TIMEOUT", 0.5)
    real_spawn = _spawn.spawn
    silent = []

    def spawn_with_a_silent_socket(*a, **kw):
        sp = real_spawn(*a, **kw)
        ours, theirs = socket.socketpair()
        silent.append(theirs)  # held open and never written
        os.close(sp.sock)
        sp.sock = ours.detach()
        return sp
    monkeypatch.setattr(_spawn, "spawn", spawn_with_a_silent_socket)
    t = time.monotonic()
    res = Sandbox(Policy(), handlers={"getppid": lambda sup, n: None}).run(["true"], timeout=30)
    assert time.monotonic() - t < 10
    assert res.exit_code != 0 and "confinement" in str(res.error), res


def test_a_supervisor_loop_that_dies_kills_the_sandbox_instead_of_hanging_it():
    """A handler raising BaseException (not Exception) escapes the fail-closed answer and ends the loop: the
    sandbox is killed at once rather than left blocked in a syscall nobody will answer."""
    def boom(sup, n):
        raise SystemExit("boom")
    t = time.monotonic()
    res = Sandbox(Policy(), handlers={"getppid": boom}).run(
        [sys.executable, "-I", "-S", "-c", "import os, time; os.getppid(); time.sleep(60)"], timeout=60)
    assert time.monotonic() - t < 30
    assert res.signal == signal.SIGKILL and res.reason is ExitReason.KILLED, res


def test_a_forked_caller_runs_supervised_sandboxes_after_the_parent_did():
    """Supervisor threads are reused between runs; a child forked from a caller that ran one (multiprocessing's
    fork start method, pytest-xdist) has no such thread and must start its own instead of waiting for it."""
    sb = Sandbox(Policy(isolate_pids=True))
    assert sb.run(["true"]).exit_code == 0  # leaves an idle supervisor thread in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            res = Sandbox(Policy(isolate_pids=True)).run(["cat", "/proc/self/status"], timeout=20)
            os.write(w, b"%d %d" % (res.exit_code, res.notifications > 0))
        finally:
            os._exit(0)
    os.close(w)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.read(r, 64) == b"0 1" and status == 0
    finally:
        os.close(r)


def test_take_denials_gives_each_window_its_own_denials(tmp_path):
    """Sandbox.take_denials() while run_function runs: each window has its own denials (the dedup and the cap
    start again), and Result.denials keeps only what was not taken (the plugin's worker mode)."""
    import threading
    secret = tmp_path / "secret"
    secret.write_text("x")
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO), record_denials=True)
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()

    def body():
        for _ in range(3):
            os.read(go_r, 1)
            try:
                open(secret).close()
            except PermissionError:
                pass
            os.write(ack_w, b"k")
        return 0

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", sb.run_function(body, timeout=30)))
    t.start()
    windows = []
    try:
        for _ in range(2):
            os.write(go_w, b"g")
            assert os.read(ack_r, 1) == b"k"
            windows.append(sb.take_denials())
        os.write(go_w, b"g")
        assert os.read(ack_r, 1) == b"k"
    finally:
        t.join(30)
        for fd in (go_r, go_w, ack_r, ack_w):
            os.close(fd)
        sb.close()
    for w in windows:
        assert [(d.detail, d.count) for d in w] == [(str(secret), 1)], w
    assert [(d.detail, d.count) for d in out["res"].denials] == [(str(secret), 1)]
