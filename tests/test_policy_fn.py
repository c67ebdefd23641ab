"""Dynamic policy (policy_fn): held syscalls, verdicts, context restrictions, time limit."""
from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.policy_fn import verdict

SYS = ["/usr", "/lib", "/lib64", "/bin", "/etc"]


def _policy(tmp_path, **kw):
    return Policy(fs_readable=[*SYS, str(tmp_path)], fs_writable=["/dev/null"], **kw)


def test_verdicts():
    assert verdict(0) == verdict(False) == verdict(None) == (True, 0, False)
    assert verdict(True) == verdict(-1) == (False, errno.EPERM, False)
    assert verdict(errno.EACCES) == (False, errno.EACCES, False)
    assert verdict("audit") == verdict(-2) == (True, 0, True)
    for bad in ("allow", -7, 1.5, object(), [0]):
        assert verdict(bad) == (False, errno.EPERM, False)  # fail closed


def test_blocks_download_tool_while_ls_runs(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("ls /usr >/dev/null && echo ls-ok\ncurl --version >/dev/null 2>&1; echo curl=$?\n")

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv_contains("curl"):
            return True
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["sh", str(script)], timeout=30)
    assert b"ls-ok\n" in r.stdout
    assert b"curl=126" in r.stdout or b"curl=127" in r.stdout
    assert any(d.syscall == "execve" and "curl" in d.detail for d in r.denials)


def test_file_errno_and_audit(tmp_path):
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "open.txt").write_text("o")
    seen = []

    def on_event(event, ctx):
        if event.category == "file" and event.path_contains("/secret"):
            return errno.EACCES
        if event.category == "file" and event.path_contains("open.txt"):
            seen.append(event.path)
            return "audit"
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(
        ["sh", "-c", f"cat {tmp_path}/open.txt; cat {tmp_path}/secret.txt; echo rc=$?"], timeout=30)
    assert r.stdout.startswith(b"o") and b"rc=1" in r.stdout
    assert b"Permission denied" in r.stderr
    assert any(e.path == str(tmp_path / "open.txt") for e in r.audit)
    assert seen == [str(tmp_path / "open.txt")]


def test_restrict_network_after_first_exec(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    state = {"execs": 0}

    def on_event(event, ctx):
        if event.syscall == "execve":
            state["execs"] += 1
            if state["execs"] == 1:
                ctx.restrict_network([])
        return 0

    code = f"import socket; s=socket.socket(); s.connect(('127.0.0.1', {port})); print('connected')"
    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["python3", "-c", code], timeout=30)
    srv.close()
    assert b"connected" not in r.stdout
    assert b"PermissionError" in r.stderr
    # without the restriction the same connect works
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    r = Sandbox(_policy(tmp_path), policy_fn=lambda e, c: 0).run(["python3", "-c", code], timeout=30)
    srv.close()
    assert r.stdout == b"connected\n"


def test_context_methods(tmp_path):
    (tmp_path / "f").write_text("x")

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv and event.argv[0] == "sh":
            ctx.deny_path(str(tmp_path / "f"))
            ctx.restrict_max_memory(1 << 30)
            ctx.restrict_max_processes(10)
            with pytest.raises(PermissionError):
                ctx.restrict_network(["127.0.0.1"]) or ctx.grant_network(["10.0.0.1"])
        return 0

    sb = Sandbox(_policy(tmp_path, max_memory="2G", max_processes=20), policy_fn=on_event)
    r = sb.run(["sh", "-c", f"cat {tmp_path}/f; echo rc=$?"], timeout=30)
    assert b"rc=1" in r.stdout and b"Permission denied" in r.stderr
    assert sb._sup.state["max_memory"] == 1 << 30 and sb._sup.state["max_processes"] == 10


def test_restricting_processes_takes_effect_and_an_uncounted_limit_fails_closed(tmp_path):
    """restrict_max_processes lowers a counted limit for real (forks then fail); where the policy counts no
    processes the call raises, the callback fails and the event is denied: never a silent no-op."""
    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv and event.argv[0] == "sh":
            ctx.restrict_max_processes(1)
        return 0
    code = "(true) && echo forked || echo refused"
    r = Sandbox(_policy(tmp_path, max_processes=20), policy_fn=on_event).run(["sh", "-c", code], timeout=30)
    assert b"forked" not in r.stdout and any("max_processes (1) reached" in str(d) for d in r.denials), r
    uncounted = Sandbox(_policy(tmp_path), policy_fn=on_event)
    r = uncounted.run(["sh", "-c", "echo ran"], timeout=30)
    assert r.exit_code != 0 and b"ran" not in r.stdout, r
    assert any("restrict_max_processes" in e for e in uncounted._sup.errors), uncounted._sup.errors


def test_raising_callback_denies(tmp_path):
    def on_event(event, ctx):
        if event.syscall == "execve":
            raise RuntimeError("bug in callback")
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["true"], timeout=30)
    assert not r.success and r.exit_code == 127


def test_slow_callback_denies_after_limit_others_keep_running(tmp_path):
    """A callback stuck for 10 s on one process's execve is denied at the limit (1 s here); meanwhile another
    process of the same sandbox goes on opening files and exec'ing."""
    script = tmp_path / "s.sh"
    script.write_text(
        "slowcmd_marker() { :; }\n"
        "( exec /bin/echo SLOW ) &\n"
        "i=0; while [ $i -lt 20 ]; do cat /etc/hostname >/dev/null; i=$((i+1)); done; echo fast-done\n"
        "wait; echo waited\n")
    t_fast = {}

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv and "SLOW" in event.argv:
            time.sleep(10)
        if event.syscall == "execve" and event.argv and event.argv[0] == "cat":
            t_fast.setdefault("first", time.monotonic())
        return 0

    start = time.monotonic()
    r = Sandbox(_policy(tmp_path), policy_fn=on_event, policy_fn_timeout=1.0).run(["sh", str(script)], timeout=30)
    took = time.monotonic() - start
    assert b"fast-done" in r.stdout and b"SLOW" not in r.stdout
    assert took < 8
    assert t_fast["first"] - start < 1.0  # the fast process was not held behind the slow callback
    assert any("did not answer" in d.hint for d in r.denials)


def test_readme_policy_fn_shape(tmp_path):
    """The README callback (adapted: no net_allow_hosts) runs; untrusted exec triggers restrictions."""
    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv_contains("curl"):
            return True
        if event.category == "file" and event.path_contains("/secret"):
            return errno.EACCES
        if event.syscall == "execve" and event.path_contains("untrusted"):
            ctx.restrict_network([])
            ctx.deny_path("/etc/shadow")
        if event.category == "file":
            return "audit"
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["python3", "-c", "print('hi')"], timeout=30)
    assert r.stdout == b"hi\n" and len(r.audit) > 0


def test_on_behalf_opens_see_the_childs_proc_self():
    """Opens under policy_fn are done by the supervisor: /proc/self must still name the child."""
    import os as _os
    ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc", "/proc") if _os.path.exists(p)]
    code = ("import os\n"
            "pid = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Pid:')][0]\n"
            "print(pid == str(os.getpid()))\n")
    res = Sandbox(Policy(fs_readable=ro), policy_fn=lambda e, c: 0).run(["/usr/bin/python3", "-I", "-S", "-c", code])
    assert res.stdout == b"True\n", res


FLIP_CHILD = r"""
import ctypes, os, socket, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
port_a, port_b, rounds, marker = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
addr = ctypes.create_string_buffer(16)

def point_at(port):
    ctypes.memmove(addr, struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) +
                   socket.inet_aton("127.0.0.1") + bytes(8), 16)

def flipper(i, done):
    # wait until the callback has seen port A (it appends one byte per approval), then flip to port B
    while os.stat(marker).st_size <= i and not done.is_set():
        pass
    point_at(port_b)

results = {}
for i in range(rounds):
    point_at(port_a)
    s = socket.socket()
    done = threading.Event()
    t = threading.Thread(target=flipper, args=(i, done))
    t.start()
    r = libc.connect(s.fileno(), addr, 16)
    err = 0 if r == 0 else ctypes.get_errno()
    done.set()
    t.join()
    s.close()
    results[err] = results.get(err, 0) + 1
print(results)
"""


def _acceptor(listeners, counts, stop):
    import select
    while not stop.is_set():
        ready, _, _ = select.select(listeners, [], [], 0.05)
        for srv in ready:
            conn, _ = srv.accept()
            counts[srv.getsockname()[1]] += 1
            conn.close()


def test_connect_address_flipped_after_the_check_is_not_used(tmp_path):
    """The callback sees port A and approves; meanwhile another thread of the child rewrites the sockaddr to
    port B. The connect is done on behalf with the copy the callback saw: B never gets a connection."""
    marker = tmp_path / "approved"
    marker.write_bytes(b"")
    listeners = []
    for _ in range(2):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        listeners.append(srv)
    port_a, port_b = (s.getsockname()[1] for s in listeners)
    counts = {port_a: 0, port_b: 0}
    stop = threading.Event()
    acceptor = threading.Thread(target=_acceptor, args=(listeners, counts, stop))
    acceptor.start()

    def on_event(event, ctx):
        if event.syscall != "connect":
            return 0
        if event.port != port_a:
            return True
        with open(marker, "ab") as f:  # tell the flipper the check is done
            f.write(b"x")
        time.sleep(0.003)  # the flip lands before the verdict reaches the kernel
        return 0

    rounds = 300
    try:
        r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(
            ["python3", "-c", FLIP_CHILD, str(port_a), str(port_b), str(rounds), str(marker)], timeout=120)
        deadline = time.monotonic() + 5
        while counts[port_a] < rounds and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        acceptor.join()
        for s in listeners:
            s.close()
    assert r.success, r.stderr
    assert r.stdout.strip() == repr({0: rounds}).encode()
    assert counts == {port_a: rounds, port_b: 0}


ON_BEHALF_CHILD = r"""
import errno, select, socket, sys
port_a, port_udp, port_closed, port_denied = (int(x) for x in sys.argv[1:5])
out = []
s = socket.socket(); s.setblocking(False)                      # non-blocking connect: EINPROGRESS, then done
out.append(errno.errorcode.get(s.connect_ex(("127.0.0.1", port_a)), "0"))
select.select([], [s], [], 10)
out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and s.getpeername()[1] == port_a)
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)            # sendto with an address
out.append(u.sendto(b"hi", ("127.0.0.1", port_udp)))
s = socket.socket()                                             # the kernel's answer comes back
out.append(errno.errorcode.get(s.connect_ex(("127.0.0.1", port_closed)), "0"))
s = socket.socket()                                             # the callback's errno comes back
out.append(errno.errorcode.get(s.connect_ex(("127.0.0.1", port_denied)), "0"))
srv = socket.socket()                                           # bind under port_remap: a busy host port
srv.bind(("127.0.0.1", port_a)); srv.listen(1)
out.append(srv.getsockname()[1] == port_a)
c = socket.create_connection(("127.0.0.1", port_a), timeout=10)  # reaches our listener, not the host's
conn, _ = srv.accept(); c.sendall(b"own"); out.append(conn.recv(3))
print(out)
"""


def test_network_on_behalf_semantics(tmp_path):
    host_a = socket.socket()
    host_a.bind(("127.0.0.1", 0))
    host_a.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused
    ports = [host_a.getsockname()[1], udp.getsockname()[1], closed.getsockname()[1], 1]
    seen = []

    def on_event(event, ctx):
        if event.category == "network":
            seen.append((event.syscall, event.host, event.port))
            if event.port == 1:
                return errno.ECONNABORTED
        return 0

    try:
        r = Sandbox(_policy(tmp_path, port_remap=True), policy_fn=on_event).run(
            ["python3", "-c", ON_BEHALF_CHILD, *map(str, ports)], timeout=60)
        host_a.settimeout(0.5)
        host_conns = 0
        while True:
            try:
                host_a.accept()[0].close()
                host_conns += 1
            except socket.timeout:
                break
        got = udp.recv(16) if select_ready(udp) else b""
    finally:
        for s in (host_a, udp, closed):
            s.close()
    assert r.success, r.stderr
    assert r.stdout.strip() == b"['EINPROGRESS', True, 2, 'ECONNREFUSED', 'ECONNABORTED', True, b'own']"
    assert got == b"hi" and host_conns == 1  # only the non-blocking connect reached the host's listener
    assert ("connect", "127.0.0.1", ports[0]) in seen and ("sendto", "127.0.0.1", ports[1]) in seen
    assert ("bind", "127.0.0.1", ports[0]) in seen


def select_ready(sock) -> bool:
    import select
    return bool(select.select([sock], [], [], 5)[0])


def test_allowlist_judges_the_copy_and_callback_sees_every_connect(tmp_path):
    """With net_allow_hosts the built-in refusal is shown as denied; an allowed blocking connect waits for the
    callback (it is not performed before the verdict)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    seen = []

    def on_event(event, ctx):
        if event.syscall == "connect":
            seen.append((event.host, event.port, event.denied))
            if event.host == "127.0.0.1":
                return errno.EHOSTUNREACH
        return 0

    code = ("import errno, socket\n"
            "for h in ('127.0.0.1', '127.0.0.2'):\n"
            f"    print(errno.errorcode[socket.socket().connect_ex((h, {port}))])\n")
    try:
        r = Sandbox(_policy(tmp_path, net_allow_hosts=[]), policy_fn=on_event).run(["python3", "-c", code],
                                                                                  timeout=60)
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # a denied event reaches the callback after the answer
    finally:
        srv.close()
    assert r.stdout == b"EHOSTUNREACH\nECONNREFUSED\n", r.stderr
    assert sorted(seen) == [("127.0.0.1", port, False), ("127.0.0.2", port, True)]


NOBODY_FLIP = r"""
import os, socket, sys, tempfile, threading, time
from sandlock_core import Policy, Sandbox
child, rounds = sys.argv[1], 60
d = tempfile.mkdtemp(); os.chmod(d, 0o755)
marker = os.path.join(d, "approved"); open(marker, "wb").close()
ls = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64); ls.append(s)
a, b = (s.getsockname()[1] for s in ls)
counts = {a: 0, b: 0}; stop = threading.Event()
def accept():
    import select
    while not stop.is_set():
        for s in select.select(ls, [], [], 0.05)[0]:
            s.accept()[0].close(); counts[s.getsockname()[1]] += 1
t = threading.Thread(target=accept); t.start()
def on_event(e, ctx):
    if e.syscall != "connect":
        return 0
    if e.port != a:
        return True
    with open(marker, "ab") as f:
        f.write(b"x")
    time.sleep(0.003)
    return 0
ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)] + [d]
r = Sandbox(Policy(fs_readable=ro), policy_fn=on_event).run(
    ["python3", "-c", child, str(a), str(b), str(rounds), marker], timeout=120)
end = time.monotonic() + 5
while counts[a] < rounds and time.monotonic() < end:
    time.sleep(0.01)
stop.set(); t.join()
print(r.stdout.decode().strip(), counts[a], counts[b])
"""


def test_connect_flip_unprivileged():
    from support import run_as_nobody
    r = run_as_nobody(NOBODY_FLIP, FLIP_CHILD, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["{0:", "60}", "60", "0"], r.stdout + r.stderr
