"""Landlock rulesets against the real kernel: a forked child confines itself and reports errnos."""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import textwrap
import traceback

import pytest

from sandlock_core import landlock as ll
from sandlock_core.errors import ConfinementError, LandlockUnavailableError, PolicyError
from support import run_as_nobody

ABI = ll.abi_version()
pytestmark = pytest.mark.skipif(ABI < 1, reason="Landlock is not available")
needs = lambda n: pytest.mark.skipif(ABI < n, reason=f"needs Landlock ABI {n}")  # noqa: E731


# ---- child harness ----

def attempt(fn) -> int:
    """0 when ``fn()`` works, else its errno (-1 for a non-OSError)."""
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno or -1
    except Exception:
        return -1


def in_confined_child(info_or_kwargs, checks: dict) -> dict:
    """Fork; the child applies the ruleset (``RulesetInfo``, or kwargs for ``build_ruleset`` built *in the
    child*), runs every check and sends ``{name: errno}`` back through a pipe. Always ``os._exit``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: nothing below may import (the filesystem may be closed off)
        code = 1
        try:
            os.close(r)
            if isinstance(info_or_kwargs, dict):
                info = ll.build_ruleset(**info_or_kwargs)
            else:
                info = info_or_kwargs
            ll.confine_self(info)
            out = {name: attempt(fn) for name, fn in checks.items()}
            os.write(w, json.dumps(out).encode())
            code = 0
        except BaseException:
            try:
                os.write(w, ("ERROR " + traceback.format_exc()).encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks).decode()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, data
    return json.loads(data)


def run_confined(checks: dict, **kwargs) -> dict:
    """Build in the parent (as the sandbox does), confine the child, close the parent's copy."""
    info = ll.build_ruleset(**kwargs)
    try:
        assert info.fd >= 0
        return in_confined_child(info, checks)
    finally:
        info.close()


def read(path):
    return lambda: open(path, "rb").close()


def write(path):
    def fn():
        with open(path, "ab") as f:
            f.write(b"x")
    return fn


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_bind(port):
    def fn():
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        finally:
            s.close()
    return fn


def tcp_connect(port):
    def fn():
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        finally:
            s.close()
    return fn


def unix_connect(addr):
    def fn():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(addr)
        finally:
            s.close()
    return fn


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("ro")
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "file").write_text("rw")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    (tmp_path / "single.txt").write_text("1")
    (tmp_path / "other.txt").write_text("2")
    return tmp_path


# ---- rights, pure ----

def test_rights_per_abi():
    assert ll.handled_fs(0) == 0
    assert ll.handled_fs(1) == (1 << 13) - 1
    assert ll.handled_fs(2) == ll.handled_fs(1) | ll.REFER
    assert ll.handled_fs(3) == ll.handled_fs(4) == (1 << 15) - 1
    assert ll.handled_fs(5) == ll.handled_fs(6) == ll.handled_fs(7) == (1 << 16) - 1
    assert ll.READ_RIGHTS == ll.EXECUTE | ll.READ_FILE | ll.READ_DIR
    assert ll.write_rights(7) == ll.handled_fs(7)
    assert ll.rights_for(ll.write_rights(7), is_dir=False) == (
        ll.EXECUTE | ll.WRITE_FILE | ll.READ_FILE | ll.TRUNCATE | ll.IOCTL_DEV)
    assert ll.rights_for(ll.write_rights(7), is_dir=True) == ll.write_rights(7)
    assert (ll.NET_BIND_TCP, ll.NET_CONNECT_TCP) == (1, 2)
    assert (ll.SCOPE_ABSTRACT_UNIX_SOCKET, ll.SCOPE_SIGNAL) == (1, 2)
    assert (ll.RESTRICT_SELF_LOG_SAME_EXEC_OFF, ll.RESTRICT_SELF_LOG_NEW_EXEC_ON,
            ll.RESTRICT_SELF_LOG_SUBDOMAINS_OFF) == (1, 2, 4)


def test_abi_version_matches_kernel():
    from sandlock_core import _sys
    assert ll.abi_version() == _sys.landlock_abi_version()


def test_describe_features():
    rows = ll.describe_features(7)
    assert len(rows) == 7 and all(ok for _, ok, _ in rows)
    names = [n for n, _, _ in rows]
    for word in ("filesystem", "REFER", "TRUNCATE", "TCP", "IOCTL_DEV", "scopes", "audit"):
        assert any(word in n for n in names), word
    by_name = {n: ok for n, ok, _ in ll.describe_features(3)}
    assert by_name["Landlock TRUNCATE"] and not by_name["Landlock TCP ports"]
    assert not any(ok for _, ok, _ in ll.describe_features(0))


# ---- filesystem ----

def test_fs_read_write_rules(tree):
    ro, rw, out = tree / "ro", tree / "rw", tree / "outside"

    def create_unlink():
        p = rw / "new"
        with open(p, "wb") as f:
            f.write(b"data")
        os.unlink(p)

    def mkdir_rmdir():
        os.mkdir(rw / "d")
        os.rmdir(rw / "d")

    res = run_confined({
        "read_outside": read(out / "secret"),
        "list_outside": lambda: os.listdir(out),
        "read_inside": read(ro / "file"),
        "list_inside": lambda: os.listdir(ro),
        "write_readonly": write(ro / "file"),
        "create_readonly": lambda: os.close(os.open(ro / "new", os.O_CREAT | os.O_WRONLY, 0o600)),
        "unlink_readonly": lambda: os.unlink(ro / "file"),
        "create_unlink_writable": create_unlink,
        "mkdir_rmdir_writable": mkdir_rmdir,
        "write_writable": write(rw / "file"),
        "truncate_readonly": lambda: os.truncate(ro / "file", 0),
    }, readable=[ro], writable=[rw])
    assert res == {
        "read_outside": errno.EACCES, "list_outside": errno.EACCES,
        "read_inside": 0, "list_inside": 0,
        "write_readonly": errno.EACCES, "create_readonly": errno.EACCES, "unlink_readonly": errno.EACCES,
        "create_unlink_writable": 0, "mkdir_rmdir_writable": 0, "write_writable": 0,
        "truncate_readonly": errno.EACCES,
    }
    assert (ro / "file").read_text() == "ro"


def test_single_file_rules(tree):
    (tree / "wfile").write_text("")
    res = run_confined({
        "read_single": read(tree / "single.txt"),
        "read_sibling": read(tree / "other.txt"),
        "write_single": write(tree / "single.txt"),
        "write_wfile": write(tree / "wfile"),
        "truncate_wfile": lambda: os.truncate(tree / "wfile", 0),
        "list_parent": lambda: os.listdir(tree),
    }, readable=[tree / "single.txt"], writable=[tree / "wfile"])
    assert res == {"read_single": 0, "read_sibling": errno.EACCES, "write_single": errno.EACCES,
                   "write_wfile": 0, "truncate_wfile": 0, "list_parent": errno.EACCES}


def test_path_both_readable_and_writable_gets_write(tree):
    res = run_confined({"write": write(tree / "rw" / "file"), "read": read(tree / "rw" / "file")},
                       readable=[tree / "rw"], writable=[tree / "rw"])
    assert res == {"write": 0, "read": 0}
    res = run_confined({"write": write(tree / "single.txt")},
                       writable=[tree / "single.txt"], readable=[tree / "single.txt"])
    assert res == {"write": 0}


def test_fifo_path_does_not_block(tree):
    fifo = tree / "fifo"
    os.mkfifo(fifo)
    info = ll.build_ruleset(readable=[fifo, tree / "ro"])  # O_PATH: no open for reading, no hang
    info.close()


def test_built_in_child_too(tree):
    res = in_confined_child({"readable": [tree / "ro"]},
                            {"in": read(tree / "ro" / "file"), "out": read(tree / "outside" / "secret")})
    assert res == {"in": 0, "out": errno.EACCES}


def test_nonexistent_path_is_policy_error(tree):
    with pytest.raises(PolicyError, match=r"fs_readable: .*nope.* does not exist"):
        ll.build_ruleset(readable=[tree / "nope"])
    with pytest.raises(PolicyError, match=r"fs_writable: .*nope.* does not exist"):
        ll.build_ruleset(readable=[tree / "ro"], writable=[tree / "nope"])
    # also on a kernel that could not enforce it
    with pytest.raises(PolicyError, match="does not exist"):
        ll.build_ruleset(readable=[tree / "nope"], abi=0, best_effort=True)


def test_bad_port_is_policy_error():
    with pytest.raises(PolicyError, match="net_bind"):
        ll.build_ruleset(bind_ports=[70000])
    with pytest.raises(PolicyError, match="net_connect"):
        ll.build_ruleset(connect_ports=[-1])


def test_fd_is_cloexec_and_closes(tree):
    info = ll.build_ruleset(readable=[tree])
    fd = info.fd
    assert not os.get_inheritable(fd)
    info.close()
    assert info.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    info.close()  # idempotent


# ---- TCP ----

@needs(4)
def test_tcp_bind_ports():
    allowed, other = free_port(), free_port()
    while other == allowed:
        other = free_port()
    listener = socket.create_server(("127.0.0.1", 0))  # connect stays unrestricted with only net_bind
    try:
        lport = listener.getsockname()[1]
        info = ll.build_ruleset(bind_ports=[allowed])
        assert info.handled_net == ll.NET_BIND_TCP and info.handled_fs == 0
        res = in_confined_child(info, {"allowed": tcp_bind(allowed), "other": tcp_bind(other),
                                       "ephemeral": tcp_bind(0), "connect": tcp_connect(lport),
                                       "read_fs": read("/etc/hostname")})
        info.close()
    finally:
        listener.close()
    assert res == {"allowed": 0, "other": errno.EACCES, "ephemeral": errno.EACCES, "connect": 0, "read_fs": 0}


@needs(4)
def test_tcp_bind_port_zero_rule():
    res = run_confined({"ephemeral": tcp_bind(0)}, bind_ports=[0])
    assert res == {"ephemeral": 0}


@needs(4)
def test_tcp_connect_ports():
    a = socket.create_server(("127.0.0.1", 0))
    b = socket.create_server(("127.0.0.1", 0))
    try:
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        res = run_confined({"allowed": tcp_connect(pa), "other": tcp_connect(pb), "bind": tcp_bind(0)},
                           connect_ports=[pa])
    finally:
        a.close()
        b.close()
    # "other" has a listener: EACCES is Landlock, not ECONNREFUSED. Bind stays unrestricted.
    assert res == {"allowed": 0, "other": errno.EACCES, "bind": 0}


# ---- scopes ----

@needs(6)
def test_isolate_signals():
    res = run_confined({"kill_parent": lambda: os.kill(os.getppid(), 0),
                        "kill_self": lambda: os.kill(os.getpid(), 0)}, isolate_signals=True)
    assert res == {"kill_parent": errno.EPERM, "kill_self": 0}


@needs(6)
def test_isolate_ipc(tmp_path):
    abstract = f"\0sandlock-test-{os.getpid()}"
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    p = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.bind(abstract)
        a.listen(4)
        p.bind(str(tmp_path / "sock"))
        p.listen(4)
        checks = {"abstract": unix_connect(abstract), "pathname": unix_connect(str(tmp_path / "sock")),
                  "kill_parent": lambda: os.kill(os.getppid(), 0)}
        res = run_confined(checks, isolate_ipc=True)
        plain = in_confined_child(ll.build_ruleset(), {"abstract": unix_connect(abstract)})
    finally:
        a.close()
        p.close()
    assert res == {"abstract": errno.EPERM, "pathname": 0, "kill_parent": 0}
    assert plain == {"abstract": 0}  # nothing handled: fd -1, only NO_NEW_PRIVS


# ---- ABI gating ----

def test_error_names_missing_abi():
    with pytest.raises(LandlockUnavailableError) as ei:
        ll.build_ruleset(bind_ports=[8080], abi=3)
    assert str(ei.value) == "net_bind needs Landlock ABI 4 (TCP port rules, Linux 6.7); this kernel has ABI 3"
    with pytest.raises(LandlockUnavailableError, match=r"isolate_signals needs Landlock ABI 6 .*Linux 6\.12.*"
                                                       r"this kernel has ABI 5"):
        ll.build_ruleset(isolate_signals=True, abi=5)
    with pytest.raises(LandlockUnavailableError, match=r"net_connect needs Landlock ABI 4.*isolate_ipc needs "
                                                       r"Landlock ABI 6.*this kernel has ABI 2"):
        ll.build_ruleset(connect_ports=[1], isolate_ipc=True, abi=2)
    with pytest.raises(LandlockUnavailableError, match=r"fs_readable needs Landlock ABI 1.*no Landlock"):
        ll.build_ruleset(readable=["/usr"], abi=0)
    assert issubclass(LandlockUnavailableError, ConfinementError)


def test_best_effort_records_missing(tree):
    info = ll.build_ruleset(readable=[tree / "ro"], bind_ports=[8080], isolate_ipc=True, isolate_signals=True,
                            best_effort=True, abi=3)
    try:
        assert info.abi == 3 and info.fd >= 0
        assert info.handled_fs == ll.handled_fs(3) and info.handled_net == 0 and info.scoped == 0
        assert len(info.missing) == 3
        assert "net_bind" in info.missing[0] and "ABI 4" in info.missing[0] and "ABI 3" in info.missing[0]
        assert "isolate_ipc" in info.missing[1] and "ABI 6" in info.missing[1]
        assert "isolate_signals" in info.missing[2]
        res = in_confined_child(info, {"in": read(tree / "ro" / "file"), "out": read(tree / "outside" / "secret"),
                                       "kill_parent": lambda: os.kill(os.getppid(), 0)})
        assert res == {"in": 0, "out": errno.EACCES, "kill_parent": 0}
    finally:
        info.close()
    info = ll.build_ruleset(readable=[tree / "ro"], abi=0, best_effort=True)
    assert info.fd == -1 and len(info.missing) == 1 and "no Landlock" in info.missing[0]
    # nothing asked that the ABI has: nothing to enforce, no error
    info = ll.build_ruleset(bind_ports=[1], best_effort=True, abi=3)
    assert info.fd == -1 and info.missing


@pytest.mark.parametrize("abi", range(1, 8))
def test_every_abi_layout_works_on_this_kernel(tree, abi):
    if abi > ABI:
        pytest.skip(f"kernel has ABI {ABI}")
    kwargs = {"readable": [tree / "ro"], "writable": [tree / "rw"]}
    if abi >= 4:
        kwargs["bind_ports"] = [free_port()]
    if abi >= 6:
        kwargs["isolate_signals"] = True
    info = ll.build_ruleset(abi=abi, **kwargs)
    assert info.handled_fs == ll.handled_fs(abi)
    checks = {"in": read(tree / "ro" / "file"), "out": read(tree / "outside" / "secret"),
              "write": write(tree / "rw" / "file"), "write_ro": write(tree / "ro" / "file")}
    expect = {"in": 0, "out": errno.EACCES, "write": 0, "write_ro": errno.EACCES}
    if abi >= 4:
        checks["bind_other"] = tcp_bind(0)
        expect["bind_other"] = errno.EACCES
    if abi >= 6:
        checks["kill_parent"] = lambda: os.kill(os.getppid(), 0)
        expect["kill_parent"] = errno.EPERM
    try:
        assert in_confined_child(info, checks) == expect
    finally:
        info.close()


def test_restrict_flags_gated(tree):
    info = ll.build_ruleset(readable=[tree], abi=6)
    try:
        with pytest.raises(LandlockUnavailableError, match="ABI 7"):
            ll.confine_self(info, ll.RESTRICT_SELF_LOG_SUBDOMAINS_OFF)
    finally:
        info.close()


@needs(7)
def test_restrict_flags_accepted(tree):
    info = ll.build_ruleset(readable=[tree / "ro"])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ll.confine_self(info, ll.RESTRICT_SELF_LOG_SAME_EXEC_OFF | ll.RESTRICT_SELF_LOG_SUBDOMAINS_OFF)
            code = 0 if attempt(read(tree / "outside" / "secret")) == errno.EACCES else 2
        finally:
            os._exit(code)
    os.close(r)
    os.close(w)
    info.close()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# ---- unprivileged ----

NOBODY_CODE = textwrap.dedent("""
    import errno, json, os, sys
    from sandlock_core import landlock as ll
    tmp = sys.argv[1]
    assert os.getuid() == 65534
    info = ll.build_ruleset(readable=["/usr"], writable=[tmp], isolate_signals=ll.abi_version() >= 6)
    def attempt(fn):
        try:
            fn(); return 0
        except OSError as e:
            return e.errno
    def create():
        p = os.path.join(tmp, "n")
        with open(p, "w") as f: f.write("x")
        os.unlink(p)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ll.confine_self(info)
            res = {"read_usr": attempt(lambda: os.listdir("/usr")),
                   "read_etc": attempt(lambda: open("/etc/hostname").close()),
                   "list_etc": attempt(lambda: os.listdir("/etc")),
                   "write_tmp": attempt(create),
                   "kill_parent": attempt(lambda: os.kill(os.getppid(), 0)),
                   "kill_self": attempt(lambda: os.kill(os.getpid(), 0))}
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        except BaseException as e:
            os.write(w, repr(e).encode())
            os._exit(1)
    os.close(w)
    data = os.read(r, 65536)
    os.waitpid(pid, 0)
    print(data.decode())
""")


def test_as_nobody():
    # pytest's tmp_path lives under a 0700 directory; nobody needs a world-writable dir it can reach
    with tempfile.TemporaryDirectory(prefix="sandlock-ll-", dir="/tmp") as d:
        os.chmod(d, 0o777)
        proc = run_as_nobody(NOBODY_CODE, d)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    expect = {"read_usr": 0, "read_etc": errno.EACCES, "list_etc": errno.EACCES, "write_tmp": 0,
              "kill_parent": errno.EPERM if ABI >= 6 else 0, "kill_self": 0}
    assert res == expect, proc.stdout
