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

from support import run_as_nobody
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


def _userns() -> str | None:
    if not os.path.exists("/proc/self/ns/user"):
        return "no user namespaces in this kernel"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if f.read().strip() == "0":
                return "user.max_user_namespaces is 0"
    except OSError:
        pass
    return None


needs_userns = pytest.mark.skipif(_userns() is not None, reason=str(_userns()))


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
                c.sendto(b"y", target); c.sendmsg([b"z"], [], 0, target); out.append(srv.recv(1).decode() + srv.recv(1).decode())
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
