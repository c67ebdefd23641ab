"""On-behalf network operations against the sandbox's own view: AF_UNIX paths in a chroot / overlay sandbox
resolve in the child's root and mounts (never the supervisor's), and policy_fn judges sendmsg/sendmmsg as it
judges sendto. Loopback and unix sockets only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.policy import BranchAction, FsIsolation

from support import run_as_nobody, userns_unavailable
from .helpers import SYSTEM_RO, py

# For each argument "stream:PATH" (connect + write), "dgram:PATH" (sendto) or "msg:PATH" (sendmsg): one line,
# "ok" or "E<errno>". Static, so a root holding only this binary is enough.
UCONN_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        strncpy(a.sun_path, strchr(argv[i], ':') + 1, sizeof a.sun_path - 1);
        int r, s = socket(AF_UNIX, strncmp(argv[i], "stream:", 7) ? SOCK_DGRAM : SOCK_STREAM, 0);
        if (!strncmp(argv[i], "stream:", 7)) {
            r = connect(s, (struct sockaddr *)&a, sizeof a);
            if (r == 0 && write(s, "hi", 2) != 2) r = -1;
        } else if (!strncmp(argv[i], "dgram:", 6)) {
            r = sendto(s, "hi", 2, 0, (struct sockaddr *)&a, sizeof a);
        } else {
            struct iovec iov = { "hi", 2 };
            struct msghdr m = { .msg_name = &a, .msg_namelen = sizeof a, .msg_iov = &iov, .msg_iovlen = 1 };
            r = sendmsg(s, &m, 0);
        }
        close(s);
        if (r < 0) printf("E%d\n", errno); else printf("ok\n");
    }
    return 0;
}
"""


needs_userns = pytest.mark.skipif(userns_unavailable() is not None, reason=str(userns_unavailable()))


@pytest.fixture(scope="module")
def uconn():
    """The static client, in a world-readable directory (the uid 65534 run copies it too)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed for the static AF_UNIX client")
    d = tempfile.mkdtemp(prefix="sandlock-uconn-")
    os.chmod(d, 0o755)
    with open(os.path.join(d, "uconn.c"), "w") as f:
        f.write(UCONN_C)
    r = subprocess.run(["gcc", "-static", "-O1", "-o", d + "/uconn", d + "/uconn.c"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no static C library to link the AF_UNIX client: {r.stderr[-200:]}")
    os.chmod(d + "/uconn", 0o755)
    yield d + "/uconn"
    shutil.rmtree(d, ignore_errors=True)


# The chroot scenario, run in this process and as uid 65534: sockets in the root are reached (absolute, relative
# to the cwd, with ".."); a socket that exists only on the host is not, neither by its host path nor through an
# absolute symlink planted in the root. With net_allow_hosts (every connect/send done on behalf) the answers and
# the deliveries must be the kernel's own, as without it.
CHROOT_SCENARIO = r'''
import json, os, shutil, socket, sys, tempfile, threading
from sandlock_core import Policy, Sandbox

def scenario(uconn):
    base = tempfile.mkdtemp(prefix="sandlock-chroot-unix-")
    os.chmod(base, 0o755)
    root = os.path.join(base, "root")
    os.makedirs(root + "/bin"); os.makedirs(root + "/sub")
    shutil.copy2(uconn, root + "/bin/uconn")
    def listen(path, kind):
        s = socket.socket(socket.AF_UNIX, kind); s.bind(path); os.chmod(path, 0o777); s.settimeout(0.3)
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        return s
    srv = {name: listen(path, kind) for name, path, kind in (
        ("in", root + "/in.sock", socket.SOCK_STREAM), ("in_d", root + "/d.sock", socket.SOCK_DGRAM),
        ("host", base + "/host.sock", socket.SOCK_STREAM), ("host_d", base + "/hostd.sock", socket.SOCK_DGRAM))}
    os.symlink(base + "/host.sock", root + "/link.sock")
    os.symlink(base + "/hostd.sock", root + "/linkd.sock")
    for d, _, _ in os.walk(base):
        os.chmod(d, 0o755)
    args = ["stream:/in.sock", "stream:../in.sock", "dgram:/d.sock", "msg:../d.sock", "msg:/sub/../d.sock",
            "stream:" + base + "/host.sock", "dgram:" + base + "/hostd.sock", "msg:" + base + "/hostd.sock",
            "stream:/link.sock", "dgram:/linkd.sock", "msg:/linkd.sock"]
    out = {}
    for label, kw in (("plain", {}), ("allowlist", {"net_allow_hosts": []})):
        r = Sandbox(Policy(chroot=root, fs_readable=[root], cwd="/sub", **kw)).run(["/bin/uconn", *args], timeout=60)
        got = {}
        for name, s in srv.items():
            n = 0
            while True:
                try:
                    if s.type == socket.SOCK_STREAM:
                        c = s.accept()[0]
                        c.settimeout(5)
                        n += c.recv(10) == b"hi"
                    else:
                        n += s.recv(10) == b"hi"
                except socket.timeout:
                    break
            got[name] = n
        out[label] = [r.exit_code, r.stdout.decode().split(), r.stderr.decode()[-300:], got]
    shutil.rmtree(base, ignore_errors=True)
    return out
'''

ENOENT = "E%d" % 2
CHROOT_EXPECTED = [0, ["ok", "ok", "ok", "ok", "ok"] + [ENOENT] * 6, "", {"in": 2, "in_d": 3, "host": 0, "host_d": 0}]


def _check_chroot(out: dict) -> None:
    assert out["plain"] == CHROOT_EXPECTED, out  # the kernel's own answers
    assert out["allowlist"] == CHROOT_EXPECTED, out  # on behalf: the same, never the host's socket


@needs_userns
def test_chroot_unix_paths_resolve_in_the_sandbox_root(uconn):
    ns: dict = {}
    exec(CHROOT_SCENARIO, ns)
    _check_chroot(ns["scenario"](uconn))


@needs_userns
def test_chroot_unix_paths_resolve_in_the_sandbox_root_unprivileged(uconn):
    r = run_as_nobody(CHROOT_SCENARIO + "\nprint(json.dumps(scenario(sys.argv[1])))", uconn, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_chroot(json.loads(r.stdout))


# A socket bound inside the overlay exists only in the sandbox's mount namespace: its absolute path must reach
# it (before: ENOENT from the host's lower directory) and relative paths keep working.
OVERLAY_CHILD = r"""
import os, socket, sys
w, out = sys.argv[1], []
for kind, name in ((socket.SOCK_STREAM, "s.sock"), (socket.SOCK_DGRAM, "d.sock")):
    srv = socket.socket(socket.AF_UNIX, kind)
    srv.bind(os.path.join(w, name))
    if kind == socket.SOCK_STREAM:
        srv.listen(4)
    for target in (os.path.join(w, name), name):
        try:
            c = socket.socket(socket.AF_UNIX, kind)
            if kind == socket.SOCK_STREAM:
                c.connect(target); c.sendall(b"x"); out.append(srv.accept()[0].recv(1).decode())
            else:
                c.sendto(b"y", target); c.sendmsg([b"z"], [], 0, target)
                out.append(srv.recv(1).decode() + srv.recv(1).decode())
        except OSError as e:
            out.append("E%d" % e.errno)
print(" ".join(out))
"""


@needs_userns
def test_overlay_unix_socket_made_inside_is_reached_by_its_path():
    base = tempfile.mkdtemp(prefix="sandlock-ov-unix-")
    w = os.path.join(base, "w")
    os.mkdir(w)
    try:
        # ABORT: the socket files stay in the discarded upper (a commit does not copy sockets)
        pol = Policy(fs_readable=SYSTEM_RO, workdir=w, cwd=w, fs_isolation=FsIsolation.OVERLAYFS, net_allow_hosts=[],
                     on_exit=BranchAction.ABORT)
        r = Sandbox(pol).run(py(OVERLAY_CHILD, w), timeout=60)
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split() == [b"x", b"x", b"yz", b"yz"], r
        assert not os.path.exists(os.path.join(w, "s.sock"))  # it really lives only in the overlay
    finally:
        shutil.rmtree(base, ignore_errors=True)


# policy_fn: sendmsg and sendmmsg are network events like sendto (done on behalf with the copied msghdr). The child
# sends to A with each call, then a sendmmsg batch A, A, B (cut before B: 2 sent, then B alone), then a nameless
# sendmsg on a UDP socket connected to A, and AF_UNIX: connect by absolute and relative path, SCM_RIGHTS.
PF_CHILD = r"""
import ctypes, errno, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b, upath = ("127.0.0.1", int(sys.argv[1])), ("127.0.0.1", int(sys.argv[2])), sys.argv[3]
def name(addr):
    raw = struct.pack("=HH", 2, socket.htons(addr[1])) + socket.inet_aton(addr[0]) + bytes(8)
    return ctypes.create_string_buffer(raw)
def mmsg(sock, addrs):
    keep, vec = [], b""
    for i, addr in enumerate(addrs):
        nm, data = name(addr), ctypes.create_string_buffer(b"mm%d" % i)
        iov = ctypes.create_string_buffer(struct.pack("=QQ", ctypes.addressof(data), 3))
        keep += [nm, data, iov]
        vec += struct.pack("=QI4xQQQQi4xI4x", ctypes.addressof(nm), 16, ctypes.addressof(iov), 1, 0, 0, 0, 0)
    buf = ctypes.create_string_buffer(vec, len(vec))
    r = libc.sendmmsg(sock.fileno(), buf, len(addrs), 0)
    return r if r >= 0 else "E%d" % ctypes.get_errno()
def attempt(f):
    try:
        r = f()
        return r if isinstance(r, (int, str)) else "ok"
    except OSError as e:
        return "E%d" % e.errno
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
out = [attempt(lambda: u.sendto(b"to", a)), attempt(lambda: u.sendmsg([b"msg"], [], 0, a)),
       attempt(lambda: mmsg(u, [a, a, b])), attempt(lambda: mmsg(u, [b]))]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
out.append(attempt(lambda: c.connect(a)))
out.append(attempt(lambda: c.sendmsg([b"conn"])))
s = socket.socket(socket.AF_UNIX)
out.append(attempt(lambda: s.connect(upath)))
s2 = socket.socket(socket.AF_UNIX)
out.append(attempt(lambda: s2.connect(os.path.basename(upath))))
x, y = socket.socketpair()
r, w = os.pipe()
os.write(w, b"through-fd")
out.append(attempt(lambda: x.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", r))])))
msg, anc, _, _ = y.recvmsg(1, socket.CMSG_SPACE(4))
got = os.read(struct.unpack("=i", anc[0][2][:4])[0], 20).decode() if anc else "no-fd"
out.append(got)
print(" ".join(map(str, out)))
"""

PF_SCENARIO = r'''
import json, os, socket, sys, tempfile, threading
from sandlock_core import Policy, Sandbox

def pf_scenario(child):
    base = tempfile.mkdtemp(prefix="sandlock-pf-msg-")
    os.chmod(base, 0o755)
    upath = os.path.join(base, "u.sock")
    srv = socket.socket(socket.AF_UNIX); srv.bind(upath); srv.listen(8); os.chmod(upath, 0o777)
    rx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in rx:
        s.bind(("127.0.0.1", 0)); s.settimeout(0.5)
    ports = [s.getsockname()[1] for s in rx]
    out = {}
    for label in ("allow", "restricted"):
        seen = []
        def on_event(event, ctx):
            if event.syscall == "execve" and label == "restricted":
                ctx.restrict_network([])
            if event.category == "network":
                seen.append([event.syscall, event.host, event.port, event.denied])
            return 0
        r = Sandbox(Policy(cwd=base), policy_fn=on_event).run(
            ["/usr/bin/python3", "-I", "-S", "-c", child, *map(str, ports), upath],
            timeout=60)
        got = []
        for s in rx:
            while True:
                try:
                    got.append(s.recv(10).decode())
                except socket.timeout:
                    break
        out[label] = [r.exit_code, r.stdout.decode().split(), r.stderr.decode()[-400:], sorted(got), seen]
    for s in (srv, *rx):
        s.close()
    return out, ports
'''

EPERM = "E%d" % 1


def _check_pf(out: dict, ports: list) -> None:
    a, b = ports
    code, stdout, err, got, seen = out["allow"]
    assert code == 0, err
    assert stdout == ["2", "3", "2", "1", "ok", "4", "ok", "ok", "1", "through-fd"], out
    assert got == sorted(["to", "msg", "mm0", "mm1", "mm0", "conn"]), out  # mm0 twice: to A, then to B
    assert ["sendmsg", "127.0.0.1", a, False] in seen and ["sendmmsg", "127.0.0.1", a, False] in seen
    assert ["sendmmsg", "127.0.0.1", b, False] in seen  # the cut-off B was its own event
    assert ["sendmsg", None, None, False] in seen  # the connected socket's message: no destination of its own
    code, stdout, err, got, seen = out["restricted"]
    assert code == 0, err
    # sendto, sendmsg, both sendmmsg and the connect are refused; AF_UNIX and socketpair are not IP destinations
    assert stdout == [EPERM, EPERM, EPERM, EPERM, EPERM, "E89", "ok", "ok", "1", "through-fd"], out
    assert got == [], out  # nothing reached the receivers
    assert ["sendmsg", "127.0.0.1", a, True] in seen and ["sendmmsg", "127.0.0.1", a, True] in seen


def test_policy_fn_judges_sendmsg_and_sendmmsg_like_sendto():
    ns: dict = {}
    exec(PF_SCENARIO, ns)
    _check_pf(*ns["pf_scenario"](PF_CHILD))


def test_policy_fn_judges_sendmsg_and_sendmmsg_unprivileged():
    r = run_as_nobody(PF_SCENARIO + "\nprint(json.dumps(pf_scenario(sys.argv[1])))", PF_CHILD, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_pf(*json.loads(r.stdout))
