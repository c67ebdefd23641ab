"""Network confinement: ``net_allow_hosts`` (where the sandbox may send) and ``port_remap`` (its own port space).

Destinations (``net_allow_hosts`` is a list, possibly empty)
    The names are resolved once, when the plan is compiled (bounded time); literal addresses are taken as they
    are. 127.0.0.1 and ::1 (``localhost``) are always allowed; every other address, other 127/8 addresses
    included, must be listed. An empty list therefore means "no network beyond localhost". ``None`` (the
    default, no ``--net-allow-host``) leaves destinations unrestricted and notifies nothing.
    ``connect``, ``sendto`` (with an address), ``sendmsg`` and ``sendmmsg`` are performed *on behalf of the
    child* on a duplicate of its socket (pidfd_getfd), with the address and data copied out of its memory
    once: the copy is judged and the copy is used, so rewriting the sockaddr from another thread after the
    check achieves nothing, and so does swapping the fd number (the duplicate holds the object). A refused
    destination answers ``ECONNREFUSED`` and is recorded (address and port) for the denial report.
    The address is judged the way the kernel will read it for that socket: on an AF_INET socket an
    AF_UNSPEC sendto address is an IPv4 address; on an AF_INET6 socket AF_INET is IPv4 and a v4-mapped IPv6
    address is judged as its IPv4 address.
    Inside, ``/etc/hosts`` reads as a sealed memfd holding exactly localhost and the pinned names, so the
    program's own resolver agrees with the allowlist (DNS servers are not allowed unless listed).
    Non-IP sockets (AF_UNIX, netlink) are connected/sent on behalf too, with the same bytes. Caveats:
    on-behalf AF_UNIX operations carry the supervisor's pid in SO_PEERCRED/SCM_CREDENTIALS (same uid);
    a relative AF_UNIX path is resolved against the child's cwd; an abstract AF_UNIX address is refused
    (EPERM) under ``isolate_ipc`` because the supervisor cannot act inside the Landlock scope. In a
    namespace sandbox (chroot, overlay) an AF_UNIX path is resolved once in the child's root and mounts
    (openat2 RESOLVE_IN_ROOT from /proc/<pid>/root) and the supervisor connects/sends to that inode through
    /proc/self/fd/<N>: a socket that exists only in the caller's view is never reached.
    SCM_RIGHTS on AF_UNIX is translated (the child's fds are duplicated and sent); SCM_CREDENTIALS is passed
    only when it states the child's own pid, uid and gid.
    Blocking operations run on a worker thread and are answered later (DEFERRED), with the socket's own
    blocking/timeout semantics (the duplicate shares the file description). The supervisor acts unconfined,
    so ``net_connect``/``net_bind`` (Landlock TCP ports) are re-checked here before acting (EACCES as Landlock).

Port space (``port_remap``)
    ``bind`` of an IP socket to port P is done on behalf: P itself if it is free on the host, otherwise (or
    when P is privileged and the child lacks CAP_NET_BIND_SERVICE) a free port R chosen by the kernel, and
    P -> R is recorded for this run. ``getsockname``/``getpeername`` report P; ``connect`` (and ``sendto``) to
    a loopback address and P reaches R. ``/proc/net/{tcp,tcp6,udp,udp6}`` lists only the sandbox's own
    sockets, with virtual ports. ``Sandbox.ports()`` gives the host {P: R} (identity entries included).
    "Free" is checked with SO_REUSEADDR/SO_REUSEPORT off for that bind (two reuse sockets may both bind a port
    nobody listens on yet, and the second listen() would fail too late to remap). A later bind of P reuses R,
    unless no socket of the sandbox holds R any more and a process outside took it: then a fresh R.
    Without ``net_allow_hosts``, remapping is a convenience, not a boundary: whatever is not remapped
    CONTINUEs and Landlock stays in charge.

Residual risk: the /etc/hosts and /proc/net views are chosen by path and the open then CONTINUEs for other
paths, so a racing thread can read the real files; they are views for consistency, not secrets, and the
destination check above does not depend on them.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import queue
import re
import socket
import stat
import struct
import threading

from . import _sys, syscalls
from ._native import ffi
from .errors import PolicyError
from .notif import CONTINUE, DEFERRED, Errno, Value, s32, serve_virtual

AF_UNSPEC, AF_UNIX, AF_INET, AF_INET6 = 0, 1, 2, 10
SOL_SOCKET, SO_TYPE, SO_PROTOCOL, SO_DOMAIN = 1, 3, 38, 39
SO_REUSEADDR, SO_REUSEPORT = 2, 15
SCM_RIGHTS, SCM_CREDENTIALS = 1, 2
SOCK_STREAM, SOCK_DGRAM = 1, 2
IPPROTO_TCP, IPPROTO_MPTCP = 6, 262
MSG_DONTWAIT = 0x40
SOCKADDR_MAX = 128           # sizeof(struct sockaddr_storage)
UIO_MAXIOV = 1024
SEND_CAP = 4 << 20           # bytes copied per on-behalf send (a stream send may be short, as the kernel's may)
CONTROL_CAP = 64 << 10
RESOLVE_TIMEOUT = 10.0
LOOPBACK4 = bytes([127, 0, 0, 1])
LOOPBACK6 = bytes(15) + b"\x01"
MAPPED_PREFIX = bytes(10) + b"\xff\xff"
CAP_NET_BIND_SERVICE = 10
MSGHDR = struct.Struct("=QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags (56 bytes)
IOVEC = struct.Struct("=QQ")
CMSGHDR = struct.Struct("=QII")          # len, level, type

_PROC_NET_RE = re.compile(r"^/proc/(?:net|self/net|thread-self/net|\d+/net|\d+/task/\d+/net)/(tcp6?|udp6?)$")


# ---- raw socket syscalls on our duplicate (cffi releases the GIL: a blocking one only blocks its thread) ----
class _Sys:
    def __init__(self, arch: str):
        nr = lambda name: syscalls.number(name, arch)  # noqa: E731
        self.connect, self.bind, self.sendmsg = nr("connect"), nr("bind"), nr("sendmsg")
        self.getsockname, self.getpeername, self.getsockopt = nr("getsockname"), nr("getpeername"), nr("getsockopt")
        self.setsockopt = nr("setsockopt")


def _addr(buf) -> int:
    return int(ffi.cast("uintptr_t", buf))


def _getsockopt_int(s: _Sys, fd: int, level: int, opt: int) -> int:
    val = ffi.new("int *")
    ln = ffi.new("unsigned int *", 4)
    _sys.raw_syscall(s.getsockopt, fd, level, opt, _addr(val), _addr(ln))
    return val[0]


def _setsockopt_int(s: _Sys, fd: int, level: int, opt: int, value: int) -> None:
    val = ffi.new("int *", value)
    _sys.raw_syscall(s.setsockopt, fd, level, opt, _addr(val), 4)


def _sockname(s: _Sys, nr: int, fd: int) -> bytes:
    buf = ffi.new("char[]", SOCKADDR_MAX)
    ln = ffi.new("unsigned int *", SOCKADDR_MAX)
    _sys.raw_syscall(nr, fd, _addr(buf), _addr(ln))
    return ffi.buffer(buf, min(ln[0], SOCKADDR_MAX))[:]


def _with_port(raw: bytes, port: int) -> bytes:
    return raw[:2] + struct.pack("!H", port) + raw[4:]


def _port(raw: bytes) -> int:
    return struct.unpack_from("!H", raw, 2)[0] if len(raw) >= 4 else 0


# ---- address judgment ----
class Dest:
    """What the kernel will make of a sockaddr on a socket of ``domain``: kind 'ip' (ip: 4 or 16 bytes),
    'none' (AF_UNSPEC: disconnect / connected send) or 'other' (a non-IP socket: raw bytes)."""

    __slots__ = ("kind", "ip", "port", "raw")

    def __init__(self, kind, ip=b"", port=0, raw=b""):
        self.kind, self.ip, self.port, self.raw = kind, ip, port, raw

    def v4(self) -> bytes | None:
        if len(self.ip) == 4:
            return self.ip
        if self.ip.startswith(MAPPED_PREFIX):
            return self.ip[12:]
        return None

    def loopback(self) -> bool:
        v4 = self.v4()
        return v4[0] == 127 if v4 is not None else self.ip == LOOPBACK6

    def text(self) -> str:
        if self.kind != "ip":
            return "?"
        v4 = self.v4()
        if v4 is not None:
            return f"{socket.inet_ntop(AF_INET, v4)}:{self.port}"
        return f"[{socket.inet_ntop(AF_INET6, self.ip)}]:{self.port}"


def judge_addr(domain: int, raw: bytes, for_send: bool) -> Dest:
    """Parse ``raw`` as the kernel does for a socket of ``domain``; raises OSError for what it would refuse."""
    if domain not in (AF_INET, AF_INET6):
        return Dest("other", raw=raw)
    if len(raw) < 2:
        raise OSError(errno.EINVAL, "address too short")
    fam = struct.unpack_from("=H", raw)[0]
    if fam == AF_UNSPEC and not (for_send and domain == AF_INET):
        return Dest("none", raw=raw)
    if fam == AF_INET or (fam == AF_UNSPEC and domain == AF_INET):
        if len(raw) < 16:
            raise OSError(errno.EINVAL, "short sockaddr_in")
        # an AF_UNSPEC send address on an AF_INET socket means AF_INET: send it as such
        raw = struct.pack("=H", AF_INET) + raw[2:]
        return Dest("ip", raw[4:8], _port(raw), raw)
    if fam == AF_INET6 and domain == AF_INET6:
        if len(raw) < 24:
            raise OSError(errno.EINVAL, "short sockaddr_in6")
        return Dest("ip", raw[8:24], _port(raw), raw)
    raise OSError(errno.EAFNOSUPPORT, "address family not supported by the socket")


# ---- start-up resolution ----
def resolve_hosts(hosts, timeout: float = RESOLVE_TIMEOUT) -> dict[str, list[str]]:
    """{host: [addresses]} for the allowlist; literal addresses map to themselves. Bounded in time."""
    out: dict[str, list[str]] = {}
    pending = []
    for h in hosts:
        lit = h[1:-1] if h.startswith("[") and h.endswith("]") else h
        try:
            out[h] = [str(ipaddress.ip_address(lit.split("%")[0]))]
        except ValueError:
            pending.append(h)
    if not pending:
        return out
    results: dict[str, object] = {}

    def lookup(name):
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            results[name] = list(dict.fromkeys(i[4][0].split("%")[0] for i in infos))
        except OSError as exc:
            results[name] = exc

    threads = [threading.Thread(target=lookup, args=(h,), daemon=True) for h in pending]
    for t in threads:
        t.start()
    import time
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for h in pending:
        r = results.get(h)
        if r is None:
            raise PolicyError(f"net_allow_hosts: {h!r} did not resolve within {timeout:g}s")
        if isinstance(r, OSError) or not r:
            raise PolicyError(f"net_allow_hosts: cannot resolve {h!r}: {r}")
        out[h] = r
    return out


def hosts_file(pinned: dict[str, list[str]]) -> bytes:
    lines = ["# sandlock: virtual /etc/hosts (net_allow_hosts)", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    for name, addrs in pinned.items():
        try:
            ipaddress.ip_address(name.strip("[]").split("%")[0])
            continue  # a literal address needs no name
        except ValueError:
            pass
        for a in addrs:
            if name != "localhost" or a not in ("127.0.0.1", "::1"):
                lines.append(f"{a}\t{name}")
    return ("\n".join(lines) + "\n").encode()


# ---- a small pool for blocking on-behalf operations ----
class Pool:
    def __init__(self, max_threads: int = 64):
        self._q: queue.Queue = queue.Queue()
        self._idle = 0
        self._threads = 0
        self._max = max_threads
        self._lock = threading.Lock()

    def submit(self, fn) -> None:
        with self._lock:
            spawn = self._idle == 0 and self._threads < self._max
            if spawn:
                self._threads += 1
            elif self._idle:
                self._idle -= 1  # reserve an idle worker for this job (a blocked one never serves two)
            self._q.put(fn)
        if spawn:
            threading.Thread(target=self._main, name="sandlock-net", daemon=True).start()

    def _main(self):
        """A worker: idle workers exit after 30 s without work (never with a job left in the queue)."""
        while True:
            try:
                fn = self._q.get(timeout=30)
            except queue.Empty:
                with self._lock:
                    if self._q.qsize() == 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            try:
                fn()
            except Exception:  # pragma: no cover - jobs answer their own errors
                pass
            with self._lock:
                self._idle += 1


# ---- the mechanism ----
class Net:
    def __init__(self, policy, arch: str):
        self.s = _Sys(arch)
        self.policy = policy
        self.allow = policy.net_allow_hosts is not None
        self.remap = policy.port_remap
        self.connect_ports = frozenset(policy.net_connect) if policy.net_connect else None
        self.bind_ports = frozenset(policy.net_bind) if policy.net_bind else None
        self.isolate_ipc = policy.isolate_ipc
        from .plan import _namespaces
        self.in_root = _namespaces(policy)  # the child's root/mounts are not ours: AF_UNIX paths resolve there
        self.allowed4: set[bytes] = {LOOPBACK4}
        self.allowed6: set[bytes] = {LOOPBACK6}
        self.pinned: dict[str, list[str]] = {}
        self.hosts = b""
        if self.allow:
            self.pinned = resolve_hosts(policy.net_allow_hosts)
            for addrs in self.pinned.values():
                for a in addrs:
                    ip = ipaddress.ip_address(a)
                    if ip.version == 6 and ip.ipv4_mapped is not None:
                        ip = ip.ipv4_mapped
                    (self.allowed4 if ip.version == 4 else self.allowed6).add(ip.packed)
            self.hosts = hosts_file(self.pinned)
        self.pool = Pool()

    # ---- per-run state ----
    def setup(self, sup) -> None:
        sup.state["port_map"] = {}       # TCP: virtual -> real
        sup.state["port_map_udp"] = {}
        try:
            with open(f"/proc/{sup.root_pid}/stat", "rb") as f:
                sup.state["net_reaper"] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            sup.state["net_reaper"] = 0

    # ---- helpers ----
    def _sock_info(self, fd: int) -> tuple[int, int, int]:
        s = self.s
        return (_getsockopt_int(s, fd, SOL_SOCKET, SO_DOMAIN), _getsockopt_int(s, fd, SOL_SOCKET, SO_TYPE),
                _getsockopt_int(s, fd, SOL_SOCKET, SO_PROTOCOL))

    @staticmethod
    def _is_tcp(stype: int, proto: int) -> bool:
        return stype & 0xF == SOCK_STREAM and proto in (IPPROTO_TCP, IPPROTO_MPTCP)

    def _ip_allowed(self, d: Dest) -> bool:
        v4 = d.v4()
        if v4 is not None:
            return v4 in self.allowed4
        return d.ip in self.allowed6

    def _refuse(self, sup, n, name: str, d: Dest):
        sup.record(name, n.pid, errno.ECONNREFUSED, d.text(),
                   f"add {d.text().rsplit(':', 1)[0].strip('[]')} to net_allow_hosts")
        return Errno(errno.ECONNREFUSED)

    def _remapped(self, sup, d: Dest, stype: int) -> bytes:
        """The address to use: a loopback virtual port of this sandbox becomes its real port."""
        if self.remap and d.kind == "ip" and d.loopback():
            m = sup.state.get("port_map" if stype & 0xF == SOCK_STREAM else "port_map_udp") or {}
            real = m.get(d.port)
            if real is not None and real != d.port:
                return _with_port(d.raw, real)
        return d.raw

    def _unix_addr(self, n, raw: bytes, keep: list | None = None) -> bytes:
        """An AF_UNIX address usable from the supervisor: relative paths re-rooted at the child's cwd. In a
        mount namespace (chroot, overlay) the path is resolved in the child's root instead (_unix_in_root);
        the O_PATH fd that address names is appended to ``keep``, for the caller to close after the call."""
        path = raw[2:]
        if not path or path[0] == 0:  # autobind or abstract
            if path and self.isolate_ipc:
                raise OSError(errno.EPERM, "abstract AF_UNIX address under isolate_ipc")
            return raw
        if self.in_root:
            if keep is None:
                raise OSError(errno.EPERM, "AF_UNIX path in a namespace sandbox without an fd holder")
            return _unix_in_root(n.pid, path.split(b"\0", 1)[0], keep)
        if path.startswith(b"/"):
            return raw
        rel = path.split(b"\0", 1)[0]
        new = b"/proc/%d/cwd/" % n.pid + rel
        if len(new) >= 108:
            raise OSError(errno.ENAMETOOLONG, "relative AF_UNIX path too long to re-root")
        return raw[:2] + new + b"\0"

    def _blocking(self, fd: int, flags: int = 0) -> bool:
        return not (flags & MSG_DONTWAIT) and not (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)

    def _run(self, sup, n, dup: int, blocking: bool, op):
        """Run ``op()`` (returns an int) now, or on a worker when it may block; ``dup`` is closed after."""
        if not blocking:
            try:
                return Value(op())
            except OSError as exc:
                return Errno(exc.errno or errno.EPERM)
            finally:
                os.close(dup)
        nid, pid = n.id, n.pid

        def job():
            try:
                action = Value(op())
            except OSError as exc:
                action = Errno(exc.errno or errno.EPERM)
            except Exception:
                action = Errno(errno.EPERM)
            finally:
                os.close(dup)
            sup.respond(nid, action, pid)

        self.pool.submit(job)
        return DEFERRED

    def _read_addr(self, sup, n, addr: int, alen: int) -> bytes:
        alen = s32(alen)
        if alen < 0 or alen > SOCKADDR_MAX:
            raise OSError(errno.EINVAL, "bad address length")
        if addr == 0 and alen:
            raise OSError(errno.EFAULT, "NULL address")
        raw = sup.read_mem(n, addr, alen) if alen else b""
        if len(raw) != alen:
            raise OSError(errno.EFAULT, "short read")
        return raw

    # ---- connect ----
    def h_connect(self, sup, n):
        a = n.data.args
        fd = s32(a[0])
        try:
            dup = sup.dup_child_fd(n, fd)
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF)
        keep: list = []  # fds the address names (_unix_addr), closed after the connect
        try:
            domain, stype, proto = self._sock_info(dup)
            raw = self._read_addr(sup, n, a[1], a[2])
            d = judge_addr(domain, raw, for_send=False)
            if d.kind == "other":
                if not self.allow:
                    os.close(dup)
                    return CONTINUE  # only remapping: no boundary decided here, Landlock stays in charge
                if domain == AF_UNIX:
                    d.raw = self._unix_addr(n, raw, keep)
            elif d.kind == "ip":
                if self.allow and not self._ip_allowed(d):
                    os.close(dup)
                    return self._refuse(sup, n, "connect", d)
                if self.connect_ports is not None and self._is_tcp(stype, proto) and d.port not in self.connect_ports:
                    os.close(dup)
                    sup.record("connect", n.pid, errno.EACCES, d.text(), f"add {d.port} to net_connect")
                    return Errno(errno.EACCES)
                target = self._remapped(sup, d, stype)
                if not self.allow and target == d.raw:
                    os.close(dup)
                    return CONTINUE  # not remapped, no allowlist: the child's own connect, under Landlock
                d.raw = target
            elif not self.allow:
                os.close(dup)
                return CONTINUE
        except OSError as exc:
            _close_all([dup, *keep])
            return Errno(exc.errno or errno.EINVAL)
        except BaseException:
            _close_all([dup, *keep])
            raise
        buf = ffi.new("char[]", d.raw)
        blen = len(d.raw)
        nr = self.s.connect
        return self._run(sup, n, dup, self._blocking(dup),
                         _closing(keep, lambda: _sys.raw_syscall(nr, dup, _addr(buf), blen)))

    # ---- bind (port_remap) ----
    def h_bind(self, sup, n):
        a = n.data.args
        try:
            dup = sup.dup_child_fd(n, s32(a[0]))
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF)
        try:
            domain, stype, proto = self._sock_info(dup)
            if domain not in (AF_INET, AF_INET6) or stype & 0xF not in (SOCK_STREAM, SOCK_DGRAM):
                return CONTINUE  # the child's own bind: Landlock judges it
            raw = self._read_addr(sup, n, a[1], a[2])
            fam = struct.unpack_from("=H", raw)[0] if len(raw) >= 2 else -1
            if fam not in (AF_INET, AF_INET6) or (fam == AF_INET and len(raw) < 16) or \
                    (fam == AF_INET6 and len(raw) < 24):
                return CONTINUE
            port = _port(raw)
            if port == 0:
                return CONTINUE
            tcp = self._is_tcp(stype, proto)
            if tcp and self.bind_ports is not None and port not in self.bind_ports:
                sup.record("bind", n.pid, errno.EACCES, f"port {port}", f"add {port} to net_bind")
                return Errno(errno.EACCES)
            m = sup.state.setdefault("port_map" if stype & 0xF == SOCK_STREAM else "port_map_udp", {})
            return self._bind_remapped(sup, n, dup, raw, port, m)
        except OSError as exc:
            return Errno(exc.errno or errno.EINVAL)
        finally:
            os.close(dup)

    def _bind(self, fd: int, raw: bytes) -> None:
        buf = ffi.new("char[]", raw)
        _sys.raw_syscall(self.s.bind, fd, _addr(buf), len(raw))

    def _bind_remapped(self, sup, n, dup: int, raw: bytes, port: int, m: dict):
        real = m.get(port)
        if real is not None:
            try:
                self._bind(dup, _with_port(raw, real))
                return Value(0)
            except OSError as exc:
                # Still held by one of the sandbox's sockets: the sandbox's own conflict, as the kernel says.
                stream = m is sup.state.get("port_map")
                if exc.errno != errno.EADDRINUSE or _sandbox_holds_port(sup, real, stream):
                    raise
            # The sandbox let go of it and a process outside took the real port since: map to a fresh one.
        elif port >= _unprivileged_port_start() or _has_cap(n.pid, CAP_NET_BIND_SERVICE):
            try:
                self._bind_exclusive(dup, raw)
                m[port] = port
                return Value(0)
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
        self._bind(dup, _with_port(raw, 0))
        m[port] = _port(_sockname(self.s, self.s.getsockname, dup))
        return Value(0)

    def _bind_exclusive(self, fd: int, raw: bytes) -> None:
        """Bind the virtual port as the real one only if nobody else has it. With SO_REUSEADDR on both sockets, a
        port another process has bound but not yet listened on looks free: both binds succeed and the second
        listen() fails EADDRINUSE, too late to remap. So bind with the reuse options off, then restore the child's."""
        saved = [(opt, _getsockopt_int(self.s, fd, SOL_SOCKET, opt)) for opt in (SO_REUSEADDR, SO_REUSEPORT)]
        for opt, on in saved:
            if on:
                _setsockopt_int(self.s, fd, SOL_SOCKET, opt, 0)
        try:
            self._bind(fd, raw)
        finally:
            for opt, on in saved:
                if on:
                    _setsockopt_int(self.s, fd, SOL_SOCKET, opt, on)

    # ---- getsockname / getpeername (port_remap) ----
    def _name_handler(self, which: str):
        def handler(sup, n):
            a = n.data.args
            try:
                dup = sup.dup_child_fd(n, s32(a[0]))
            except OSError as exc:
                return Errno(exc.errno or errno.EBADF)
            try:
                domain, stype, _ = self._sock_info(dup)
                if domain not in (AF_INET, AF_INET6):
                    return CONTINUE  # no remapping for these: the child's own call
                m = sup.state.get("port_map" if stype & 0xF == SOCK_STREAM else "port_map_udp") or {}
                raw = _sockname(self.s, getattr(self.s, which), dup)
                rev = {r: v for v, r in m.items() if r != v}
                port = _port(raw)
                if port in rev and (which == "getsockname" or judge_addr(domain, raw, False).loopback()):
                    raw = _with_port(raw, rev[port])
                if a[2] == 0:
                    return Errno(errno.EFAULT)
                want = struct.unpack("=i", sup.read_mem(n, a[2], 4))[0]
                if want < 0:
                    return Errno(errno.EINVAL)
                if want:
                    sup.write_mem(n, a[1], raw[:want])
                sup.write_mem(n, a[2], struct.pack("=i", len(raw)))
                return Value(0)
            except OSError as exc:
                return Errno(exc.errno or errno.EINVAL)
            finally:
                os.close(dup)
        return handler

    # ---- sends with a destination ----
    def h_sendto(self, sup, n):
        a = n.data.args
        if a[4] == 0:
            return CONTINUE  # no destination (decided on a register): the connect was judged
        fd, buf_addr, length, flags = s32(a[0]), a[1], a[2], s32(a[3])
        try:
            dup = sup.dup_child_fd(n, fd)
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF)
        keep: list = []
        try:
            domain, stype, _ = self._sock_info(dup)
            raw = self._read_addr(sup, n, a[4], a[5])
            name = self._judge_send(sup, n, "sendto", domain, stype, raw, keep)
            if name is None:
                os.close(dup)
                return CONTINUE
            if isinstance(name, Errno):
                os.close(dup)
                return name
            data = sup.read_mem(n, buf_addr, min(length, SEND_CAP)) if length else b""
        except OSError as exc:
            _close_all([dup, *keep])
            return Errno(exc.errno or errno.EINVAL)
        except BaseException:
            _close_all([dup, *keep])
            raise
        msg = _Msg(name, data, b"", keep)
        return self._run(sup, n, dup, self._blocking(dup, flags), lambda: msg.send(self.s, dup, flags))

    def _judge_send(self, sup, n, what: str, domain: int, stype: int, raw: bytes, keep: list | None = None):
        """bytes to send to, None (CONTINUE: nothing to decide), or Errno. Raises OSError for bad input.
        Fds the address names are appended to ``keep`` (see _unix_addr)."""
        d = judge_addr(domain, raw, for_send=True)
        if d.kind == "other":
            if not self.allow:
                return None
            return self._unix_addr(n, raw, keep) if domain == AF_UNIX else raw
        if d.kind == "none":
            return raw if self.allow else None
        if self.allow and not self._ip_allowed(d):
            return self._refuse(sup, n, what, d)
        target = self._remapped(sup, d, stype)
        if not self.allow and target == d.raw:
            return None
        return target

    def _read_msg(self, sup, n, addr: int, domain: int, stype: int, what: str, judge=None):
        """A _Msg copied from the child's msghdr at ``addr``, or an Errno (refused destination). ``judge(raw,
        keep)`` turns the copied name into the name to send to (default: _judge_send; policy_fn adds its own
        rules); fds it appends to ``keep`` travel with the _Msg and are closed with it."""
        name_p, namelen, iov_p, iovlen, ctl_p, ctllen, _ = MSGHDR.unpack(sup.read_mem(n, addr, MSGHDR.size))
        name, keep, raw = b"", [], b""
        if name_p and namelen:
            raw = self._read_addr(sup, n, name_p, namelen)
            name = judge(raw, keep) if judge is not None else \
                self._judge_send(sup, n, what, domain, stype, raw, keep)
            if isinstance(name, Errno):
                _close_all(keep)
                return name
            if name is None:  # only without an allowlist (sendmsg is then not notified anyway)
                name = raw
        try:
            data = self._read_iov(sup, n, iov_p, iovlen)
            control, fds = b"", []
            if ctl_p and ctllen:
                if ctllen > CONTROL_CAP:
                    raise OSError(errno.ENOBUFS, "control data too large")
                control, fds = self._control(sup, n, sup.read_mem(n, ctl_p, ctllen), domain)
        except BaseException:
            _close_all(keep)
            raise
        return _Msg(name, data, control, fds + keep, raw)

    @staticmethod
    def _read_iov(sup, n, iov_p: int, iovlen: int) -> bytes:
        if iovlen > UIO_MAXIOV:
            raise OSError(errno.EMSGSIZE, "too many iovecs")
        chunks, total = [], 0
        if iovlen:
            iovs = sup.read_mem(n, iov_p, IOVEC.size * iovlen)
            if len(iovs) != IOVEC.size * iovlen:
                raise OSError(errno.EFAULT, "short iovec read")
            for i in range(iovlen):
                base, ln = IOVEC.unpack_from(iovs, i * IOVEC.size)
                ln = min(ln, SEND_CAP - total)
                if ln <= 0:
                    continue
                chunk = sup.read_mem(n, base, ln)
                if len(chunk) != ln:
                    raise OSError(errno.EFAULT, "short data read")
                chunks.append(chunk)
                total += ln
        return b"".join(chunks)

    def _control(self, sup, n, ctl: bytes, domain: int):
        """Copy ancillary data: SCM_RIGHTS (AF_UNIX) gets our duplicates of the child's fds; SCM_CREDENTIALS
        must state the child's own identity."""
        out, fds, off = bytearray(), [], 0
        try:
            while off + CMSGHDR.size <= len(ctl):
                clen, level, ctype = CMSGHDR.unpack_from(ctl, off)
                if clen < CMSGHDR.size or off + clen > len(ctl):
                    raise OSError(errno.EINVAL, "bad cmsg")
                body = bytearray(ctl[off + CMSGHDR.size:off + clen])
                if level == SOL_SOCKET and ctype == SCM_RIGHTS:
                    if domain != AF_UNIX:
                        raise OSError(errno.EINVAL, "SCM_RIGHTS on a non-AF_UNIX socket")
                    for i in range(0, len(body) - 3, 4):
                        cfd = struct.unpack_from("=i", body, i)[0]
                        ours = sup.dup_child_fd(n, cfd)
                        fds.append(ours)
                        struct.pack_into("=i", body, i, ours)
                elif level == SOL_SOCKET and ctype == SCM_CREDENTIALS:
                    pid, uid, gid = struct.unpack_from("=iII", bytes(body))
                    if (pid, uid, gid) != _ids(n.pid):
                        raise OSError(errno.EPERM, "SCM_CREDENTIALS other than the sender's own")
                out += ctl[off:off + CMSGHDR.size] + body
                pad = (-clen) % 8
                out += ctl[off + clen:off + clen + pad]
                off += clen + pad
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return bytes(out), fds

    def dup_and_read(self, sup, n, read):
        """(dup of the child's socket, ``read(dup, domain, stype)``), or an Errno with nothing left open: the
        message is copied once, from the supervisor's own duplicate, before anything is judged or sent."""
        try:
            dup = sup.dup_child_fd(n, s32(n.data.args[0]))
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF), None
        try:
            domain, stype, _ = self._sock_info(dup)
            got = read(dup, domain, stype)
        except OSError as exc:
            os.close(dup)
            return Errno(exc.errno or errno.EINVAL), None
        except BaseException:
            os.close(dup)
            raise
        if isinstance(got, Errno):
            os.close(dup)
            return got, None
        return dup, got

    def h_sendmsg(self, sup, n):
        a = n.data.args
        flags = s32(a[2])
        dup, msg = self.dup_and_read(sup, n, lambda d, dom, st: self._read_msg(sup, n, a[1], dom, st, "sendmsg"))
        if msg is None:
            return dup
        return self._run(sup, n, dup, self._blocking(dup, flags), lambda: msg.send(self.s, dup, flags))

    def h_sendmmsg(self, sup, n):
        a = n.data.args
        vec, vlen, flags = a[1], min(a[2] & 0xFFFFFFFF, UIO_MAXIOV), s32(a[3])
        dup, msgs = self.dup_and_read(sup, n, lambda d, dom, st: self._read_mmsg(sup, n, vec, vlen, dom, st))
        if msgs is None:
            return dup
        return self._run(sup, n, dup, self._blocking(dup, flags), self._mmsg_op(n.pid, dup, vec, msgs, flags))

    def _read_mmsg(self, sup, n, vec: int, vlen: int, domain: int, stype: int, judge=None):
        """The batch's messages copied (see _read_msg), or an Errno when the first one fails or is refused; a
        later failure or refusal ends the batch there, as a failing send would (sendmmsg sends fewer)."""
        msgs: list = []
        try:
            for i in range(vlen):
                m = self._read_msg(sup, n, vec + 64 * i, domain, stype, "sendmmsg", judge)
                if isinstance(m, Errno):
                    if not msgs:
                        return m
                    break
                msgs.append(m)
        except OSError:
            if not msgs:
                raise
        except BaseException:
            for m in msgs:
                m.close()
            raise
        return msgs

    def _mmsg_op(self, pid: int, dup: int, vec: int, msgs: list, flags: int):
        """Send the copied batch on ``dup``; each sent length goes to the child's msg_len (as the kernel's)."""
        def op():
            sent = 0
            try:
                for i, m in enumerate(msgs):
                    try:
                        k = m.send(self.s, dup, flags)
                    except OSError:
                        if sent == 0:
                            raise
                        break
                    _sys.process_vm_writev(pid, vec + 64 * i + 56, struct.pack("=I", k))
                    sent += 1
            finally:
                for m in msgs[sent:]:
                    m.close()
            return sent
        return op

    # ---- virtual files ----
    def _open_common(self, sup, n, dirfd: int, path_index: int, flags: int):
        path = sup.path_arg(n, path_index)
        base = path.rsplit(b"/", 1)[-1]
        if base not in (b"hosts", b"tcp", b"tcp6", b"udp", b"udp6"):
            return None
        full = sup.resolve(n, dirfd, path) if not path.startswith(b"/") else os.path.normpath(os.fsdecode(path))
        data = None
        if full == "/etc/hosts" and self.allow:
            data = self.hosts
        elif self.remap:
            m = _PROC_NET_RE.match(full)
            if m:
                data = self._proc_net(sup, m.group(1))
        if data is None:
            return None
        return serve_virtual(sup, data, flags, "sandlock-net")

    def h_open(self, sup, n):
        return self._open_common(sup, n, -100, 0, s32(n.data.args[1]))

    def h_openat(self, sup, n):
        a = n.data.args
        return self._open_common(sup, n, s32(a[0]), 1, s32(a[2]))

    def h_openat2(self, sup, n):
        a = n.data.args
        if a[3] < 8:
            return None
        flags = struct.unpack("=Q", sup.read_mem(n, a[2], 8))[0]
        return self._open_common(sup, n, s32(a[0]), 1, s32(flags))

    def _proc_net(self, sup, which: str) -> bytes:
        inodes = _sandbox_socket_inodes(sup)
        m = sup.state.get("port_map" if which.startswith("tcp") else "port_map_udp") or {}
        rev = {r: v for v, r in m.items() if r != v}
        try:
            with open(f"/proc/net/{which}", "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return b""
        out = [lines[0]] if lines else []
        for line in lines[1:]:
            f = line.split()
            if len(f) < 10:
                continue
            try:
                if int(f[9]) not in inodes:
                    continue
            except ValueError:
                continue
            line = _translate(line, f[1], rev)
            if rev and _hex_loopback(f[2]):
                line = _translate(line, f[2], rev)
            out.append(line)
        return b"\n".join(out) + b"\n"

    def ports(self, sup, proto: str = "tcp") -> dict:
        return dict(sup.state.get("port_map" if proto == "tcp" else "port_map_udp") or {})


class _Msg:
    """One copied message, ready to send on our duplicate; ``dest`` is the name as copied from the child."""

    __slots__ = ("name", "data", "control", "fds", "dest")

    def __init__(self, name: bytes, data: bytes, control: bytes, fds: list, dest: bytes = b""):
        self.name, self.data, self.control, self.fds, self.dest = name, data, control, fds, dest

    def send(self, s: _Sys, fd: int, flags: int) -> int:
        try:
            keep = []

            def cbuf(b):
                if not b:
                    return 0
                c = ffi.new("char[]", b)
                keep.append(c)
                return _addr(c)

            iov = IOVEC.pack(cbuf(self.data), len(self.data))
            hdr = MSGHDR.pack(cbuf(self.name), len(self.name), cbuf(iov), 1, cbuf(self.control),
                              len(self.control), 0)
            h = ffi.new("char[]", hdr)
            return _sys.raw_syscall(s.sendmsg, fd, _addr(h), flags)
        finally:
            self.close()

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


def _closing(fds: list, op):
    """``op`` that closes ``fds`` when done (``op`` itself when there are none: the common case)."""
    if not fds:
        return op

    def run():
        try:
            return op()
        finally:
            _close_all(fds)
    return run


def _translate(line: bytes, field: bytes, rev: dict) -> bytes:
    host, _, port = field.rpartition(b":")
    try:
        p = int(port, 16)
    except ValueError:
        return line
    if p not in rev:
        return line
    return line.replace(field, host + b":" + b"%04X" % rev[p], 1)


def _hex_loopback(field: bytes) -> bool:
    """Is this /proc/net address (hex, 32-bit words in host order) a loopback one?"""
    host = field.rpartition(b":")[0]
    if len(host) == 8:
        return host.endswith(b"7F")
    return host == b"0" * 24 + b"01000000" or (host.startswith(b"0000000000000000FFFF0000") and host.endswith(b"7F"))


def _sandbox_pids(sup) -> set[int]:
    """Every process of the sandbox: the reaper's descendants (orphans are reparented to it)."""
    start = sup.state.get("net_reaper") or sup.root_pid
    seen, todo = set(), [start]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{pid}/task/{t}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in seen:
                    seen.add(k)
                    todo.append(k)
    return seen


def _sandbox_socket_inodes(sup) -> set[int]:
    inodes = set()
    for pid in _sandbox_pids(sup):
        d = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(d)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{d}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _sandbox_holds_port(sup, real: int, stream: bool) -> bool:
    """Whether a socket of the sandbox is bound to local port ``real`` (from /proc/net: the supervisor shares
    the sandbox's network namespace). TIME_WAIT entries carry inode 0 and hold nothing."""
    inodes = _sandbox_socket_inodes(sup)
    want = f":{real:04X}".encode()
    for name in (("tcp", "tcp6") if stream else ("udp", "udp6")):
        try:
            with open(f"/proc/net/{name}", "rb") as f:
                lines = f.read().split(b"\n")[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) >= 10 and f[1].endswith(want) and f[9].isdigit() and int(f[9]) in inodes:
                return True
    return False


def _status(pid: int) -> dict[bytes, bytes]:
    out = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            k, _, v = line.partition(b":")
            out[k] = v.strip()
    return out


def _has_cap(pid: int, cap: int) -> bool:
    try:
        return bool(int(_status(pid)[b"CapEff"], 16) >> cap & 1)
    except (OSError, KeyError, ValueError):
        return False


def _ids(pid: int) -> tuple[int, int, int]:
    st = _status(pid)
    return int(st[b"Tgid"]), int(st[b"Uid"].split()[0]), int(st[b"Gid"].split()[0])


def _unix_in_root(pid: int, path: bytes, keep: list) -> bytes:
    """An AF_UNIX address naming the socket at ``path`` as the child sees it: resolved once, in its root and
    mount namespace (openat2 RESOLVE_IN_ROOT from /proc/<pid>/root, so neither ".." nor a symlink reaches our
    root), and named through /proc/self/fd/<N>, which the kernel follows to that very inode."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not path.startswith(b"/"):
            path = _cwd_in_root(pid, root) + b"/" + path
        fd = _sys.openat2(root, path, os.O_PATH | os.O_CLOEXEC, 0, _sys.RESOLVE_IN_ROOT)
    finally:
        os.close(root)
    keep.append(fd)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(errno.ECONNREFUSED, "not a socket")  # the kernel's answer for a non-socket file
    return struct.pack("=H", AF_UNIX) + b"/proc/self/fd/%d\0" % fd


def _cwd_in_root(pid: int, rootfd: int) -> bytes:
    """The child's cwd as a path from its root. Both links are read in the same terms (a mount namespace
    other than ours is named from its own root); the path must lead back to the very cwd (device, inode and
    mount), else a bind mount or a rename could make ".." mean another directory: ENOENT, fail closed."""
    root, cwd = os.readlink(b"/proc/%d/root" % pid), os.readlink(b"/proc/%d/cwd" % pid)
    if root == b"/":
        inside = cwd
    elif cwd == root or cwd.startswith(root + b"/"):
        inside = cwd[len(root):] or b"/"
    else:
        raise OSError(errno.ENOENT, "the child's cwd is outside its root")
    fds = []
    try:
        fds.append(_sys.openat2(rootfd, inside, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _sys.RESOLVE_IN_ROOT))
        fds.append(os.open(f"/proc/{pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        if _place(fds[0]) != _place(fds[1]):
            raise OSError(errno.ENOENT, "the child's cwd has no path from its root")
    finally:
        for fd in fds:
            os.close(fd)
    return inside


def _place(fd: int) -> tuple[int, int, int]:
    """(device, inode, mount id) of an open fd: the same triple is the same directory in the same mount."""
    st = os.fstat(fd)
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        mnt = next((int(line.split()[1]) for line in f if line.startswith(b"mnt_id:")), -1)
    return st.st_dev, st.st_ino, mnt


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def install(builder) -> None:
    policy = builder.policy
    net = Net(policy, builder.arch)
    if net.allow:
        builder.notify("connect", net.h_connect)
        builder.notify("sendto", net.h_sendto)
        builder.notify("sendmsg", net.h_sendmsg)
        builder.notify("sendmmsg", net.h_sendmmsg)
    if net.remap:
        if not net.allow:
            builder.notify("connect", net.h_connect)
            builder.notify("sendto", net.h_sendto)
        builder.notify("bind", net.h_bind)
        builder.notify("getsockname", net._name_handler("getsockname"))
        builder.notify("getpeername", net._name_handler("getpeername"))
    builder.notify("open", net.h_open)
    builder.notify("openat", net.h_openat)
    builder.notify("openat2", net.h_openat2)

    def on_supervisor(sup):
        net.setup(sup)
        sup.state["net"] = net

    builder.on_supervisor(on_supervisor)
