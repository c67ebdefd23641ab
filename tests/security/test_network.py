"""Network tricks against net_allow_hosts (loopback only: 127.0.0.1 allowed, 127.0.0.2 and friends not) and
against isolate_ipc."""
from __future__ import annotations

import errno
import os
import socket
import textwrap

import pytest

from sandlock_core import Policy, Sandbox

from .helpers import py

ALLOW = Policy(net_allow_hosts=["127.0.0.1"])


@pytest.fixture
def listeners():
    """Two TCP listeners on one port: 127.0.0.1 (allowed) and 127.0.0.2 (forbidden)."""
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    port = good.getsockname()[1]
    bad = socket.socket()
    bad.bind(("127.0.0.2", port))
    for s in (good, bad):
        s.listen(128)
        s.setblocking(False)
    yield port, good, bad
    good.close()
    bad.close()


def accepted(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            c, _ = s.accept()
        except BlockingIOError:
            return n
        c.close()
        n += 1


def run_lines(sb, code, *args):
    res = sb.run(py(code, *args), timeout=60)
    assert res.exit_code == 0, res
    return res.stdout.decode().split()


def test_mapped_and_odd_spellings_of_a_forbidden_address():
    """127.0.0.1 and ::1 are always allowed (localhost); 127.0.0.3 is not listed. Every spelling of it is
    refused: plain, v4-mapped IPv6 (two notations), AF_UNSPEC-less sendto on TCP."""
    bad = socket.socket()
    bad.bind(("127.0.0.3", 0))
    bad.listen(16)
    bad.setblocking(False)
    port = bad.getsockname()[1]
    code = f"""
    import errno, socket
    for fam, addr in ((socket.AF_INET, "127.0.0.3"), (socket.AF_INET6, "::ffff:127.0.0.3"),
                      (socket.AF_INET6, "::ffff:7f00:3"), (socket.AF_INET6, "0:0:0:0:0:ffff:7f00:0003")):
        s = socket.socket(fam)
        s.settimeout(5)
        try:
            s.connect((addr, {port})); print("CONNECTED")
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno))
        s.close()
    """
    try:
        out = run_lines(Sandbox(Policy(net_allow_hosts=["127.0.0.2"])), code)
        assert out == ["ECONNREFUSED"] * 4, out
        assert accepted(bad) == 0
    finally:
        bad.close()


def test_tcp_fast_open_sendto_to_a_forbidden_host(listeners):
    """sendto(MSG_FASTOPEN) on an unconnected TCP socket is a connect in disguise."""
    port, good, bad = listeners
    code = f"""
    import errno, socket
    for how in ("sendto", "sendmsg"):
        for ip in ("127.0.0.1", "127.0.0.2"):
            s = socket.socket()
            s.settimeout(5)
            try:
                if how == "sendto":
                    s.sendto(b"tfo", socket.MSG_FASTOPEN, (ip, {port}))
                else:
                    s.sendmsg([b"tfo"], [], socket.MSG_FASTOPEN, (ip, {port}))
                print("SENT")
            except OSError as e:
                print(errno.errorcode.get(e.errno, e.errno))
            s.close()
    """
    out = run_lines(Sandbox(ALLOW), code)
    assert out[1] != "SENT" and out[3] != "SENT", out
    assert accepted(bad) == 0


@pytest.mark.parametrize("with_hosts", [False, True])
def test_tcp_fast_open_cannot_reach_a_port_net_connect_forbids(listeners, with_hosts):
    """Landlock's connect rule is not consulted when sendto/sendmsg(MSG_FASTOPEN) connects: under net_connect
    the filter answers EOPNOTSUPP (TFO off) while connect() keeps its EACCES and allowed ports still work."""
    port, good, bad = listeners
    code = f"""
    import errno, socket
    def attempt(how, p):
        s = socket.socket()
        s.settimeout(5)
        try:
            if how == "connect":
                s.connect(("127.0.0.1", p))
            elif how == "sendto":
                s.sendto(b"tfo", socket.MSG_FASTOPEN, ("127.0.0.1", p))
            else:
                s.sendmsg([b"tfo"], [], socket.MSG_FASTOPEN, ("127.0.0.1", p))
            print("OK")
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno))
        s.close()
    for how in ("connect", "sendto", "sendmsg"):
        attempt(how, {port})
    attempt("connect", {port} + 1 if {port} < 65535 else 1)
    """
    extra = {"net_allow_hosts": ["127.0.0.1"]} if with_hosts else {}
    allowed = port + 1 if port < 65535 else 1
    out = run_lines(Sandbox(Policy(net_connect=[allowed], **extra)), code)
    eopnotsupp = errno.errorcode[errno.EOPNOTSUPP]  # spelled ENOTSUP on Linux (same number)
    assert out == ["EACCES", eopnotsupp, eopnotsupp, "ECONNREFUSED"], out  # the allowed port: refused by nobody
    assert accepted(good) == 0


def test_sendmmsg_vector_mixing_allowed_and_forbidden_destinations():
    rx = {}
    for ip in ("127.0.0.1", "127.0.0.2"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.setblocking(False)
        rx[ip] = s
    dests = [("127.0.0.1", rx["127.0.0.1"].getsockname()[1]), ("127.0.0.2", rx["127.0.0.2"].getsockname()[1])]
    code = f"""
    import ctypes, errno, socket, struct
    libc = ctypes.CDLL(None, use_errno=True)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    keep = []
    vec = b""
    for i, (ip, port) in enumerate({dests!r} * 2):   # allowed, forbidden, allowed, forbidden
        name = ctypes.create_string_buffer(struct.pack("=HH", 2, socket.htons(port)) + socket.inet_aton(ip) + bytes(8))
        data = ctypes.create_string_buffer(b"m%d" % i)
        iov = ctypes.create_string_buffer(struct.pack("=QQ", ctypes.addressof(data), 2))
        keep += [name, data, iov]
        vec += struct.pack("=QI4xQQQQi4xI4x", ctypes.addressof(name), 16, ctypes.addressof(iov), 1, 0, 0, 0, 0)
    buf = ctypes.create_string_buffer(vec, len(vec))
    r = libc.sendmmsg(u.fileno(), buf, 4, 0)
    print(r if r >= 0 else errno.errorcode[ctypes.get_errno()])
    """
    try:
        run_lines(Sandbox(ALLOW), code)
        with pytest.raises(BlockingIOError):
            rx["127.0.0.2"].recv(10)
    finally:
        for s in rx.values():
            s.close()


UDP_FLIP = """
import ctypes, socket, struct, sys, threading
port_ok, port_bad, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
ok = struct.pack("=HH", 2, socket.htons(port_ok)) + socket.inet_aton("127.0.0.1") + bytes(8)
bad = struct.pack("=HH", 2, socket.htons(port_bad)) + socket.inet_aton("127.0.0.2") + bytes(8)
name = ctypes.create_string_buffer(ok, 16)
stop = False
def flip():
    while not stop:
        ctypes.memmove(name, bad, 16)
        ctypes.memmove(name, ok, 16)
t = threading.Thread(target=flip)
t.start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for _ in range(n):
    if libc.sendto(u.fileno(), b"x", 1, 0, name, 16) == 1:
        sent += 1
stop = True
t.join()
print(sent)
"""


def test_flipping_the_udp_destination_during_sendto():
    good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    good.bind(("127.0.0.1", 0))
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad.bind(("127.0.0.2", 0))
    bad.setblocking(False)
    try:
        out = run_lines(Sandbox(ALLOW), UDP_FLIP, str(good.getsockname()[1]), str(bad.getsockname()[1]), "500")
        assert int(out[0]) > 0
        with pytest.raises(BlockingIOError):
            bad.recv(10)
    finally:
        good.close()
        bad.close()


def test_socket_smuggled_over_socketpair_is_still_judged(listeners):
    """A process passes an unconnected socket to a forked sibling over a socketpair (SCM_RIGHTS); whoever
    connects it, the connect is judged."""
    port, good, bad = listeners
    code = f"""
    import errno, os, socket
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        s = socket.socket()
        socket.send_fds(a, [b"s"], [s.fileno()])
        os._exit(0)
    _, fds, _, _ = socket.recv_fds(b, 10, 1)
    os.waitpid(pid, 0)
    s = socket.socket(fileno=fds[0])
    s.settimeout(5)
    for ip in ("127.0.0.2", "127.0.0.1"):
        try:
            s.connect((ip, {port})); print("CONNECTED")
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno))
    """
    out = run_lines(Sandbox(ALLOW), code)
    assert out[0] != "CONNECTED" and out[1] == "CONNECTED", out
    assert accepted(bad) == 0 and accepted(good) == 1


def test_disconnect_with_af_unspec_then_reconnect_elsewhere(listeners):
    """connect(AF_UNSPEC) dissolves a TCP association; the next connect is judged like any other."""
    port, good, bad = listeners
    code = f"""
    import ctypes, errno, socket
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.socket()
    s.settimeout(5)
    s.connect(("127.0.0.1", {port}))
    unspec = ctypes.create_string_buffer(16)
    print("disconnect", libc.connect(s.fileno(), unspec, 16), ctypes.get_errno())
    try:
        s.connect(("127.0.0.2", {port})); print("CONNECTED")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
    """
    out = run_lines(Sandbox(ALLOW), code)
    assert out[-1] != "CONNECTED", out
    assert accepted(bad) == 0


ABSTRACT = """
import errno, socket, sys
for kind, name in ((socket.SOCK_STREAM, sys.argv[1]), (socket.SOCK_DGRAM, sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        if kind == socket.SOCK_STREAM:
            s.connect(b"\\0" + name.encode())
        else:
            s.sendto(b"hello", b"\\0" + name.encode())
        print("REACHED")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
"""


@pytest.mark.parametrize("extra", [{}, {"net_allow_hosts": ["127.0.0.1"]}])
def test_abstract_unix_sockets_outside_are_refused_under_isolate_ipc(extra):
    tag = f"sandlock-sec-{os.getpid()}"
    stream = socket.socket(socket.AF_UNIX)
    stream.bind(b"\0" + tag.encode() + b"-s")
    stream.listen(4)
    stream.setblocking(False)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(b"\0" + tag.encode() + b"-d")
    dgram.setblocking(False)
    try:
        out = run_lines(Sandbox(Policy(isolate_ipc=True, **extra)), ABSTRACT, tag + "-s", tag + "-d")
        assert out == ["EPERM", "EPERM"], out
        assert accepted(stream) == 0
        with pytest.raises(BlockingIOError):
            dgram.recv(10)
        # control: without isolate_ipc both reach
        assert run_lines(Sandbox(Policy(**extra)), ABSTRACT, tag + "-s", tag + "-d") == ["REACHED", "REACHED"]
    finally:
        stream.close()
        dgram.close()


def test_abstract_sockets_inside_the_sandbox_still_work_under_isolate_ipc():
    code = textwrap.dedent("""
    import os, socket
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(b"\\0inner-%d" % os.getpid())
    srv.listen(1)
    if os.fork() == 0:
        c = socket.socket(socket.AF_UNIX); c.connect(b"\\0inner-%d" % os.getppid()); c.send(b"hi"); os._exit(0)
    conn, _ = srv.accept()
    print(conn.recv(10).decode())
    """)
    assert run_lines(Sandbox(Policy(isolate_ipc=True)), code) == ["hi"]
