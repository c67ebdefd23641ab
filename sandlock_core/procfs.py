"""A virtual /proc: what a sandbox learns about the host.

Active when the policy sets ``isolate_pids``, ``num_cpus`` or ``max_memory``.

* Sensitive kernel files (``/proc/kcore``, ``/proc/kallsyms``, ``/proc/keys``, ``/proc/sysrq-trigger``,
  ``/sys/firmware``, ... see ``SENSITIVE``) are refused with ``EACCES``.
* ``max_memory``: ``/proc/meminfo`` shows the limit as ``MemTotal`` and what is left of it as ``MemFree`` /
  ``MemAvailable``.
* ``num_cpus``: ``/proc/cpuinfo`` lists N processors, ``/sys/devices/system/cpu/{online,possible,present}`` say
  ``0-(N-1)`` (glibc's ``get_nprocs``, hence ``os.cpu_count()``), ``sched_getaffinity`` answers a mask of N CPUs
  (``nproc``, ``os.sched_getaffinity``). The real affinity is unchanged (``cpu_cores`` sets that).
* ``isolate_pids``: listings of /proc (``getdents64`` and the legacy ``getdents``, done on behalf on a duplicate of
  the child's fd, which shares its offset) show only the sandbox's processes; ``/proc/<pid>/...`` of any other
  process, opened or read as a link, fails with ``ENOENT`` as if it did not exist; ``sched_getaffinity`` of a
  foreign pid is ``ESRCH``.

Names are resolved as the kernel would for the child: relative to its cwd or dirfd, following symlinks
component by component, with ``/proc/self`` and ``/proc/thread-self`` meaning the *child's* pid (the supervisor's
own magic links are never followed). Synthesized files are sealed memfds. Opens that are neither refused nor
synthesized go on to the next mechanism (the kernel opens them).

Residual risk: the checks are made on names and the open then continues, so a concurrent rename or symlink swap
between the check and the kernel's own lookup can reach a foreign ``/proc/<pid>``; ``stat`` of
``/proc/<pid>`` (not notified) reveals that a process exists and its owner; other pid-taking syscalls
(``kill(pid, 0)``, ``getpriority``, ``pidfd_open``) are not filtered (``isolate_signals`` scopes signals).
"""
from __future__ import annotations

import errno
import os
import re
import stat
import struct

from .notif import Errno, Value, s32, serve_virtual, tgid_of

AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
PROC_ROOT_INO = 1

SENSITIVE = (
    "/proc/kcore", "/proc/kmsg", "/proc/kallsyms", "/proc/keys", "/proc/key-users", "/proc/sysrq-trigger",
    "/proc/kpagecount", "/proc/kpageflags", "/proc/kpagecgroup", "/proc/timer_list", "/proc/vmallocinfo",
    "/proc/slabinfo", "/proc/sched_debug", "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
    "/proc/sys/vm/drop_caches", "/sys/firmware", "/sys/kernel/security", "/sys/kernel/debug",
    "/sys/kernel/tracing", "/sys/kernel/vmcoreinfo", "/sys/power",
)
_CPU_FILES = ("/sys/devices/system/cpu/online", "/sys/devices/system/cpu/possible",
              "/sys/devices/system/cpu/present")
_PID_RE = re.compile(r"^/proc/(\d+)(?:/|$)")
# The last components that can matter: cheap pre-filter before any resolution.
_SELF = ("self", "thread-self")


def _sensitive(name: str) -> bool:
    for s in SENSITIVE:
        if name == s or name.startswith(s + "/"):
            return True
    return False


class ProcFs:
    def __init__(self, policy, arch: str):
        from . import syscalls
        self.isolate = policy.isolate_pids
        self.num_cpus = policy.num_cpus
        self.max_memory = policy.max_memory
        self.sort = policy.deterministic_dirs
        self.nr_getdents64 = syscalls.number("getdents64", arch)
        self.nr_getdents = syscalls.number("getdents", arch)
        self.nr_openat2 = syscalls.number("openat2", arch)
        try:
            self.proc_dev = os.stat("/proc").st_dev
        except OSError:
            self.proc_dev = -1
        self._cpuinfo: bytes | None = None

    # ---- the sandbox's pids ----
    def _pids(self, sup, fresh: bool = False) -> set[int]:
        pids = sup.state.get("procfs_pids")
        if pids is None or fresh:
            from .resources import sandbox_pids
            pids = sup.state["procfs_pids"] = sandbox_pids(sup)
        return pids

    def _ours(self, sup, pid: int) -> bool:
        if pid in self._pids(sup) or pid in self._pids(sup, fresh=True):
            return True
        try:  # a thread of a sandbox process (/proc/<tid> exists, unlisted)
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1]) in self._pids(sup)
        except (OSError, ValueError):
            pass
        return False

    # ---- name resolution as the child sees it ----
    @staticmethod
    def _tgid(tid: int) -> int:
        return tgid_of(tid)

    def resolve(self, n, dirfd: int, path: bytes) -> str | None:
        """The name the kernel would open for the child, or None if it cannot tell (the kernel answers)."""
        p = os.fsdecode(path)
        if not p:
            return None
        if p.startswith("/"):
            cur = "/"
        else:
            try:
                cur = os.readlink(f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}")
            except OSError:
                return None
            if not cur.startswith("/"):
                return None  # not a directory (pipe, socket): ENOTDIR from the kernel
        stack = [c for c in reversed(p.split("/")) if c not in ("", ".")]
        links = 0
        tgid = None
        while stack:
            c = stack.pop()
            if c == "..":
                cur = os.path.dirname(cur) or "/"
                continue
            if cur == "/proc" and c in _SELF:
                if tgid is None:
                    tgid = self._tgid(n.pid)
                cur = f"/proc/{tgid}" if c == "self" else f"/proc/{tgid}/task/{n.pid}"
                continue
            nxt = (cur if cur != "/" else "") + "/" + c
            try:
                target = os.readlink(nxt)
            except OSError:
                cur = nxt
                continue
            links += 1
            if links > 40:
                return None  # ELOOP from the kernel
            if target.startswith("/"):
                cur = "/"
            elif ":" in target and "/" not in target:
                cur = nxt  # a magic link to a pipe/socket/anon inode: the object, named by the link
                continue
            stack.extend(c2 for c2 in reversed(target.split("/")) if c2 not in ("", "."))
        return cur

    # ---- virtual files ----
    def _meminfo(self, sup) -> bytes:
        limit = self.max_memory
        live = sup.state.get("max_memory")
        if live is not None:
            limit = min(limit, live)
        run = sup.state.get("resources")
        used = 0
        if run is not None:
            with run.lock:
                used = run.total()
        free = max(0, limit - used) // 1024
        total = limit // 1024
        rows = [("MemTotal", total), ("MemFree", free), ("MemAvailable", free), ("Buffers", 0), ("Cached", 0),
                ("SwapCached", 0), ("Active", total - free), ("Inactive", 0), ("SwapTotal", 0), ("SwapFree", 0),
                ("Dirty", 0), ("AnonPages", total - free), ("Shmem", 0), ("Slab", 0), ("SReclaimable", 0),
                ("CommitLimit", total), ("Committed_AS", total - free)]
        return "".join(f"{k + ':':<16}{v:>8} kB\n" for k, v in rows).encode()

    def _cpuinfo_bytes(self) -> bytes:
        if self._cpuinfo is None:
            try:
                with open("/proc/cpuinfo", "rb") as f:
                    first = f.read().split(b"\n\n", 1)[0]
            except OSError:
                first = b"processor\t: 0\nmodel name\t: Virtual CPU"
            out = []
            for i in range(self.num_cpus):
                lines = []
                for line in first.split(b"\n"):
                    key = line.split(b":", 1)[0].strip()
                    val = {b"processor": i, b"core id": i, b"apicid": i, b"initial apicid": i,
                           b"siblings": self.num_cpus, b"cpu cores": self.num_cpus, b"physical id": 0}.get(key)
                    if val is not None:
                        line = line.split(b":", 1)[0] + b": " + str(val).encode()
                    lines.append(line)
                out.append(b"\n".join(lines) + b"\n\n")
            self._cpuinfo = b"".join(out)
        return self._cpuinfo

    def _virtual(self, sup, name: str) -> bytes | None:
        if self.max_memory is not None and name == "/proc/meminfo":
            return self._meminfo(sup)
        if self.num_cpus is not None:
            if name == "/proc/cpuinfo":
                return self._cpuinfo_bytes()
            if name in _CPU_FILES:
                return (b"0\n" if self.num_cpus == 1 else f"0-{self.num_cpus - 1}\n".encode())
        return None

    # ---- open family ----
    def _fast(self, n, dirfd: int, path: bytes):
        """The kernel's own resolution in the supervisor, refusing magic links: exact for the child unless it
        went through /proc (``self`` means the supervisor here) or a magic link (ELOOP). Returns the name,
        False when the path does not exist (the child's open fails alike), None when only the exact walk can
        tell."""
        from ._native import ffi, lib
        if self.nr_openat2 is None or not path:
            return None
        base = -1
        try:
            if not path.startswith(b"/"):
                try:
                    base = os.open(f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}",
                                   os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    return None
            how = ffi.new("uint64_t[3]", [os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_MAGICLINKS])
            cpath = ffi.new("char[]", path)
            fd = lib.sl_raw_syscall6(self.nr_openat2, base if base >= 0 else AT_FDCWD, ffi.cast("long", cpath),
                                     ffi.cast("long", how), 24, 0, 0)
            if fd == -errno.ENOENT:
                return False
            if fd < 0:
                return None
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        finally:
            if base >= 0:
                os.close(base)

    def _open(self, sup, n, name_syscall: str, dirfd: int, path_index: int, flags: int):
        path = sup.path_arg(n, path_index)
        name = self._fast(n, dirfd, path)
        if name is False:  # does not exist: still refuse a sensitive name (same answer on every kernel)
            try:
                lexical = sup.resolve(n, dirfd, path)
            except OSError:
                return None
            if _sensitive(lexical):
                sup.record(name_syscall, n.pid, errno.EACCES, lexical, "a sensitive kernel file: always refused")
                return Errno(errno.EACCES)
            return None
        if name and not (name.startswith("/proc") or name.startswith("/sys")):
            return None
        name = self.resolve(n, dirfd, path)
        if name is None or not (name.startswith("/proc") or name.startswith("/sys")):
            return None
        if _sensitive(name):
            sup.record(name_syscall, n.pid, errno.EACCES, name, "a sensitive kernel file: always refused")
            return Errno(errno.EACCES)
        if self.isolate:
            m = _PID_RE.match(name)
            if m and not self._ours(sup, int(m.group(1))):
                sup.record(name_syscall, n.pid, errno.ENOENT, name, "isolate_pids hides other processes")
                return Errno(errno.ENOENT)
        data = self._virtual(sup, name)
        if data is None:
            return None
        return serve_virtual(sup, data, flags, "sandlock-proc")

    def h_open(self, sup, n):
        return self._open(sup, n, "open", AT_FDCWD, 0, s32(n.data.args[1]))

    def h_openat(self, sup, n):
        a = n.data.args
        return self._open(sup, n, "openat", s32(a[0]), 1, s32(a[2]))

    def h_openat2(self, sup, n):
        a = n.data.args
        if a[3] < 8:
            return None
        flags = struct.unpack("=Q", sup.read_mem(n, a[2], 8))[0]
        return self._open(sup, n, "openat2", s32(a[0]), 1, s32(flags & 0xFFFFFFFF))

    # ---- links: readlink("/proc/<foreign>/exe") ----
    def _readlink(self, sup, n, name_syscall: str, dirfd: int, path_index: int):
        path = sup.path_arg(n, path_index)
        head, _, tail = path.rpartition(b"/")
        parent = self.resolve(n, dirfd, head or (b"/" if path.startswith(b"/") else b"."))
        if parent is None:
            return None
        name = os.path.join(parent, os.fsdecode(tail))
        m = _PID_RE.match(name)
        if m and not self._ours(sup, int(m.group(1))):
            sup.record(name_syscall, n.pid, errno.ENOENT, name, "isolate_pids hides other processes")
            return Errno(errno.ENOENT)
        return None

    def h_readlink(self, sup, n):
        return self._readlink(sup, n, "readlink", AT_FDCWD, 0)

    def h_readlinkat(self, sup, n):
        return self._readlink(sup, n, "readlinkat", s32(n.data.args[0]), 1)

    # ---- listings ----
    def _getdents(self, sup, n, nr: int, name_off: int):
        from ._native import ffi, lib
        a = n.data.args
        fd, addr, count = s32(a[0]), a[1], a[2] & 0xFFFFFFFF
        try:
            dup = sup.dup_child_fd(n, fd)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise
            return Errno(errno.EBADF)
        try:
            st = os.fstat(dup)
            if not stat.S_ISDIR(st.st_mode):
                return Errno(errno.ENOTDIR)
            is_proc = st.st_dev == self.proc_dev and st.st_ino == PROC_ROOT_INO
            if self.sort:
                return self._sorted(sup, n, dup, nr, name_off, addr, count, is_proc, st)
            size = min(count, 1 << 16)
            buf = sup.state.get("procfs_buf")
            if buf is None:
                buf = sup.state["procfs_buf"] = ffi.new("char[]", 1 << 16)
            pids = self._pids(sup, fresh=True) if is_proc else None
            while True:
                r = lib.sl_raw_syscall6(nr, dup, ffi.cast("long", buf), size, 0, 0, 0)
                if r < 0:
                    return Errno(-r)
                if r == 0:
                    return Value(0)
                data = ffi.buffer(buf, r)[:]
                if pids is not None:
                    data = _filter(data, name_off, pids)
                    if not data:
                        continue  # every entry of this batch was foreign: read on
                sup.write_mem(n, addr, data)
                return Value(len(data))
        finally:
            os.close(dup)

    def _sorted(self, sup, n, dup, nr, name_off, addr, count, is_proc, st):
        """deterministic_dirs together with isolate_pids: the whole listing, filtered, sorted by name, served
        by index (the file offset holds the index, as the deterministic mechanism does)."""
        from ._native import ffi, lib
        pos = os.lseek(dup, 0, os.SEEK_CUR)
        key = ("procfs_listing", n.pid, s32(n.data.args[0]))
        cached = sup.state.get(key)
        if pos == 0 or cached is None or cached[0] != (st.st_dev, st.st_ino):
            fd = os.open(f"/proc/self/fd/{dup}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            recs = []
            try:
                buf = ffi.new("char[]", 1 << 16)
                while True:
                    r = lib.sl_raw_syscall6(nr, fd, ffi.cast("long", buf), 1 << 16, 0, 0, 0)
                    if r < 0:
                        return Errno(-r)
                    if r == 0:
                        break
                    data = ffi.buffer(buf, r)[:]
                    if is_proc:
                        data = _filter(data, name_off, self._pids(sup, fresh=not recs))
                    recs.extend(_records(data, name_off))
            finally:
                os.close(fd)
            recs.sort(key=lambda rec: rec[0])
            cached = ((st.st_dev, st.st_ino), [rec[1] for rec in recs])
            sup.state[key] = cached
        entries = cached[1]
        out = bytearray()
        i = pos
        while 0 <= i < len(entries):
            rec = bytearray(entries[i])
            struct.pack_into("=q", rec, 8, i + 1)  # d_off: the next index
            if len(out) + len(rec) > count:
                break
            out += rec
            i += 1
        if not out and 0 <= pos < len(entries):
            return Errno(errno.EINVAL)
        if out:
            sup.write_mem(n, addr, bytes(out))
            os.lseek(dup, i, os.SEEK_SET)
        return Value(len(out))

    def h_getdents64(self, sup, n):
        return self._getdents(sup, n, self.nr_getdents64, 19)

    def h_getdents(self, sup, n):
        return self._getdents(sup, n, self.nr_getdents, 18)

    # ---- num_cpus ----
    def h_sched_getaffinity(self, sup, n):
        a = n.data.args
        pid, size, addr = s32(a[0]), a[1] & 0xFFFFFFFF, a[2]
        if pid < 0:
            return Errno(errno.EINVAL)
        if pid and self.isolate and not self._ours(sup, pid):
            return Errno(errno.ESRCH)
        if self.num_cpus is None:
            return None
        need = (self.num_cpus + 63) // 64 * 8
        if size < need or size % 8:
            return Errno(errno.EINVAL)
        mask = ((1 << self.num_cpus) - 1).to_bytes(need, "little")
        sup.write_mem(n, addr, mask)
        return Value(need)


def _records(data: bytes, name_off: int):
    """(name, record bytes) of each dirent record."""
    off = 0
    out = []
    while off + name_off <= len(data):
        reclen = struct.unpack_from("=H", data, off + 16)[0]
        if reclen == 0:
            break
        rec = data[off:off + reclen]
        out.append((rec[name_off:].split(b"\0", 1)[0], rec))
        off += reclen
    return out


def _filter(data: bytes, name_off: int, pids: set[int]) -> bytes:
    """Drop the records of numeric names (processes) that are not in ``pids``. Each kept record keeps its
    d_off: the position after it, valid whatever was dropped around it."""
    out = bytearray()
    for name, rec in _records(data, name_off):
        if name.isdigit() and int(name) not in pids:
            continue
        out += rec
    return bytes(out)


def wanted(policy) -> bool:
    return policy.isolate_pids or policy.num_cpus is not None or policy.max_memory is not None


def install(builder) -> None:
    policy = builder.policy
    fs = ProcFs(policy, builder.arch)
    builder.notify("open", fs.h_open)
    builder.notify("openat", fs.h_openat)
    builder.notify("openat2", fs.h_openat2)
    if policy.isolate_pids:
        builder.notify("getdents64", fs.h_getdents64)
        builder.notify("getdents", fs.h_getdents)
        builder.notify("readlink", fs.h_readlink)
        builder.notify("readlinkat", fs.h_readlinkat)
    if policy.isolate_pids or policy.num_cpus is not None:
        builder.notify("sched_getaffinity", fs.h_sched_getaffinity)
