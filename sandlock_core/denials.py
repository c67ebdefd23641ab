"""Denial recording: make what Landlock refuses visible to the supervisor, for reports.

Landlock refuses in the kernel. The supervisor never sees those refusals, and on this project's machines the
kernel's own Landlock audit records are not available (audit is disabled; an unprivileged user could not read
them anyway: see kernel-probes.md section 1). So, with ``Sandbox(policy, record_denials=True)``, this module
**mirrors Landlock's decision in the supervisor**:

* it asks to be notified of the syscalls where Landlock makes its filesystem and TCP decisions
  (``open``/``openat``/``openat2``/``creat``, ``execve``/``execveat``, ``mkdir``/``mknod``/``unlink``/``rmdir``/
  ``rename``/``link``/``symlink`` families, ``truncate``, and ``bind``/``connect`` when Landlock handles TCP);
* for each one, it reads the path (or socket address) from the child's memory, resolves it the way the kernel
  would (against the dirfd or the child's cwd, ``/proc/self`` as the child's own, symlinks followed unless
  ``O_NOFOLLOW``), works out which Landlock access right the call needs (read vs write from the open flags,
  create/remove on the parent directory, execute), and checks it against ``fs_readable``/``fs_writable`` and
  ``net_bind``/``net_connect`` exactly as the ruleset grants them;
* if Landlock is going to refuse, it records a :class:`MirroredDenial` (operation, target, errno, pid and
  program, and the policy change that would allow it), deduplicated by (syscall, target, access).

It **only records**: every handler here returns ``None`` (no decision), so the syscall CONTINUEs and Landlock
stays the enforcer. A failure inside the recorder is swallowed (it must never turn into a fail-closed EACCES
that the policy did not ask for). The mirror can be wrong only in the report, never in enforcement; the known
gaps are listed in :data:`LIMITS`.

Cost: one supervisor round trip per notified syscall (about 20-60 us each, measured in
benchmarks/plugin_overhead.py); nothing when ``record_denials`` is off, and nothing for syscalls whose kind of
access Landlock does not handle under the policy (no fs rules: no open notifications; no TCP ports: no socket
notifications).
"""
from __future__ import annotations

import errno as _errno
import os
import socket
import struct

from .notif import Denial

LIMITS = (
    "refusals that happen inside the kernel without a syscall of their own (the ELF interpreter or a #! "
    "interpreter opened by execve, files opened by the kernel on the process's behalf) are not mirrored",
    "isolate_ipc (abstract UNIX sockets) and isolate_signals refusals are not mirrored",
    "the target is resolved when the call is made; a path that changes between the check and the kernel's "
    "own lookup can be misreported (reports only; enforcement is the kernel's)",
)

MAX_DENIALS = 256
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_REMOVEDIR = 0x200
O_ACCMODE = 3
O_PATH = getattr(os, "O_PATH", 0o10000000)
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
O_CREAT, O_EXCL, O_TRUNC, O_NOFOLLOW = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_NOFOLLOW
O_WRONLY, O_RDWR = os.O_WRONLY, os.O_RDWR
IPPROTO_TCP = 6


class MirroredDenial(Denial):
    """A refusal the supervisor saw coming (Landlock's decision, mirrored). ``access`` is the right that was
    missing (read, write, create, remove, exec, bind, connect), ``comm`` the program, ``count`` how many times
    the same (syscall, target, access) was refused, ``source`` which mechanism refused."""

    __slots__ = ("comm", "access", "count", "source")

    def __init__(self, syscall: str, pid: int, err: int, detail: str, hint: str, *, comm: str = "",
                 access: str = "", source: str = "landlock"):
        super().__init__(syscall, pid, err, detail, hint)
        self.comm, self.access, self.count, self.source = comm, access, 1, source

    def as_dict(self) -> dict:
        d = super().as_dict()
        d.update(comm=self.comm, access=self.access, count=self.count, source=self.source)
        return d


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.normpath(path)


def _port_set(spec) -> frozenset[int] | None:
    """Ports from a normalised Policy field: ints, (lo, hi) pairs, ranges, or "a-b" strings."""
    if not spec:
        return None
    out: set[int] = set()
    items = [spec] if isinstance(spec, (int, str, range)) else list(spec)
    for it in items:
        if isinstance(it, bool):
            continue
        if isinstance(it, int):
            out.add(it)
        elif isinstance(it, range):
            out.update(it)
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            out.update(range(int(it[0]), int(it[1]) + 1))
        elif isinstance(it, str):
            for part in it.split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    out.update(range(int(lo), int(hi) + 1))
                elif part:
                    out.add(int(part))
    return frozenset(out)


class Mirror:
    """Landlock's filesystem and TCP decisions under one policy, evaluated in the supervisor."""

    def __init__(self, policy):
        from .plan import preload_rule  # the seeded getrandom library: the ruleset grants it (plan.py)
        readable = tuple(policy.fs_readable or ()) + preload_rule(policy)
        self.readable = tuple(sorted({_real(os.fspath(p)) for p in readable}))
        self.writable = tuple(sorted({_real(os.fspath(p)) for p in (policy.fs_writable or ())}))
        self.fs = bool(self.readable or self.writable)
        self.bind = _port_set(getattr(policy, "net_bind", None))
        self.connect = _port_set(getattr(policy, "net_connect", None))
        # Landlock handles only the TCP right whose list is non-empty (landlock.build_ruleset): with only
        # net_connect, bind stays unrestricted, and the reverse.
        self.net = self.bind is not None or self.connect is not None

    @staticmethod
    def _beneath(path: str, roots: tuple[str, ...]) -> bool:
        for r in roots:
            if path == r or r == "/" or path.startswith(r + "/"):
                return True
        return False

    def can_read(self, path: str) -> bool:
        return self._beneath(path, self.readable) or self._beneath(path, self.writable)

    def can_write(self, path: str) -> bool:
        return self._beneath(path, self.writable)


# ---- reading the child's view -------------------------------------------------------------------------

def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return "?"


def _child_path(sup, n, dirfd: int, index: int, *, empty_ok: bool = False) -> str | None:
    """The absolute path a *at() call names in argument ``index``, as the child sees it (None: not a
    filesystem path). Read through ``sup.path_arg``: an enforcing handler earlier in the chain already read it."""
    raw = os.fsdecode(sup.path_arg(n, index)) if n.data.args[index] else ""
    pid = n.pid
    if raw.startswith("/"):
        path = raw
    else:
        if not raw and not empty_ok:
            return None
        try:
            base = os.readlink(f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}")
        except OSError:
            return None
        if not base.startswith("/"):
            return None  # pipe:[..], socket:[..], anon_inode: not in the filesystem
        path = os.path.join(base, raw) if raw else base
    if path == "/proc/self" or path.startswith("/proc/self/"):
        path = f"/proc/{pid}" + path[len("/proc/self"):]
    elif path == "/proc/thread-self" or path.startswith("/proc/thread-self/"):
        path = f"/proc/{pid}/task/{pid}" + path[len("/proc/thread-self"):]
    return path


def _display(path: str) -> tuple[str, str]:
    """(what the report shows, what the hint suggests). A process's own /proc entries cannot get a rule of
    their own (a rule on /proc/self would name the pytest process's directory): only "/proc" helps."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "proc" and parts[2].isdigit():
        parts[2] = "<pid>"
        if len(parts) >= 5 and parts[3] == "task" and parts[4].isdigit():
            parts[4] = "<tid>"
        return "/".join(parts), "/proc"
    return path, path


def _resolve(path: str, follow: bool = True) -> str | None:
    """Follow symlinks like the kernel's lookup; None for magic links to non-filesystem objects."""
    if path.startswith("/proc/"):
        parts = path.split("/")
        # /proc/PID/fd/N and /proc/PID/task/TID/fd/N are magic links: read them directly
        if len(parts) >= 5 and parts[-2] == "fd" and parts[-1].isdigit():
            try:
                target = os.readlink(path)
            except OSError:
                return _real(path)
            return target if target.startswith("/") else None
    if follow:
        return _real(path)
    head, tail = os.path.split(path)
    return os.path.join(_real(head), tail)


def _parent(path: str) -> str:
    return os.path.dirname(path.rstrip("/")) or "/"


def _fmt_list(field: str, value) -> str:
    return f"{field} += [{value!r}]"


# ---- recording ----------------------------------------------------------------------------------------

def _record(sup, n, syscall: str, detail: str, access: str, hint: str, err: int = _errno.EACCES) -> None:
    if detail.startswith("/proc/"):
        shown, allow = _display(detail)
        if allow != detail:
            detail, hint = shown, f"{hint.split(' += ')[0]} += [{allow!r}]"
    with sup.denials_lock:  # Sandbox.take_denials() may start a new window from another thread
        state = sup.state
        seen = state.get("denials.seen")
        if seen is None:
            seen = state["denials.seen"] = {}
        key = (syscall, detail, access)
        d = seen.get(key)
        if d is not None:
            d.count += 1
            return
        if len(sup.denials) >= MAX_DENIALS:
            state["denials.dropped"] = state.get("denials.dropped", 0) + 1
            return
        d = MirroredDenial(syscall, n.pid, err, detail, hint, comm=_comm(n.pid), access=access)
        seen[key] = d
        sup.denials.append(d)


def _check_fs(sup, n, mirror: Mirror, syscall: str, path: str | None, access: str) -> None:
    """``access``: read/exec on the file, write on the file, create/remove in the parent directory."""
    if path is None:
        return
    if access in ("read", "exec"):
        if not os.path.exists(path):
            return  # ENOENT comes first; Landlock never sees it
        if not mirror.can_read(path):
            field = "fs_readable"
            _record(sup, n, syscall, path, access, _fmt_list(field, path))
    elif access == "write":
        if not os.path.exists(path):
            return
        if not mirror.can_write(path):
            _record(sup, n, syscall, path, access, _fmt_list("fs_writable", path))
    else:  # create / remove: a right on the parent directory
        parent = _parent(path)
        if not os.path.isdir(parent):
            return
        if access == "create" and os.path.lexists(path):
            return  # EEXIST, not a Landlock decision
        if access == "remove" and not os.path.lexists(path):
            return
        if not mirror.can_write(parent):
            _record(sup, n, syscall, path, access, _fmt_list("fs_writable", parent))


def _open_common(sup, n, mirror: Mirror, syscall: str, dirfd: int, index: int, flags: int) -> None:
    if flags & O_PATH:
        return  # O_PATH opens are not access-checked by Landlock
    path = _child_path(sup, n, dirfd, index)
    if path is None:
        return
    if (flags & O_TMPFILE) == O_TMPFILE:
        target = _resolve(path)
        if target is not None and not mirror.can_write(target):
            _record(sup, n, syscall, target, "create", _fmt_list("fs_writable", target))
        return
    target = _resolve(path, follow=not (flags & O_NOFOLLOW))
    if target is None:
        return
    acc = flags & O_ACCMODE
    if flags & O_CREAT and not os.path.lexists(target):
        _check_fs(sup, n, mirror, syscall, target, "create")
        return
    if acc in (O_WRONLY, O_RDWR) or flags & O_TRUNC:
        _check_fs(sup, n, mirror, syscall, target, "write")
    if acc != O_WRONLY:
        _check_fs(sup, n, mirror, syscall, target, "read")


def _safe(fn):
    def handler(sup, n):
        try:
            fn(sup, n)
        except Exception:  # never let the recorder decide anything
            sup.state["denials.errors"] = sup.state.get("denials.errors", 0) + 1
        return None
    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


def _fs_handlers(m: Mirror) -> dict:
    def a(n, i):
        return n.data.args[i]

    def h_open(sup, n):
        _open_common(sup, n, m, "open", AT_FDCWD, 0, a(n, 1))

    def h_creat(sup, n):
        _open_common(sup, n, m, "creat", AT_FDCWD, 0, O_CREAT | O_WRONLY | O_TRUNC)

    def h_openat(sup, n):
        _open_common(sup, n, m, "openat", _int32(a(n, 0)), 1, a(n, 2))

    def h_openat2(sup, n):
        how = sup.read_mem(n, a(n, 2), 8)
        _open_common(sup, n, m, "openat2", _int32(a(n, 0)), 1, struct.unpack("=Q", how)[0])

    def h_execve(sup, n):
        path = _child_path(sup, n, AT_FDCWD, 0)
        _check_fs(sup, n, m, "execve", _resolve(path) if path else None, "exec")

    def h_execveat(sup, n):
        flags = a(n, 4)
        path = _child_path(sup, n, _int32(a(n, 0)), 1, empty_ok=bool(flags & AT_EMPTY_PATH))
        _check_fs(sup, n, m, "execveat", _resolve(path) if path else None, "exec")

    def mk(name, dirfd_arg, path_arg, access, flags_arg=None):
        def h(sup, n):
            dirfd = AT_FDCWD if dirfd_arg is None else _int32(a(n, dirfd_arg))
            path = _child_path(sup, n, dirfd, path_arg)
            if path is None:
                return
            acc = access
            if flags_arg is not None and a(n, flags_arg) & AT_REMOVEDIR:
                acc = "remove"
            # the last component is not followed: create/remove act on the name itself
            _check_fs(sup, n, m, name, _resolve(path, follow=False), acc)
        h.__name__ = f"h_{name}"
        return h

    def h_truncate(sup, n):
        path = _child_path(sup, n, AT_FDCWD, 0)
        _check_fs(sup, n, m, "truncate", _resolve(path) if path else None, "write")

    def mv(name, old_dirfd, old_path, new_dirfd, new_path, remove_old: bool):
        def h(sup, n):
            od = AT_FDCWD if old_dirfd is None else _int32(a(n, old_dirfd))
            nd = AT_FDCWD if new_dirfd is None else _int32(a(n, new_dirfd))
            src = _child_path(sup, n, od, old_path)
            dst = _child_path(sup, n, nd, new_path)
            if src is None or dst is None:
                return
            if remove_old:
                _check_fs(sup, n, m, name, _resolve(src, follow=False), "remove")
            else:
                _check_fs(sup, n, m, name, _resolve(src), "read")
            dst_r = _resolve(dst, follow=False)
            if dst_r is not None and not os.path.lexists(dst_r):
                _check_fs(sup, n, m, name, dst_r, "create")
        h.__name__ = f"h_{name}"
        return h

    def h_symlink(sup, n):
        path = _child_path(sup, n, AT_FDCWD, 1)
        _check_fs(sup, n, m, "symlink", _resolve(path, follow=False) if path else None, "create")

    def h_symlinkat(sup, n):
        path = _child_path(sup, n, _int32(a(n, 1)), 2)
        _check_fs(sup, n, m, "symlinkat", _resolve(path, follow=False) if path else None, "create")

    return {
        "open": h_open, "creat": h_creat, "openat": h_openat, "openat2": h_openat2,
        "execve": h_execve, "execveat": h_execveat,
        "mkdir": mk("mkdir", None, 0, "create"), "mkdirat": mk("mkdirat", 0, 1, "create"),
        "mknod": mk("mknod", None, 0, "create"), "mknodat": mk("mknodat", 0, 1, "create"),
        "unlink": mk("unlink", None, 0, "remove"), "unlinkat": mk("unlinkat", 0, 1, "remove", flags_arg=2),
        "rmdir": mk("rmdir", None, 0, "remove"),
        "truncate": h_truncate,
        "rename": mv("rename", None, 0, None, 1, True), "renameat": mv("renameat", 0, 1, 2, 3, True),
        "renameat2": mv("renameat2", 0, 1, 2, 3, True),
        "link": mv("link", None, 0, None, 1, False), "linkat": mv("linkat", 0, 1, 2, 3, False),
        "symlink": h_symlink, "symlinkat": h_symlinkat,
    }


def _sockaddr(data: bytes) -> tuple[int, str, int] | None:
    if len(data) < 4:
        return None
    family = struct.unpack_from("=H", data)[0]
    port = struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET and len(data) >= 8:
        return family, socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= 24:
        return family, "[" + socket.inet_ntop(socket.AF_INET6, data[8:24]) + "]", port
    return None


def _is_tcp(sup, n, fd: int) -> bool:
    dup = sup.dup_child_fd(n, fd)
    s = socket.socket(fileno=dup)
    try:
        return s.type == socket.SOCK_STREAM and s.proto in (0, IPPROTO_TCP)
    finally:
        s.close()


def _net_handlers(m: Mirror) -> dict:
    def mk(name: str, allowed: frozenset[int] | None, field: str):
        def h(sup, n):
            args = n.data.args
            size = min(int(args[2]), 128)
            addr = _sockaddr(sup.read_mem(n, args[1], size)) if args[1] and size else None
            if addr is None:
                return
            _family, host, port = addr
            if allowed is None or port in allowed or not _is_tcp(sup, n, _int32(args[0])):
                return
            hint = _fmt_list(field, port)
            if name == "bind" and port == 0:
                hint = f"{hint} (port 0: let the kernel pick an ephemeral port)"
            _record(sup, n, name, f"{host}:{port}/tcp", name, hint)
        h.__name__ = f"h_{name}"
        return h
    return {"bind": mk("bind", m.bind, "net_bind"), "connect": mk("connect", m.connect, "net_connect")}


def install(builder) -> None:
    """Register the recording handlers (called last by Plan, after every enforcing mechanism)."""
    m = Mirror(builder.policy)
    handlers: dict = {}
    if m.fs:
        handlers.update(_fs_handlers(m))
    if m.net:
        net = _net_handlers(m)
        if m.bind is not None:
            handlers["bind"] = net["bind"]
        if m.connect is not None:
            handlers["connect"] = net["connect"]
    for name, fn in handlers.items():
        builder.notify(name, _safe(fn))


def summarize(denials, *, limit: int = 50) -> dict:
    """Denials as plain data: {"total": N, "shown": [...dicts...], "dropped": M} (for reports and JUnit)."""
    items = [d.as_dict() for d in denials]
    total = sum(int(d.get("count", 1)) for d in items)
    return {"total": total, "unique": len(items), "shown": items[:limit], "dropped": max(0, len(items) - limit)}
