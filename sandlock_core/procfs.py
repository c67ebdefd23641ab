"""A virtual /proc: what a sandbox learns about the host.

Active when the policy sets ``isolate_pids``, ``num_cpus`` or ``max_memory``.

* Sensitive kernel files (``/proc/kcore``, ``/proc/kallsyms``, ``/proc/keys``, ``/proc/sysrq-trigger``,
  ``/sys/firmware``, ... see ``SENSITIVE``) are refused with ``EACCES``.
* ``max_memory``: ``/proc/meminfo`` shows the limit as ``MemTotal`` and what is left of it as ``MemFree`` /
  ``MemAvailable``.
* ``num_cpus``: ``/proc/cpuinfo`` lists N processors, ``/sys/devices/system/cpu/{online,possible,present}`` say
  ``0-(N-1)`` (glibc's ``get_nprocs``, hence ``os.cpu_count()``), ``sched_getaffinity`` answers a mask of N CPUs
  (``nproc``, ``os.sched_getaffinity``). The real affinity is unchanged (``cpu_cores`` sets that).
* ``isolate_pids`` has two implementations, chosen when the plan is compiled (``plan.pid_namespace_mode``):

  - **A pid namespace** wherever the kernel allows an unprivileged user + pid namespace with its own /proc (probed
    once per process, ~0.3 ms, native.c ``sl_pidns_probe``). The reaper clones the sandbox's first process into a
    new user + mount + pid namespace; it is a small C init (pid 1: reaps, forwards SIGTERM/SIGUSR1/SIGUSR2/SIGALRM,
    and SIGINT/SIGQUIT/SIGHUP/SIGWINCH when the sandbox has its own process group, hands the program's raw wait
    status to the reaper, so ``Result.signal`` stays exact) with a fresh /proc mounted ``nosuid,nodev,noexec`` over
    a private mount tree, and the program is pid 2. The kernel then hides every other process from listings,
    ``/proc/<pid>``, kill, pidfd_open, setpgid, ``F_SETOWN``... and nothing is notified for it: no stat, access,
    readlink, listing or pid-taking syscall (opens stay notified for the sensitive files below). When the program
    exits the init SIGKILLs and reaps what is left in the namespace (as the reaper did before) and hands over the
    status with the CPU time it reaped; killing the init (timeout, ``kill()``, the caller's death) kills the whole
    namespace, detached processes included. The init is a copy of the caller that runs no program code and holds no
    fd; its command line is blanked and it is named ``sandlock-init``; it has no Landlock domain, so the program
    cannot ptrace it or read its ptrace-guarded /proc files, and pid 1 ignores signals from its own namespace. The
    caller's uid/gid are mapped to themselves (as root: every id to itself); for an unprivileged caller every other
    id shows as the overflow id 65534 (root-owned files read as owned by 65534). ``unshare``, ``setns``, ``chroot``
    and the mount syscalls stay refused (``namespaces.MOUNT_SYSCALLS``); the policy's Landlock rules on /proc (which
    name the caller's procfs inodes) are added again on the new /proc, in a per-run ruleset. Names the supervisor
    resolves for the child are walked in its root (``/proc/<pid>/root``: its /proc, never ours) with ``/proc/self``
    its pid in the namespace; the metadata guard opens absolute names the same way. The session (and, on a terminal,
    the group) leader is the caller, outside the namespace: ``getsid(0)`` answers 0 there. The C fast path for opens
    (``FastPath``) still walks absolute names from the supervisor's root: the sandbox's mount tree is a private copy
    taken at its start, so a host mount made or removed later can make it answer ``ENOENT`` or continue for a name
    the sandbox sees otherwise (never a /proc or /sys name: those go to Python). An ``allow_syscalls`` policy keeps
    the supervised mode (the allowlist would drop the refused mount syscalls).
  - **Supervised** (below) everywhere else: where the kernel refuses those namespaces; under ``confine()``;
    for a confined Python function (``run_function``, the pytest plugin, ``fork()``: it goes on in the forked
    child, no init can stand above it); for a run in the caller's process group (``run_foreground`` on a
    terminal: the kernel's ``kill(0)`` and ``setpriority``/``ioprio_set(PGRP, 0)`` would reach host processes
    of that group); and with mechanisms that open, resolve or connect names on the child's behalf in the
    supervisor's view (``fs_denied``, the COW workdir, ``max_disk``, ``net_allow_hosts``/``port_remap``,
    ``policy_fn``) or that make their own namespaces (``chroot``, ``privileged``, ``fs_isolation=overlayfs``).
    Tests force it with ``SANDLOCK_PIDS_SUPERVISED=1`` (or ``plan.FORCE_SUPERVISED_PIDS``).

  Supervised ``isolate_pids``: listings of /proc (``getdents64`` and the legacy ``getdents``, done on behalf on a
  duplicate of the child's fd, which shares its offset) show only the sandbox's processes; ``/proc/<pid>/...`` of
  any other process, opened, read as a link, stat'ed or tested with access, fails with ``ENOENT`` as if it did not
  exist; the sandbox's own ``/proc/<pid>`` entries are opened, read (readlink) and stat'ed on behalf and checked
  again on the object. Pid-taking syscalls (``PID_ARGS``, ``WHICH_WHO``, ``kill``, ``setpgid``) on another process
  answer ``ESRCH``, decided on the pid register (pid 0, "myself", is let through by the filter); ``kill`` of a
  process group, of the caller's own group (pid 0: the sandbox may share it with its caller) or of -1 is done on
  behalf over the sandbox's processes only, with the kernel's permission rule. The owner of an fd's signals
  (``fcntl`` ``F_SETOWN``/``F_SETOWN_EX``, ``ioctl`` ``FIOSETOWN``/``SIOCSPGRP``; with ``O_ASYNC`` the kernel
  signals it) must be a sandbox process or a group of sandbox processes only (``ESRCH`` otherwise): only those
  commands are notified (argument filter), ``F_SETOWN`` is decided on its register, the others are done on behalf.

Names are resolved as the kernel would for the child: relative to its cwd or dirfd, following symlinks
component by component, with ``/proc/self`` and ``/proc/thread-self`` meaning the *child's* pid (the supervisor's
own magic links are never followed). Under a chroot or a mount namespace (``fs_isolation=overlayfs``,
``privileged``) names are walked from the child's root (``/proc/<pid>/root``, ``RESOLVE_IN_ROOT``), relative ones
from its cwd's name in its own view, so files that exist only there are found. Synthesized files are sealed
memfds. Opens that are neither refused nor synthesized go on to the next mechanism (the kernel opens them).

A path that does not exist is answered ``ENOENT`` here (not continued) when its walk never left the starting
mount, so a link created afterwards cannot redirect the kernel's lookup.

Residual risk: a name that resolves *outside* /proc and /sys when checked is continued, and the kernel resolves
it again: a symlink swapped in between can still reach a foreign ``/proc/<pid>`` entry (Landlock still refuses the
ptrace-guarded ones) or a sensitive file. Existence probes other than the ones above (``chdir``, ``statfs``,
xattrs, ``inotify_add_watch`` of ``/proc/<pid>``, ``capget``) are not hidden: this is not a pid namespace.
Cost: under the supervised ``isolate_pids`` every stat and access is notified (Python's start-up makes ~250).
Absolute names whose walk stays on the root file system, and fstat through an empty path, are answered in C without
a trip through Python (``FastPath``, native.c ``sl_proc_wait_recv``; open/openat too), and so are listings of
directories other than /proc's root. The sandbox's own ``/proc/<pid>/ns/*`` files cannot be opened under
``isolate_pids`` (the on-behalf open refuses magic links to namespaces; ``setns`` is blocked anyway).
"""
from __future__ import annotations

import errno
import os
import re
import stat
import struct

from ._native import ffi, lib
from .notif import Errno, Value, s32, serve_virtual, tgid_of
from .resources import stat_fields

AT_FDCWD = -100
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
OUTSIDE = "(not on /proc or /sys)"
MISSING = "(absent, unless the child's /proc/self says otherwise)"
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_NO_AUTOMOUNT = 0x800
STAT_SIZE = 144 if os.uname().machine == "x86_64" else 128  # struct stat of newfstatat
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


def _ns_pid(pid: int) -> int:
    """The pid of host process ``pid`` in its own (innermost) pid namespace; -1 if it is gone (names nothing)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return -1


def _child_proc_dev(pid: int) -> int:
    """st_dev of the /proc a process sees (under a pid namespace, not ours: a new procfs instance)."""
    try:
        return os.stat(f"/proc/{pid}/root/proc").st_dev
    except OSError:
        return -1


def _kernel_devs() -> frozenset[int]:
    """st_dev of every mount at or under /proc and /sys (procfs, sysfs, debugfs, tracefs, cgroup...): an
    object on none of them is not a name this module cares about."""
    devs = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                parts = line.split()
                point = parts[4]
                if point in (b"/proc", b"/sys") or point.startswith((b"/proc/", b"/sys/")):
                    major, minor = parts[2].split(b":")
                    devs.add(os.makedev(int(major), int(minor)))
    except (OSError, IndexError, ValueError):
        pass
    for p in ("/proc", "/sys"):
        try:
            devs.add(os.stat(p).st_dev)
        except OSError:
            pass
    return frozenset(devs)


def _sensitive(name: str) -> bool:
    for s in SENSITIVE:
        if name == s or name.startswith(s + "/"):
            return True
    return False


class ProcFs:
    def __init__(self, policy, arch: str, pidns: bool = False):
        from . import syscalls
        # Under a pid namespace the kernel hides other processes: nothing here decides on pids, and names are
        # resolved in the child's view (its /proc is its namespace's), with /proc/self its pid there.
        self.pidns = pidns
        self.isolate = policy.isolate_pids and not pidns
        self.num_cpus = policy.num_cpus
        self.max_memory = policy.max_memory
        self.sort = policy.deterministic_dirs
        self.nr_getdents64 = syscalls.number("getdents64", arch)
        self.nr_getdents = syscalls.number("getdents", arch)
        self.nr_openat2 = syscalls.number("openat2", arch)
        self.nr_newfstatat = syscalls.number("newfstatat", arch) or syscalls.number("fstatat64", arch)
        self.nr_statx = syscalls.number("statx", arch)
        self.ruleset_fd = -1  # the sandbox's Landlock ruleset (install), for the on-behalf opener thread
        try:
            self.proc_dev = os.stat("/proc").st_dev
        except OSError:
            self.proc_dev = -1
        self._cpuinfo: bytes | None = None
        self.kernel_devs = _kernel_devs()
        # chroot, overlayfs, privileged: the child's / is not the supervisor's (a mount namespace, a new root):
        # its absolute names are resolved from /proc/<pid>/root, as the child would
        from .plan import _namespaces
        self.in_root = _namespaces(policy) or pidns
        # open_how for the fast resolution: [follow the last link?][stay on the starting mount?]
        root = RESOLVE_IN_ROOT if self.in_root else 0
        self._how_bufs = [ffi.new("uint64_t[3]", [
            os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0), 0,
            RESOLVE_NO_MAGICLINKS | (RESOLVE_NO_XDEV if same else 0) | (root if absolute else 0)])
            for nofollow in (False, True) for same in (False, True) for absolute in (False, True)]
        self._hows = {(nofollow, same, absolute): ffi.cast("long", self._how_bufs[4 * nofollow + 2 * same + absolute])
                      for nofollow in (False, True) for same in (False, True) for absolute in (False, True)}

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
    def _self_names(self, tid: int) -> tuple[int, int]:
        """(tgid, tid) of a child thread as its /proc names them: the host's, or under a pid namespace the
        namespace's (the last NSpid field; the host numbers would name other processes, or none, there)."""
        tgid = tgid_of(tid)
        if not self.pidns:
            return tgid, tid
        return _ns_pid(tgid), _ns_pid(tid)

    def _start_dir(self, n, dirfd: int) -> str | None:
        """The name of the child's cwd (or ``dirfd``) as the child sees it; None if it is no directory or lies
        outside its root."""
        try:
            cur = os.readlink(f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}")
            top = os.readlink(f"/proc/{n.pid}/root") if self.in_root else "/"
        except OSError:
            return None
        if not cur.startswith("/"):
            return None  # not a directory (pipe, socket): ENOTDIR from the kernel
        if top != "/":  # our name of it, made the child's: the part below its root
            if cur != top and not cur.startswith(top + "/"):
                return None
            cur = cur[len(top):] or "/"
        return cur

    def resolve(self, n, dirfd: int, path: bytes) -> str | None:
        """The name the kernel would open for the child, or None if it cannot tell (the kernel answers). Under a
        mount namespace or chroot (``in_root``) absolute names are walked in the child's root (its view)."""
        p = os.fsdecode(path)
        if not p:
            return None
        root = f"/proc/{n.pid}/root" if self.in_root else ""
        if p.startswith("/"):
            cur = "/"
        else:
            cur = self._start_dir(n, dirfd)
            if cur is None:
                return None
        stack = [c for c in reversed(p.split("/")) if c not in ("", ".")]
        links = 0
        ids = None
        while stack:
            c = stack.pop()
            if c == "..":
                cur = os.path.dirname(cur) or "/"
                continue
            if cur == "/proc" and c in _SELF:
                if ids is None:
                    ids = self._self_names(n.pid)
                cur = f"/proc/{ids[0]}" if c == "self" else f"/proc/{ids[0]}/task/{ids[1]}"
                continue
            nxt = (cur if cur != "/" else "") + "/" + c
            try:
                target = os.readlink(root + nxt)
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
            with run.lock:  # a rare read: measured now, not the ledger's upper bound
                run.refresh()
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
    def _fast(self, n, dirfd: int, path: bytes, nofollow: bool = False):
        """The kernel's own resolution in the supervisor, refusing magic links: exact for the child unless it
        went through /proc (``self`` means the supervisor here) or a magic link (ELOOP). Returns the name
        (``OUTSIDE`` for an object on no /proc or /sys mount: no need to name it), False when the path does
        not exist and its walk never left the starting mount (so no /proc/self was involved: the child's open
        fails alike), None when only the exact walk can tell."""
        if self.nr_openat2 is None or not path:
            return None
        base = -1
        absolute = path.startswith(b"/")
        if not absolute and self.in_root:  # walked from its root too: its absolute links are in its view
            start = self._start_dir(n, dirfd)
            if start is None:
                return None
            path, absolute = os.fsencode(start.rstrip("/")) + b"/" + path, True
        try:
            if not absolute or self.in_root:
                where = "root" if absolute else "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}"
                try:
                    base = os.open(f"/proc/{n.pid}/{where}", os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    return None
            # First without leaving the starting mount: most names (libraries, modules) live on the root
            # file system, which is not /proc: found there, they are outside; missing there, exactly absent.
            fd = self._openat2(base, path, self._hows[nofollow, True, absolute])
            if fd == -errno.ENOENT:
                return False
            if fd >= 0 and base < 0:
                os.close(fd)
                return OUTSIDE
            if fd == -errno.EXDEV:
                fd = self._openat2(base, path, self._hows[nofollow, False, absolute])
                if fd == -errno.ENOENT:
                    if self.pidns and b"self" in path:
                        # the sandbox's /proc/self names nothing for us (we are outside its pid namespace):
                        # only the exact walk can tell
                        return None
                    return MISSING  # exact unless the walk went through /proc/self: the caller resolves
            if fd < 0:
                return None
            try:
                dev = os.fstat(fd).st_dev
                if dev not in self.kernel_devs and not (self.pidns and dev == _child_proc_dev(n.pid)):
                    return OUTSIDE
                return os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        finally:
            if base >= 0:
                os.close(base)

    def _openat2(self, base: int, path: bytes, how) -> int:
        """An O_PATH fd or -errno."""
        name = ffi.new("char[]", path)  # held until the call returns: a temporary would be freed before it
        return lib.sl_raw_syscall6(self.nr_openat2, base if base >= 0 else AT_FDCWD,
                                   ffi.cast("long", name), how, 24, 0, 0)

    # ---- /proc/<pid> of the sandbox: opened and read on behalf, decided on the object ----
    def behalf(self, sup) -> "ProcBehalf":
        """The on-behalf opener of this run (fs_denied's, shared with it when both are active)."""
        b = sup.state.get("procfs.behalf")
        if b is None:
            from .fsdeny import Opener
            if "fsdeny.opener" not in sup.state:
                opener = sup.state["fsdeny.opener"] = Opener(self.ruleset_fd)
                sup.on_close(opener.close)
            b = sup.state["procfs.behalf"] = ProcBehalf(self, sup)
        return b

    def _open_pid_entry(self, sup, n, name_syscall: str, name: str, flags: int, mode: int):
        """Open ``name`` (what the child's path resolved to, in /proc/<pid of the sandbox>) on behalf and
        inject the fd: the kernel never re-reads the child's path, and the object opened is checked again,
        so a concurrent rename or symlink swap cannot reach another process's entry."""
        return self.behalf(sup).open_name(sup, n, name_syscall, name, flags, mode)

    def _open(self, sup, n, name_syscall: str, dirfd: int, path_index: int, flags: int, mode: int = 0):
        path = sup.path_arg(n, path_index)
        nofollow = bool(flags & os.O_NOFOLLOW)  # a dangling last link: ELOOP from the kernel, not ENOENT
        name = self._fast(n, dirfd, path, nofollow)
        if name is OUTSIDE:
            return None
        if name is False:  # does not exist: still refuse a sensitive name (same answer on every kernel)
            try:
                lexical = sup.resolve(n, dirfd, path)
            except OSError:
                return None
            if _sensitive(lexical):
                sup.record(name_syscall, n.pid, errno.EACCES, lexical, "a sensitive kernel file: always refused")
                return Errno(errno.EACCES)
            if flags & os.O_CREAT:
                return None
            # Answered here, not continued: the kernel's own lookup would come later, when a link could
            # have appeared (pointing into /proc/<another pid>).
            return Errno(errno.ENOENT)
        missing = name is MISSING
        if name and not missing and not (name.startswith("/proc") or name.startswith("/sys")):
            return None
        name = self._resolve_last(n, dirfd, path, nofollow)
        if name is None or not (name.startswith("/proc") or name.startswith("/sys")):
            if missing and not flags & os.O_CREAT:
                return Errno(errno.ENOENT)  # answered now: see the False case above
            return None
        if _sensitive(name):
            sup.record(name_syscall, n.pid, errno.EACCES, name, "a sensitive kernel file: always refused")
            return Errno(errno.EACCES)
        if self.isolate:
            m = _PID_RE.match(name)
            if m:
                if not self._ours(sup, int(m.group(1))):
                    sup.record(name_syscall, n.pid, errno.ENOENT, name, "isolate_pids hides other processes")
                    return Errno(errno.ENOENT)
                if nofollow and not flags & os.O_PATH and os.path.islink(name):
                    return Errno(errno.ELOOP)  # /proc/<pid>/exe, cwd...: links the kernel made, not swappable
                return self._open_pid_entry(sup, n, name_syscall, name, flags, mode)
        data = self._virtual(sup, name)
        if data is None:
            return None
        return serve_virtual(sup, data, flags, "sandlock-proc")

    def h_open(self, sup, n):
        a = n.data.args
        return self._open(sup, n, "open", AT_FDCWD, 0, s32(a[1]), a[2] & 0o7777)

    def h_openat(self, sup, n):
        a = n.data.args
        return self._open(sup, n, "openat", s32(a[0]), 1, s32(a[2]), a[3] & 0o7777)

    def h_openat2(self, sup, n):
        a = n.data.args
        if a[3] < 16:
            return None
        flags, mode = struct.unpack("=QQ", sup.read_mem(n, a[2], 16))
        return self._open(sup, n, "openat2", s32(a[0]), 1, s32(flags & 0xFFFFFFFF), mode & 0o7777)

    # ---- links: readlink("/proc/<foreign>/exe") ----
    def _readlink(self, sup, n, name_syscall: str, dirfd: int, path_index: int):
        path = sup.path_arg(n, path_index)
        head, _, tail = path.rpartition(b"/")
        parent = self.resolve(n, dirfd, head or (b"/" if path.startswith(b"/") else b"."))
        if parent is None:
            return None
        name = os.path.join(parent, os.fsdecode(tail))
        m = _PID_RE.match(name)
        if not m:
            return None
        if not self._ours(sup, int(m.group(1))):
            sup.record(name_syscall, n.pid, errno.ENOENT, name, "isolate_pids hides other processes")
            return Errno(errno.ENOENT)
        a = n.data.args
        return self.behalf(sup).readlink(sup, n, name_syscall, dirfd, path, a[path_index + 1],
                                         s32(a[path_index + 2]))

    def h_readlink(self, sup, n):
        return self._readlink(sup, n, "readlink", AT_FDCWD, 0)

    def h_readlinkat(self, sup, n):
        return self._readlink(sup, n, "readlinkat", s32(n.data.args[0]), 1)

    # ---- stat and access of /proc/<pid>: the same answer as open (ENOENT for another process) ----
    def _name_of(self, n, dirfd: int, path: bytes, nofollow: bool):
        """What ``path`` names for the child: OUTSIDE, False (absent), or a name (None: cannot tell)."""
        fast = self._fast(n, dirfd, path, nofollow)
        if fast is OUTSIDE or fast is False:
            return fast
        name = self._resolve_last(n, dirfd, path, nofollow)
        if fast is MISSING and not (name and (name.startswith("/proc") or name.startswith("/sys"))):
            return False
        return name

    def _resolve_last(self, n, dirfd: int, path: bytes, nofollow: bool) -> str | None:
        """``resolve``, the last component a link itself when ``nofollow``."""
        if not nofollow:
            return self.resolve(n, dirfd, path)
        head, _, tail = path.rpartition(b"/")
        parent = self.resolve(n, dirfd, head or (b"/" if path.startswith(b"/") else b"."))
        return None if parent is None else os.path.join(parent, os.fsdecode(tail))

    def _stat_like(self, sup, n, syscall: str, dirfd: int, path_index: int, nofollow: bool, buf=None,
                   empty_ok: bool = False):
        """``buf``: (kind, address) where the answer goes when it is made on behalf (a sandbox pid's entry:
        stat'ed here on the object the name resolved to, never re-resolved by the kernel)."""
        addr = n.data.args[path_index]
        if addr == 0 or (empty_ok and sup.read_mem(n, addr, 1) == b"\0"):
            # fstat(fd) through AT_EMPTY_PATH (a NULL path means the same since 6.11): an fd the child holds;
            # one byte read, not a page
            return None
        path = sup.path_arg(n, path_index)
        if not path:
            return None  # ENOENT from the kernel
        name = self._name_of(n, dirfd, path, nofollow)
        if name is False:
            return Errno(errno.ENOENT)  # answered now, as for open (a link appearing later changes nothing)
        if name is None or name is OUTSIDE:
            return None
        m = _PID_RE.match(name)
        if not m:
            return None
        if not self._ours(sup, int(m.group(1))):
            sup.record(syscall, n.pid, errno.ENOENT, name, "isolate_pids hides other processes")
            return Errno(errno.ENOENT)
        return self._stat_on_behalf(sup, n, name, nofollow, buf) if buf is not None else None

    def _stat_on_behalf(self, sup, n, name: str, nofollow: bool, buf):
        try:
            fd = os.open(name, os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))
        except OSError as exc:
            return Errno(exc.errno or errno.ENOENT)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            m = _PID_RE.match(real)
            if m and not self._ours(sup, int(m.group(1))):
                return Errno(errno.ENOENT)
            kind, addr, mask = buf
            out = ffi.new("char[]", 256)
            empty = ffi.new("char[]", b"")
            if kind == "statx":
                r = lib.sl_raw_syscall6(self.nr_statx, fd, ffi.cast("long", empty), AT_EMPTY_PATH, mask,
                                        ffi.cast("long", out), 0)
                size = 256
            else:
                r = lib.sl_raw_syscall6(self.nr_newfstatat, fd, ffi.cast("long", empty), ffi.cast("long", out),
                                        AT_EMPTY_PATH, 0, 0)
                size = STAT_SIZE
            if r < 0:
                return Errno(-r)
            sup.write_mem(n, addr, ffi.buffer(out, size)[:])
            return Value(0)
        finally:
            os.close(fd)

    def h_stat(self, sup, n):
        return self._stat_like(sup, n, "stat", AT_FDCWD, 0, False, ("stat", n.data.args[1], 0))

    def h_lstat(self, sup, n):
        return self._stat_like(sup, n, "lstat", AT_FDCWD, 0, True, ("stat", n.data.args[1], 0))

    def h_newfstatat(self, sup, n):
        a = n.data.args
        flags = s32(a[3])
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_NO_AUTOMOUNT):
            return None  # the kernel answers EINVAL
        return self._stat_like(sup, n, "newfstatat", s32(a[0]), 1, bool(flags & AT_SYMLINK_NOFOLLOW),
                               ("stat", a[2], 0), bool(flags & AT_EMPTY_PATH))

    def h_statx(self, sup, n):
        a = n.data.args
        flags = s32(a[2])
        return self._stat_like(sup, n, "statx", s32(a[0]), 1, bool(flags & AT_SYMLINK_NOFOLLOW),
                               ("statx", a[4], a[3] & 0xFFFFFFFF), bool(flags & AT_EMPTY_PATH))

    def h_access(self, sup, n):
        return self._stat_like(sup, n, "access", AT_FDCWD, 0, False)

    def h_faccessat(self, sup, n):
        return self._stat_like(sup, n, "faccessat", s32(n.data.args[0]), 1, False)

    def h_faccessat2(self, sup, n):
        a = n.data.args
        return self._stat_like(sup, n, "faccessat2", s32(a[0]), 1, bool(s32(a[3]) & AT_SYMLINK_NOFOLLOW))

    # ---- listings ----
    def _getdents(self, sup, n, nr: int, name_off: int):
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


# ---- pid-taking syscalls under isolate_pids: decided on the pid register (the kernel reads the same saved
# register after CONTINUE, so there is nothing to race) ----
# name -> indexes of the pid arguments; 0 there means "the caller" (the filter lets those calls through).
PID_ARGS = {
    "tkill": (0,), "tgkill": (0, 1), "rt_sigqueueinfo": (0,), "rt_tgsigqueueinfo": (0, 1), "pidfd_open": (0,),
    "sched_setaffinity": (0,), "sched_getparam": (0,), "sched_setparam": (0,), "sched_getscheduler": (0,),
    "sched_setscheduler": (0,), "sched_rr_get_interval": (0,), "sched_getattr": (0,), "sched_setattr": (0,),
    "getpgid": (0,), "getsid": (0,), "prlimit64": (0,), "get_robust_list": (0,), "migrate_pages": (0,),
    "move_pages": (0,), "kcmp": (0, 1),
}
# name -> (which argument, which value means "who is a pid", which value means "who is a process group")
WHICH_WHO = {"getpriority": (0, 0, 1), "setpriority": (0, 0, 1), "ioprio_get": (0, 1, 2), "ioprio_set": (0, 1, 2)}
PID_MASK = 0xFFFFFFFF  # pid_t is 32 bits: "the pid argument is not 0"


class PidCalls:
    """ESRCH for a pid outside the sandbox, as if it did not exist. ``kill`` of a process group or of -1 is
    done on behalf over the sandbox's processes only (a group may mix sandbox and host processes)."""

    def __init__(self, procfs: "ProcFs"):
        self.fs = procfs

    def _foreign(self, sup, n, name: str, pid: int) -> bool:
        if pid <= 0 or self.fs._ours(sup, pid):
            return False
        sup.record(name, n.pid, errno.ESRCH, f"pid {pid}", "isolate_pids hides other processes")
        return True

    def by_pid(self, name: str):
        idx = PID_ARGS[name]

        def handler(sup, n):
            for i in idx:
                if self._foreign(sup, n, name, s32(n.data.args[i])):
                    return Errno(errno.ESRCH)
            return None
        return handler

    def by_which(self, name: str):
        which_arg, pid_kind, group_kind = WHICH_WHO[name]

        def handler(sup, n):
            which, who = s32(n.data.args[which_arg]), s32(n.data.args[which_arg + 1])
            if who > 0 and ((which == pid_kind and self._foreign(sup, n, name, who))
                            or (which == group_kind and not self._group(sup, who))):
                return Errno(errno.ESRCH)
            return None
        return handler

    def _group(self, sup, pgid: int) -> list[int]:
        """The sandbox's processes in process group ``pgid``."""
        out = []
        for pid in self.fs._pids(sup, fresh=True):
            f = stat_fields(pid)
            if f is not None and int(f[2]) == pgid:
                out.append(pid)
        return out

    def h_setpgid(self, sup, n):
        pid, pgid = s32(n.data.args[0]), s32(n.data.args[1])
        if self._foreign(sup, n, "setpgid", pid):
            return Errno(errno.ESRCH)
        if pgid > 0 and pgid != (pid or tgid_of(n.pid)) and not self._group(sup, pgid):
            return Errno(errno.EPERM)  # joining a host process group: "no such group in this session"
        return None

    def h_kill(self, sup, n):
        pid, sig = s32(n.data.args[0]), s32(n.data.args[1])
        if pid > 0:
            return Errno(errno.ESRCH) if self._foreign(sup, n, "kill", pid) else None
        caller = tgid_of(n.pid)
        if pid == -1:
            targets = [p for p in self.fs._pids(sup, fresh=True) if p != caller]
        elif pid == 0:  # the caller's group: the sandbox may share it with its caller (run_foreground on a tty)
            f = stat_fields(caller)
            if f is None:
                return Errno(errno.ESRCH)
            targets = self._group(sup, int(f[2]))
        else:
            targets = self._group(sup, -pid)
        return self._kill_on_behalf(n.pid, targets, sig)

    @staticmethod
    def _kill_on_behalf(tid: int, targets: list[int], sig: int):
        """kill(2) of a group or of -1, limited to the sandbox, with the kernel's permission rule: the
        sender has CAP_KILL or its real or effective uid is the target's real or saved uid."""
        if not 0 <= sig <= 64:
            return Errno(errno.EINVAL)
        me = _ids(tid)
        if me is None:
            return Errno(errno.ESRCH)
        sent = denied = 0
        for pid in targets:
            them = _ids(pid)
            if them is None:
                continue
            if not me[1] and not ({me[0][0], me[0][1]} & {them[0][0], them[0][2]}):
                denied += 1
                continue
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                continue
            except PermissionError:
                denied += 1
        if sent:
            return Value(0)
        return Errno(errno.EPERM if denied else errno.ESRCH)


# ---- the owner of an fd's signals (fcntl F_SETOWN/F_SETOWN_EX, ioctl FIOSETOWN/SIOCSPGRP) under isolate_pids:
# with O_ASYNC (or a lease, dnotify) the kernel signals the owner, so an owner outside the sandbox is a way to
# signal a host process without kill(2) ----
F_SETOWN, F_SETOWN_EX = 8, 15
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
INT_MIN = -(1 << 31)
U32 = 0xFFFFFFFF  # the command is an unsigned int: compared whole


class OwnerCalls:
    """ESRCH for an owner outside the sandbox: a pid or thread not the sandbox's, or a process group with any
    host process in it (run_foreground on a tty leaves the sandbox in its caller's group). F_SETOWN's owner
    is a register (decided, then continued); the others' are in child memory: read once, decided, and the
    call done on behalf on a duplicate of the fd (same open file description) with the value read."""

    def __init__(self, pid_calls: PidCalls):
        self.calls = pid_calls
        self.fs = pid_calls.fs

    def _foreign_owner(self, sup, n, name: str, who: int) -> bool:
        """``who``: a pid, or minus a process group (F_SETOWN's convention)."""
        if who == 0 or who == INT_MIN:
            return False  # 0 clears the owner; INT_MIN: the kernel answers EINVAL
        if who > 0:
            return self.calls._foreign(sup, n, name, who)
        who = -who
        if self._group_is_ours(sup, who):
            return False
        sup.record(name, n.pid, errno.ESRCH, f"process group {who}", "isolate_pids hides other processes")
        return True

    def _group_is_ours(self, sup, pgid: int) -> bool:
        """Every member of process group ``pgid`` is a sandbox process (and there is one)."""
        ours = self.calls._group(sup, pgid)
        if not ours:
            return False
        mine = set(ours) | self.fs._pids(sup)
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in mine:
                f = stat_fields(int(name))
                if f is not None and int(f[2]) == pgid:
                    return False
        return True

    def h_fcntl(self, sup, n):
        a = n.data.args
        cmd = a[1] & 0xFFFFFFFF
        if cmd == F_SETOWN:
            who = s32(a[2])
            return Errno(errno.ESRCH) if self._foreign_owner(sup, n, "fcntl", who) else None
        if cmd != F_SETOWN_EX:
            return None
        raw = _copy_arg(sup, n, a[2], 8)
        if type(raw) is Errno:
            return raw
        kind, who = struct.unpack("=ii", raw)
        if kind in (F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP) and who > 0 and self._foreign_owner(
                sup, n, "fcntl", -who if kind == F_OWNER_PGRP else who):
            return Errno(errno.ESRCH)
        return self._on_behalf(sup, n, lambda fd: fcntl_mod().fcntl(fd, F_SETOWN_EX, raw))

    def h_ioctl(self, sup, n):
        a = n.data.args
        cmd = a[1] & 0xFFFFFFFF
        if cmd not in (FIOSETOWN, SIOCSPGRP):
            return None
        raw = _copy_arg(sup, n, a[2], 4)
        if type(raw) is Errno:
            return raw
        who = struct.unpack("=i", raw)[0]
        if self._foreign_owner(sup, n, "ioctl", who):
            return Errno(errno.ESRCH)
        return self._on_behalf(sup, n, lambda fd: fcntl_mod().ioctl(fd, cmd, raw))

    @staticmethod
    def _on_behalf(sup, n, call):
        """The owner's credentials are the setter's (the kernel checks them when it signals): done on behalf
        only for a caller with the supervisor's uids, refused (EPERM) otherwise."""
        me = _ids(n.pid)
        if me is None:
            return Errno(errno.ESRCH)
        if me[0][:2] != (os.getuid(), os.geteuid()):
            return Errno(errno.EPERM)
        try:
            dup = sup.dup_child_fd(n, s32(n.data.args[0]))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise
            return Errno(errno.EBADF)
        try:
            call(dup)
        except OSError as exc:
            return Errno(exc.errno or errno.EPERM)
        finally:
            os.close(dup)
        return Value(0)


def fcntl_mod():
    import fcntl  # only under isolate_pids, at the first owner change
    return fcntl


def _ids(pid: int):
    """((ruid, euid, suid), has CAP_KILL) of a process, from /proc/PID/status; None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    uid = cap = None
    for line in data.split(b"\n"):
        if line.startswith(b"Uid:"):
            uid = tuple(int(x) for x in line.split()[1:4])
        elif line.startswith(b"CapEff:"):
            cap = int(line.split()[1], 16)
    if uid is None or cap is None:
        return None
    return uid, bool(cap & (1 << 5))


class ProcBehalf:
    """fs_denied's on-behalf open (fsdeny.FsDeny: the child's view of /proc/self, magic links refused, the
    opener thread carrying the sandbox's Landlock domain) with one deny rule: an object under
    /proc/<pid of another process>, answered ENOENT."""

    def __init__(self, procfs: "ProcFs", sup):
        from types import SimpleNamespace
        from .fsdeny import FsDeny
        self.fs, self.sup = procfs, sup
        self.opener = FsDeny(SimpleNamespace(fs_denied=()), procfs.ruleset_fd)
        self.opener.deny = self  # FsDeny asks self.denied() about the object it opened
        self.opener._record = self._record

    def denied(self, real: str, st=None, fd: int = -1) -> bool:
        m = _PID_RE.match(real)
        return bool(m) and not self.fs._ours(self.sup, int(m.group(1)))

    @staticmethod
    def _record(sup, n, name: str, path: str):
        sup.record(name, n.pid, errno.ENOENT, path, "isolate_pids hides other processes")
        return Errno(errno.ENOENT)

    def open_name(self, sup, n, syscall: str, name: str, flags: int, mode: int):
        try:
            return self.opener._open_on_behalf(sup, n, syscall, AT_FDCWD, os.fsencode(name), flags, mode, 0)
        except OSError as exc:  # what the kernel said to our on-behalf open is the child's answer
            return Errno(exc.errno or errno.EACCES)

    def readlink(self, sup, n, name: str, dirfd: int, path: bytes, buf: int, size: int):
        """readlink(2) on behalf: the parent directory is opened as the child would resolve it, checked, and
        the link read from that very directory."""
        if size <= 0:
            return Errno(errno.EINVAL)
        head, _, tail = path.rpartition(b"/")
        head = head or (b"/" if path.startswith(b"/") else b".")
        base = AT_FDCWD
        try:
            if not head.startswith(b"/"):
                base, _ = self.opener._base(sup, n, dirfd)
            parent, child_fd = self.opener._locate(sup, n, base, head, 0)
            parent = child_fd if child_fd >= 0 else parent
            if parent is None:
                return Errno(errno.ENOENT)
            try:
                real = os.readlink(f"/proc/self/fd/{parent}")
                if self.denied(real):
                    return self._record(sup, n, name, real)
                target = os.readlink(tail, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        finally:
            if base != AT_FDCWD:
                os.close(base)
        data = os.fsencode(target)[:size]
        sup.write_mem(n, buf, data)
        return Value(len(data))


def _copy_arg(sup, n, addr: int, size: int):
    """The argument's bytes, copied once (what the on-behalf call then uses), or Errno(EFAULT); a stale
    notification (ESRCH) propagates and fails closed."""
    try:
        return sup.read_mem(n, addr, size)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise
        return Errno(errno.EFAULT)


# The C fast path (native.c, sl_proc_wait_recv): the syscalls it may answer, and how their arguments are laid out.
FAST_KINDS = {"stat": 1, "lstat": 2, "access": 3, "newfstatat": 4, "statx": 5, "faccessat": 6, "faccessat2": 7,
              "open": 8, "openat": 9}


class FastPath:
    """Absolute names whose walk stays on the root file system are answered in C (continue, or ENOENT when
    absent), and listings of directories other than /proc's root are read on behalf in C: exactly what the Python
    handlers answer for them, without the trip through Python. Only for syscalls whose whole handler chain is
    procfs's, and not under a mount namespace (the child's / differs)."""

    def __init__(self, procfs: "ProcFs", policy, arch: str):
        from . import syscalls
        from .policy import FsIsolation
        self.fs = procfs
        self.audit_arch = syscalls.AUDIT_ARCH[arch]
        self.nrs = {name: nr for name in FAST_KINDS if (nr := syscalls.number(name, arch)) is not None}
        # listings of directories other than /proc's root; not with deterministic_dirs (sorted in Python)
        self.nr_getdents64 = None if policy.deterministic_dirs else syscalls.number("getdents64", arch)
        self.usable = not (policy.chroot is not None or policy.privileged
                           or policy.fs_isolation is FsIsolation.OVERLAYFS)

    def prepare(self, sup) -> None:
        """Before the fork (made now, the context costs no copy-on-write faults): the C receive loop of this run.
        procfs comes first in plan.MECHANISMS, so no other fast path was set before it (deterministic's, set
        later, then stands aside)."""
        if not self.usable or sup.recv_fast is not None:
            return  # another mechanism's C path owns the receive loop: the Python handlers answer
        ctx = ffi.new("struct sl_proc_fast *")
        for name, nr in self.nrs.items():
            chain = sup.handlers.get(nr)
            if chain is None or len(chain) != 1 or chain[0] != getattr(self.fs, f"h_{name}"):
                continue
            ctx.nr[ctx.n], ctx.kind[ctx.n] = nr, FAST_KINDS[name]
            ctx.n += 1
        nr = self.nr_getdents64
        ctx.nr_getdents64 = nr if nr is not None and sup.handlers.get(nr) == (self.fs.h_getdents64,) else -1
        ctx.proc_dev, ctx.proc_ino = max(self.fs.proc_dev, 0), PROC_ROOT_INO
        if ctx.n or ctx.nr_getdents64 >= 0:
            ctx.arch = self.audit_arch
            sup.recv_fast = (lib.sl_proc_wait_recv, ctx)
            sup.state["procfs.fast"] = ctx  # kept alive for the loop

    @staticmethod
    def finish(sup, result) -> None:
        ctx = sup.state.get("procfs.fast") if sup is not None else None
        if ctx is not None and hasattr(result, "notifications"):
            result.notifications += ctx.served


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


def _install_pidns(builder) -> None:
    """The pid namespace's own needs: its mounts stay closed to the program, and the policy's Landlock rules on
    /proc follow it to the new /proc."""
    from . import syscalls
    from .namespaces import MOUNT_SYSCALLS
    for name in MOUNT_SYSCALLS:  # the program holds capabilities in its user namespace: no mount, no chroot
        nr = syscalls.number(name, builder.arch)
        if nr is not None:
            builder.extra_deny[nr] = errno.EPERM
    rules = proc_rules(builder.policy)
    if rules:
        builder.on_cfg(lambda cfg, keep: _fill_proc_rules(builder.policy, rules, cfg, keep))


def proc_rules(policy) -> list[tuple[str, bool, bool]]:
    """(name, writable, is_dir) of the fs_readable/fs_writable paths at or under /proc. Landlock rules are on
    inodes: those name the caller's procfs, not the sandbox's new one. A /proc/<pid> name (``/proc/self``
    resolves to the caller's pid) names a process outside the namespace: dropped."""
    out = []
    for writable, paths in ((False, policy.fs_readable), (True, policy.fs_writable)):
        for p in paths:
            real = os.path.realpath(p)
            if real != "/proc" and not real.startswith("/proc/"):
                continue
            if real[len("/proc/"):].split("/")[0].isdigit():
                continue
            out.append((real, writable, os.path.isdir(real)))
    return out


def _fill_proc_rules(policy, rules, cfg, keep) -> None:
    """This run's own ruleset (the plan's, rebuilt: the child adds rules for inodes of its new /proc, which
    would pile up on the shared one) and the rules the child adds. No ruleset: nothing to add to."""
    if cfg.landlock_fd < 0:
        return
    import types
    from . import landlock
    from .plan import Plan
    info = Plan._build_landlock(types.SimpleNamespace(best_effort=True, missing=[]), policy)
    if info is None or info.fd < 0 or not info.handled_fs:
        return  # the plan's ruleset stays: the new /proc is then refused (fail closed)
    keep.append(info)  # closed when the spawn is done with cfg (the child has its copy)
    merged: dict[str, int] = {}
    for name, writable, is_dir in rules:
        rights = landlock.write_rights(info.abi) if writable else landlock.READ_RIGHTS
        merged[name] = merged.get(name, 0) | landlock.rights_for(rights & info.handled_fs, is_dir)
    names = [ffi.new("char[]", os.fsencode(n)) for n in merged]
    keep.extend(names)
    arr = ffi.new("char *[]", names)
    rights_arr = ffi.new("uint64_t[]", list(merged.values()))
    keep.extend((arr, rights_arr))
    cfg.landlock_fd = info.fd
    cfg.ns_proc_paths, cfg.ns_proc_rights, cfg.n_ns_proc = arr, rights_arr, len(merged)


def wanted(policy) -> bool:
    return policy.isolate_pids or policy.num_cpus is not None or policy.max_memory is not None


def install(builder) -> None:
    policy = builder.policy
    pidns = getattr(builder, "pidns", False)
    fs = ProcFs(policy, builder.arch, pidns)
    fs.ruleset_fd = builder.ruleset_fd
    fast = FastPath(fs, policy, builder.arch)
    builder.on_prepare(fast.prepare)
    builder.on_finish(fast.finish)
    builder.notify("open", fs.h_open)
    builder.notify("openat", fs.h_openat)
    builder.notify("openat2", fs.h_openat2)
    if pidns:
        # The kernel does the rest (native.c "pid namespace"): listings, /proc/<pid>, kill & co. see only the
        # sandbox. Opens stay notified for the sensitive files (and meminfo/cpuinfo when they are virtual).
        if policy.num_cpus is not None:
            builder.notify("sched_getaffinity", fs.h_sched_getaffinity)
        _install_pidns(builder)
        return
    if policy.isolate_pids:
        builder.notify("getdents64", fs.h_getdents64)
        builder.notify("getdents", fs.h_getdents)
        builder.notify("readlink", fs.h_readlink)
        builder.notify("readlinkat", fs.h_readlinkat)
    if policy.num_cpus is not None:
        builder.notify("sched_getaffinity", fs.h_sched_getaffinity)  # every call: the mask is virtual
    elif policy.isolate_pids:
        builder.notify("sched_getaffinity", fs.h_sched_getaffinity, when=(0, PID_MASK))
    if policy.isolate_pids:
        calls = PidCalls(fs)
        for name, idx in PID_ARGS.items():  # pid 0 is the caller itself: the filter lets it through
            builder.notify(name, calls.by_pid(name), when=(idx[0], PID_MASK))
        for name in WHICH_WHO:
            builder.notify(name, calls.by_which(name), when=(WHICH_WHO[name][0] + 1, PID_MASK))
        builder.notify("kill", calls.h_kill)  # kill(0) too: the caller's group may hold host processes
        owners = OwnerCalls(calls)
        for name in ("fcntl", "fcntl64"):  # False: no such syscall on this arch
            builder.notify(name, owners.h_fcntl, when=((1, U32, F_SETOWN), (1, U32, F_SETOWN_EX)))
        builder.notify("ioctl", owners.h_ioctl, when=((1, U32, FIOSETOWN), (1, U32, SIOCSPGRP)))
        builder.notify("setpgid", calls.h_setpgid)
        for name in ("stat", "lstat", "access"):
            builder.notify(name, getattr(fs, f"h_{name}"))
        for name in ("newfstatat", "statx", "faccessat", "faccessat2"):  # a NULL path names no /proc entry
            builder.notify(name, getattr(fs, f"h_{name}"), when=(1, (1 << 64) - 1))
