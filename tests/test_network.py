"""Network confinement end to end: net_allow_hosts (on-behalf connect/sends, virtual /etc/hosts) and port_remap.

Only loopback addresses are used: 127.0.0.1 (localhost) is the allowed host, 127.0.0.2/127.0.0.3 are "another
address". Real servers (http.server, redis-server) and real clients (curl, urllib, redis-benchmark).
"""
import errno
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from sandlock_core import Policy, Sandbox
from support import run_as_nobody

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SANDLOCK = os.path.join(os.path.dirname(sys.executable), "sandlock")


def py(code: str) -> list[str]:
    return [PY, "-I", "-S", "-c", textwrap.dedent(code)]


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.server.server_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_servers():
    """Real HTTP servers on 127.0.0.1 and 127.0.0.2, same port: {ip: port}."""
    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    port = first.server_address[1]
    servers = [first, http.server.ThreadingHTTPServer(("127.0.0.2", port), _Quiet)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield port
    for s in servers:
        s.shutdown()
        s.server_close()


def _errnos(sb: Sandbox, code: str) -> list[str]:
    res = sb.run(py(code), timeout=30)
    assert res.exit_code == 0, res
    return res.stdout.decode().split()


CONNECT = """
import errno, socket
def try_(fam, addr):
    s = socket.socket(fam)
    s.settimeout(5)
    try:
        s.connect(addr)
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
"""


# ---- net_allow_hosts -------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reaches_allowed_host_and_is_refused_elsewhere(http_servers):
    port = http_servers
    sb = Sandbox(Policy(net_allow_hosts=["localhost"]), record_denials=True)
    ok = sb.run(["curl", "-sS", "--noproxy", "*", f"http://localhost:{port}/"], timeout=30)
    assert ok.exit_code == 0 and ok.stdout == b"hello from 127.0.0.1", ok
    bad = sb.run(["curl", "-sS", "--noproxy", "*", f"http://127.0.0.2:{port}/"], timeout=30)
    assert bad.exit_code == 7, bad  # curl: couldn't connect
    assert any(d.syscall == "connect" and d.errno == errno.ECONNREFUSED and d.detail == f"127.0.0.2:{port}"
               for d in bad.denials), bad.denials


def test_urllib_allowed_and_refused_with_exact_errno(http_servers):
    port = http_servers
    code = f"""
    import errno, urllib.request, urllib.error
    print(urllib.request.urlopen("http://localhost:{port}/", timeout=10).read().decode().replace(" ", "_"))
    try:
        urllib.request.urlopen("http://127.0.0.2:{port}/", timeout=10)
        print("REACHED")
    except urllib.error.URLError as e:
        print(errno.errorcode[e.reason.errno])
    """
    assert _errnos(Sandbox(Policy(net_allow_hosts=["localhost"])), code) == ["hello_from_127.0.0.1", "ECONNREFUSED"]


def test_literal_address_and_empty_list(http_servers):
    port = http_servers
    code = CONNECT + f"""
print(try_(socket.AF_INET, ("127.0.0.1", {port})), try_(socket.AF_INET, ("127.0.0.2", {port})),
      try_(socket.AF_INET, ("127.0.0.3", {port})))
"""
    assert _errnos(Sandbox(Policy(net_allow_hosts=["127.0.0.2"])), code) == ["OK", "OK", "ECONNREFUSED"]
    # an empty list: localhost only
    assert _errnos(Sandbox(Policy(net_allow_hosts=[])), code) == ["OK", "ECONNREFUSED", "ECONNREFUSED"]
    # no list at all: unrestricted (the default)
    assert _errnos(Sandbox(Policy()), code) == ["OK", "OK", "ECONNREFUSED"]  # nothing listens on .3


def test_ipv4_mapped_ipv6_is_judged_as_ipv4(http_servers):
    port = http_servers
    code = CONNECT + f"""
print(try_(socket.AF_INET6, ("::ffff:127.0.0.1", {port})), try_(socket.AF_INET6, ("::ffff:127.0.0.2", {port})))
"""
    assert _errnos(Sandbox(Policy(net_allow_hosts=["127.0.0.1"])), code) == ["OK", "ECONNREFUSED"]


def test_nonblocking_connect_passes_einprogress_through(http_servers):
    port = http_servers
    code = f"""
    import errno, select, socket
    for ip in ("127.0.0.1", "127.0.0.2"):
        s = socket.socket()
        s.setblocking(False)
        r = s.connect_ex((ip, {port}))
        if r == errno.EINPROGRESS:
            select.select([], [s], [], 5)
            r = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        print(errno.errorcode.get(r, "OK"))
    """
    assert _errnos(Sandbox(Policy(net_allow_hosts=["localhost"])), code) == ["OK", "ECONNREFUSED"]


def test_net_connect_ports_still_apply_to_on_behalf_connects(http_servers):
    port = http_servers
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        code = CONNECT + f"""
print(try_(socket.AF_INET, ("127.0.0.1", {port})), try_(socket.AF_INET, ("127.0.0.1", {other.getsockname()[1]})))
"""
        sb = Sandbox(Policy(net_allow_hosts=["localhost"], net_connect=[port]))
        assert _errnos(sb, code) == ["OK", "EACCES"]
    finally:
        other.close()


def test_udp_sendto_and_sendmsg_are_judged_on_behalf():
    rx = {}
    for ip in ("127.0.0.1", "127.0.0.2"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.settimeout(5)
        rx[ip] = s
    code = "import errno, socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    for ip, s in rx.items():
        addr = (ip, s.getsockname()[1])
        code += textwrap.dedent(f"""
        for how in ("sendto", "sendmsg"):
            try:
                u.sendto(b"to-{ip}", {addr!r}) if how == "sendto" else u.sendmsg([b"to-", b"{ip}"], [], 0, {addr!r})
                print("OK")
            except OSError as e:
                print(errno.errorcode[e.errno])
        """)
    try:
        res = Sandbox(Policy(net_allow_hosts=["localhost"])).run(py(code), timeout=30)
        assert res.stdout.split() == [b"OK", b"OK", b"ECONNREFUSED", b"ECONNREFUSED"], res
        assert rx["127.0.0.1"].recv(100) == b"to-127.0.0.1" and rx["127.0.0.1"].recv(100) == b"to-127.0.0.1"
        rx["127.0.0.2"].settimeout(0.2)
        with pytest.raises(socket.timeout):
            rx["127.0.0.2"].recv(100)
    finally:
        for s in rx.values():
            s.close()


def test_sendmmsg_is_judged_on_behalf():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    code = f"""
    import ctypes, errno, socket, struct
    libc = ctypes.CDLL(None, use_errno=True)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for ip in ("127.0.0.1", "127.0.0.2"):
        name = ctypes.create_string_buffer(socket.inet_aton(ip).join([struct.pack("=HH", 2, socket.htons({port})), bytes(8)]))
        data = [ctypes.create_string_buffer(b"m%d" % i) for i in range(2)]
        iov = [ctypes.create_string_buffer(struct.pack("=QQ", ctypes.addressof(d), 2)) for d in data]
        vec = b"".join(struct.pack("=QI4xQQQQi4xI4x", ctypes.addressof(name), 16, ctypes.addressof(v), 1, 0, 0, 0, 0)
                       for v in iov)
        buf = ctypes.create_string_buffer(vec, len(vec))
        r = libc.sendmmsg(u.fileno(), buf, 2, 0)
        lens = struct.unpack_from("=I", buf.raw, 56)[0], struct.unpack_from("=I", buf.raw, 120)[0]
        print(r if r >= 0 else errno.errorcode[ctypes.get_errno()], *lens)
    """
    try:
        res = Sandbox(Policy(net_allow_hosts=["localhost"])).run(py(code), timeout=30)
        assert res.stdout.split() == [b"2", b"2", b"2", b"ECONNREFUSED", b"0", b"0"], res
        assert (rx.recv(10), rx.recv(10)) == (b"m0", b"m1")
    finally:
        rx.close()


def test_unix_sockets_still_work_under_an_allowlist(tmp_path):
    path = tmp_path / "srv.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def serve():
        for _ in range(2):
            c, _ = srv.accept()
            c.sendall(b"unix-ok")
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    code = f"""
    import os, socket
    for p in ({str(path)!r}, "srv.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(p)
        print(s.recv(10).decode())
    """
    try:
        res = Sandbox(Policy(net_allow_hosts=[], cwd=str(tmp_path))).run(py(code), timeout=30)
        assert res.stdout.split() == [b"unix-ok", b"unix-ok"], res
    finally:
        srv.close()


def test_etc_hosts_is_virtualized():
    code = """
    import socket
    print(open("/etc/hosts").read())
    print("resolved", socket.gethostbyname("localhost"))
    """
    res = Sandbox(Policy(net_allow_hosts=["localhost", "127.0.0.2"])).run(py(code), timeout=30)
    out = res.stdout.decode()
    entries = [line.split() for line in out.splitlines() if line and not line.startswith("#")]
    assert ["127.0.0.1", "localhost"] in entries and "resolved 127.0.0.1" in out, out
    names = {w for e in entries[:-1] for w in e[1:]}
    assert names <= {"localhost", "ip6-localhost", "ip6-loopback", "127.0.0.1"}, out  # nothing else of the host's


# ---- TOCTOU: a thread rewrites the sockaddr while connect is in flight -----------------------------------

FLIP = """
import ctypes, errno, socket, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
port, n = int(sys.argv[1]), int(sys.argv[2])
good = struct.pack("=HH", 2, socket.htons(port)) + socket.inet_aton("127.0.0.1") + bytes(8)
addr = ctypes.create_string_buffer(good, 16)
stop = False
def flip():
    b = 1
    while not stop:
        addr[7] = b  # last byte of sin_addr: 127.0.0.1 <-> 127.0.0.2
        b ^= 3
t = threading.Thread(target=flip); t.start()
ok = refused = 0
for _ in range(n):
    s = socket.socket()
    r = libc.connect(s.fileno(), addr, 16)
    if r == 0:
        ok += 1
    elif ctypes.get_errno() == errno.ECONNREFUSED:
        refused += 1
    s.close()
stop = True; t.join()
print(ok, refused)
"""


def _flip_run(n: int, sandbox_runner) -> tuple[int, int, int]:
    """(ok, refused, connections the forbidden address got)."""
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    port = good.getsockname()[1]
    bad = socket.socket()
    bad.bind(("127.0.0.2", port))
    got = {"good": 0, "bad": 0}
    for s in (good, bad):
        s.listen(4096)
    stop = threading.Event()

    def drain(s, key):
        s.settimeout(0.05)
        while not stop.is_set():
            try:
                c, _ = s.accept()
                got[key] += 1
                c.close()
            except socket.timeout:
                pass
    threads = [threading.Thread(target=drain, args=(good, "good"), daemon=True),
               threading.Thread(target=drain, args=(bad, "bad"), daemon=True)]
    for t in threads:
        t.start()
    try:
        out = sandbox_runner(port, n)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        good.close()
        bad.close()
    ok, refused = map(int, out.split())
    return ok, refused, got["bad"]


def test_flipping_sockaddr_during_connect_never_reaches_the_other_address():
    sb = Sandbox(Policy(net_allow_hosts=["localhost"]))

    def runner(port, n):
        res = sb.run([PY, "-I", "-S", "-c", FLIP, str(port), str(n)], timeout=120)
        assert res.exit_code == 0, res
        return res.stdout.decode()

    ok, refused, bad = _flip_run(1000, runner)
    assert bad == 0
    assert ok + refused == 1000 and ok > 0


def test_flip_and_refusal_unprivileged():
    """The same race, with the host side and the sandbox running as uid 65534."""
    inner = textwrap.dedent(f"""
    import socket, threading, time, errno
    from sandlock_core import Policy, Sandbox
    FLIP = {FLIP!r}
    good = socket.socket(); good.bind(("127.0.0.1", 0)); port = good.getsockname()[1]
    bad = socket.socket(); bad.bind(("127.0.0.2", port))
    good.listen(4096); bad.listen(4096)
    got = {{"bad": 0}}
    stop = threading.Event()
    def drain(s, key):
        s.settimeout(0.05)
        while not stop.is_set():
            try:
                c, _ = s.accept(); got[key] = got.get(key, 0) + 1; c.close()
            except socket.timeout:
                pass
    ts = [threading.Thread(target=drain, args=(good, "good")), threading.Thread(target=drain, args=(bad, "bad"))]
    [t.start() for t in ts]
    sb = Sandbox(Policy(net_allow_hosts=["localhost"]))
    res = sb.run(["/usr/bin/python3", "-I", "-S", "-c", FLIP, str(port), "300"], timeout=120)
    time.sleep(0.3); stop.set(); [t.join() for t in ts]
    ok, refused = map(int, res.stdout.split())
    print("RESULT", ok, refused, got["bad"], ok + refused)
    """)
    r = run_as_nobody(inner, timeout=180)
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+)", r.stdout)
    assert m, (r.stdout, r.stderr)
    ok, refused, bad, total = map(int, m.groups())
    assert bad == 0 and total == 300 and ok > 0


# ---- port_remap ------------------------------------------------------------------------------------------

SERVE_8080 = """
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("served by %s, sockname %s" % (TAG, self.server.socket.getsockname()[1])).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 8080), H)
print("sockname", s.socket.getsockname()[1], flush=True)
s.handle_request()
"""


def _serve_in_sandbox(tag: str):
    sb = Sandbox(Policy(port_remap=True, net_allow_hosts=[]))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", sb.run(py(f"TAG = {tag!r}\n" + SERVE_8080),
                                                                      timeout=60)))
    t.start()
    deadline = time.monotonic() + 30
    while 8080 not in sb.ports() and time.monotonic() < deadline:
        time.sleep(0.02)
    return sb, t, box


def _get_when_listening(url: str) -> str:
    """GET url, retrying while the server has bound (ports() shows it) but not yet called listen()."""
    for _ in range(200):
        try:
            return urllib.request.urlopen(url, timeout=10).read().decode()
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            time.sleep(0.05)
    raise AssertionError(f"{url} never accepted a connection")


def _hold(port: int):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
    except OSError:
        s.close()
        return None  # already taken by someone else: just as good
    return s


def test_two_sandboxes_both_bind_8080_and_the_host_reaches_each():
    holder = _hold(8080)  # the host has 8080 too
    try:
        boxes = [_serve_in_sandbox(tag) for tag in ("A", "B")]
        reals = []
        for (sb, t, box), tag in zip(boxes, ("A", "B")):
            real = sb.ports()[8080]
            reals.append(real)
            body = _get_when_listening(f"http://127.0.0.1:{real}/")
            assert body == f"served by {tag}, sockname 8080"
            t.join(30)
            assert box["res"].stdout.decode().split() == ["sockname", "8080"], box["res"]
        assert len(set(reals)) == 2 and 8080 not in reals
    finally:
        if holder is not None:
            holder.close()


def test_connect_inside_reaches_own_virtual_port_and_proc_net_shows_own_sockets():
    holder = _hold(8080)
    host_listener = socket.socket()
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    host_port = host_listener.getsockname()[1]
    code = """
    import socket
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 8080)); srv.listen()
    c = socket.create_connection(("127.0.0.1", 8080), timeout=5)
    a, _ = srv.accept(); a.sendall(b"inside"); print(c.recv(10).decode())
    print("peer", c.getpeername()[1], "name", srv.getsockname()[1])
    ports = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        ports.append(int(line.split()[1].split(":")[1], 16))
    print("proc", *sorted(set(ports)))
    """
    try:
        sb = Sandbox(Policy(port_remap=True))
        res = sb.run(py(code), timeout=30)
        out = res.stdout.decode().split("\n")
        assert out[0] == "inside", res
        assert out[1] == "peer 8080 name 8080", res
        proc = [int(p) for p in out[2].split()[1:]]
        assert 8080 in proc and host_port not in proc and sb.ports()[8080] not in proc, res
    finally:
        host_listener.close()
        if holder is not None:
            holder.close()


def test_port_remap_respects_net_bind():
    code = """
    import errno, socket
    for p in (8080, 8081):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p)); print("OK")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """
    res = Sandbox(Policy(port_remap=True, net_bind=[8080])).run(py(code), timeout=30)
    assert res.stdout.split() == [b"OK", b"EACCES"], res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_bound_but_not_listening_elsewhere_is_not_shared_with_the_sandbox():
    """Two SO_REUSEADDR sockets may both bind a port nobody listens on yet; the second listen() then fails
    EADDRINUSE, too late to remap. So the sandbox's first bind of a port is exclusive and remaps on conflict."""
    port = _free_port()
    host = socket.socket()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    host.bind(("127.0.0.1", port))            # bound, not listening (another xdist worker, mid-test)
    code = f"""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", {port})); s.listen()
    print("listening", s.getsockname()[1], s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0)
    """
    try:
        sb = Sandbox(Policy(port_remap=True))
        res = sb.run(py(code), timeout=30)
        host.listen()                          # the host's own socket still works: nobody took its port
    finally:
        host.close()
    assert res.stdout.split() == [b"listening", str(port).encode(), b"True"], res
    assert sb.ports()[port] != port


NOT_LISTENING_AS_NOBODY = """
import os, socket
from sandlock_core import Policy, Sandbox
host = socket.socket()
host.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
host.bind(("127.0.0.1", 0))                   # bound, not listening
port = host.getsockname()[1]
code = (
    "import socket\\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\\n"
    f"s.bind(('127.0.0.1', {port})); s.listen()\\n"
    f"print('listening', s.getsockname()[1] == {port})\\n")
sb = Sandbox(Policy(port_remap=True))
r = sb.run([PY, "-I", "-S", "-c", code], timeout=30)
host.listen()
print(os.getuid(), r.stdout.decode().strip(), sb.ports()[port] != port)
"""


def test_port_bound_but_not_listening_elsewhere_is_remapped_as_an_unprivileged_user():
    r = run_as_nobody(f"PY = {PY!r}\n" + NOT_LISTENING_AS_NOBODY)
    assert r.stdout.split() == ["65534", "listening", "True", "True"], r.stdout + r.stderr


def test_virtual_port_rebound_after_the_host_took_its_real_port_gets_a_fresh_one(tmp_path):
    code = f"""
    import errno, os, socket, time
    a = socket.socket(); a.bind(("127.0.0.1", 8080)); a.close()
    open({str(tmp_path / "closed")!r}, "w").close()
    while not os.path.exists({str(tmp_path / "go")!r}):
        time.sleep(0.01)
    b = socket.socket(); b.bind(("127.0.0.1", 8080)); b.listen()
    c = socket.socket()
    try:
        c.bind(("127.0.0.1", 8080)); print("second bind succeeded")
    except OSError as e:
        print("own", errno.errorcode[e.errno])
    print("name", b.getsockname()[1])
    """
    sb = Sandbox(Policy(port_remap=True, fs_writable=[str(tmp_path)], fs_readable=["/usr", "/lib", "/lib64"]))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", sb.run(py(code), timeout=60)))
    t.start()
    holder = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "closed").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        first = sb.ports()[8080]
        holder = socket.socket()               # the host takes the real port the sandbox let go of
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", first))
        holder.listen()
        (tmp_path / "go").touch()
        t.join(60)
    finally:
        if holder is not None:
            holder.close()
    res = box["res"]
    assert res.stdout.decode().split("\n")[:2] == ["own EADDRINUSE", "name 8080"], res
    assert sb.ports()[8080] != first


XDIST_TEST = '''
import os, sys, textwrap, threading, time, urllib.request
from sandlock_core import Policy, Sandbox
PY = {py!r}
SERVE = {serve!r}

def _one(tag):
    sb = Sandbox(Policy(port_remap=True))
    box = {{}}
    t = threading.Thread(target=lambda: box.setdefault("r", sb.run([PY, "-I", "-S", "-c", "TAG=%r\\n" % tag + SERVE], timeout=60)))
    t.start()
    while 8080 not in sb.ports():
        time.sleep(0.02)
    for attempt in range(200):  # ports() shows the port at bind(); listen() follows a moment later
        try:
            body = urllib.request.urlopen("http://127.0.0.1:%d/" % sb.ports()[8080], timeout=10).read().decode()
            break
        except OSError:
            time.sleep(0.05)
    t.join()
    assert body == "served by %s, sockname 8080" % tag
    assert box["r"].stdout.split() == [b"sockname", b"8080"]

def test_a():
    _one("a")

def test_b():
    _one("b")
'''


def test_two_xdist_workers_both_bind_8080(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_two.py").write_text(XDIST_TEST.format(py=PY, serve=SERVE_8080))
    holder = _hold(8080)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                            "-p", "no:sandlock", str(tmp_path / "test_two.py")],
                           capture_output=True, text=True, timeout=180, cwd=tmp_path)
    finally:
        if holder is not None:
            holder.close()
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr


# ---- redis: the command line, served to redis-benchmark on the host ------------------------------

@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                    reason="redis-server/redis-benchmark not installed (apt-get install redis-server)")
def test_redis_under_port_remap_serves_redis_benchmark(tmp_path):
    holder = _hold(6379)  # force a remap
    p = subprocess.Popen([SANDLOCK, "run", "-v", "--port-remap", "--net-bind", "6379", "-r", "/usr", "-r", "/lib",
                          "-r", "/etc", "--", "redis-server", "--port", "6379"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = p.stderr.readline()
        m = re.match(r"sandlock: port 6379/tcp -> (\d+)", line)
        assert m, line
        real = int(m.group(1))
        if holder is not None:
            assert real != 6379
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", real), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        r = subprocess.run(["redis-benchmark", "-p", str(real), "-t", "set,get", "-n", "2000", "-q"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0
        assert re.search(r"SET: [\d.]+ requests per second", r.stdout) and re.search(r"GET: [\d.]+ requests", r.stdout), r
    finally:
        p.terminate()
        p.wait(10)
        if holder is not None:
            holder.close()
