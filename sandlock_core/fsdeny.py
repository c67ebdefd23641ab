"""``fs_denied``: paths refused even inside an allowed tree.

Landlock rights only add up, so a hole in an allowed tree has to be cut by the supervisor. Denial is decided
by path (the resolved path is under a denied directory or is a denied file) and by inode (dev, ino captured
at start, so a hard link or a rename does not launder a denied file).

Opens are performed on behalf of the child and the fd injected (ADDFD with SEND): the decision is made on
the very file that is opened, so swapping a symlink between check and use achieves nothing. The opens run on
an *opener thread* that carries the sandbox's own Landlock domain, so an on-behalf open can never reach what
the child itself could not. A FIFO open (which blocks until a peer comes) is finished on a worker thread
while the supervisor goes on: the supervisor loop never blocks.

Two layers. Inside read-only trees the holes are also carved out of the Landlock ruleset itself
(``landlock._carve_rules``): the kernel refuses reads and execs there, with no check-then-use window.
Residual risk, writable trees only (a carved directory could get no new entries, so those are not carved):
exec, unlink, rename, link and truncate are checked on the resolved path and then CONTINUE; a concurrent
symlink swap in a parent directory could race that check. Landlock still bounds what the child can reach.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import threading

from . import _sys
from .notif import CONTINUE, DEFERRED, Errno, InjectFd, Value, tgid_of

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_REMOVEDIR = 0x200
O_PATH = os.O_PATH
OPEN_TIMEOUT = 10.0  # seconds the supervisor waits for the opener thread before failing closed


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class DenySet:
    """The denied paths, as resolved paths and as (dev, ino) identities."""

    def __init__(self, paths):
        self.files: set[str] = set()
        self.dirs: list[str] = []
        self.inodes: set[tuple[int, int]] = set()
        self.dir_inodes: set[tuple[int, int]] = set()
        for p in paths:
            real = os.path.realpath(p)
            try:
                st = os.stat(real)
            except FileNotFoundError:
                self.files.add(real)  # deny creating it too
                continue
            self.inodes.add((st.st_dev, st.st_ino))
            if stat.S_ISDIR(st.st_mode):
                self.dirs.append(real.rstrip("/") + "/")
                self.dir_inodes.add((st.st_dev, st.st_ino))
            self.files.add(real)

    def path_denied(self, real: str) -> bool:
        if real in self.files:
            return True
        probe = real + "/"
        return any(probe.startswith(d) for d in self.dirs)

    def denied(self, real: str, st: os.stat_result | None, fd: int = -1) -> bool:
        """By inode, by path, and by the inode of every directory above the object: renaming an ancestor
        of a denied directory moves the hole, it does not fill it. ``fd`` (O_PATH of the object) walks the
        real parents; without it the resolved path's ancestors are stat'ed."""
        if st is not None and (st.st_dev, st.st_ino) in self.inodes:
            return True
        if self.path_denied(real):
            return True
        if not self.dir_inodes:
            return False
        return self._ancestor_denied(fd, st) if fd >= 0 else self._ancestor_path_denied(real)

    def _ancestor_denied(self, fd: int, st: os.stat_result | None) -> bool:
        try:
            if st is not None and stat.S_ISDIR(st.st_mode):
                cur = os.dup(fd)
            else:  # a file has no "..": start from the directory its current name is in
                name = os.readlink(f"/proc/self/fd/{fd}")
                cur = os.open(os.path.dirname(name) or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                st0 = os.fstat(cur)
                if (st0.st_dev, st0.st_ino) in self.dir_inodes:
                    os.close(cur)
                    return True
        except OSError:
            return False
        try:
            prev = os.fstat(cur)
            for _ in range(256):
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = parent
                st = os.fstat(cur)
                if (st.st_dev, st.st_ino) in self.dir_inodes:
                    return True
                if (st.st_dev, st.st_ino) == (prev.st_dev, prev.st_ino):
                    return False  # the root
                prev = st
            return True  # deeper than any real tree: refuse
        except OSError:
            return False
        finally:
            os.close(cur)

    def _ancestor_path_denied(self, real: str) -> bool:
        p = real
        while p not in ("/", ""):
            p = os.path.dirname(p)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in self.dir_inodes:
                return True
        return False


class Opener:
    """A thread confined by the sandbox's Landlock ruleset that performs opens on the child's behalf.

    The thread starts at the first ``call``: most runs (a confined test, a build that never touches a
    gated path) never need it, and starting one costs about a millisecond and two thread hand-offs.
    """

    def __init__(self, ruleset_fd: int):
        self._ruleset_fd = os.dup(ruleset_fd) if ruleset_fd >= 0 else -1
        self._start_lock = threading.Lock()
        self._q = None
        self._closed = False
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _start(self):
        import queue  # here: a read-only policy imports this module but never opens on behalf (CLI start-up)
        with self._start_lock:
            if self._q is None:
                if self._closed:
                    raise OSError(errno.EACCES, "the sandbox is over")
                self._q = queue.Queue()
                threading.Thread(target=self._main, name="sandlock-opener", daemon=True).start()
        if not self._ready.wait(5):
            raise OSError(errno.EACCES, "the on-behalf thread did not start")
        if self._error is not None:
            raise OSError(errno.EACCES, f"the on-behalf thread could not enter the sandbox: {self._error}")

    def _main(self):
        try:
            if self._ruleset_fd >= 0:
                _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)  # per thread: the caller's other threads are untouched
                _sys.landlock_restrict_self(self._ruleset_fd)
        except BaseException as exc:  # pragma: no cover - Landlock refused on this thread
            self._error = exc
            self._ready.set()
            return
        finally:
            self._close_ruleset()
        self._ready.set()
        while True:
            job = self._q.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box.append(("ok", fn()))
            except OSError as exc:
                box.append(("err", exc))
            except BaseException as exc:  # never let the thread die: fail closed for this request
                box.append(("err", OSError(errno.EACCES, repr(exc))))
            done.set()

    def _close_ruleset(self):
        fd, self._ruleset_fd = self._ruleset_fd, -1
        if fd >= 0:
            os.close(fd)

    def call(self, fn, timeout: float = OPEN_TIMEOUT):
        """Run fn on the confined thread; OSError(EACCES) if it does not finish in time (fail closed)."""
        if not self._ready.is_set():
            self._start()
        box: list = []
        done = threading.Event()
        self._q.put((fn, box, done))
        if not done.wait(timeout):
            raise OSError(errno.EACCES, "on-behalf operation timed out")
        kind, val = box[0]
        if kind == "err":
            raise val
        return val

    def close(self):
        with self._start_lock:
            self._closed = True
            if self._q is None:
                self._close_ruleset()  # never started: nothing else holds the fd
                return
        self._q.put(None)


class FsDeny:
    def __init__(self, policy, ruleset_fd: int):
        self.deny = DenySet(policy.fs_denied)
        self.ruleset_fd = ruleset_fd
        self.opener: Opener | None = None

    # ---- helpers ----
    def _base(self, sup, n, dirfd: int) -> tuple[int, str]:
        """An O_PATH fd and path for the directory a relative path of the child starts from."""
        if dirfd == AT_FDCWD:
            fd = os.open(f"/proc/{n.pid}/cwd", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = sup.dup_child_fd(n, dirfd)
        return fd, os.readlink(f"/proc/self/fd/{fd}")

    def _resolve_nofollow(self, sup, n, dirfd: int, path: bytes) -> str:
        """The resolved path of a name, following every component but the last."""
        p = os.fsdecode(path)
        if not p.startswith("/"):
            base_fd, base = self._base(sup, n, dirfd)
            os.close(base_fd)
            p = os.path.join(base, p)
        head, tail = os.path.split(p.rstrip("/") or "/")
        return os.path.join(os.path.realpath(head or "/"), tail)

    def _record(self, sup, n, name: str, path: str):
        sup.record(name, n.pid, errno.EACCES, path, f"remove {path!r} from fs_denied")
        return Errno(errno.EACCES)

    # ---- open family: on behalf ----
    def open_common(self, sup, n, name: str, dirfd: int, path_addr: int, flags: int, mode: int, resolve: int = 0):
        path = sup.read_cstr(n, path_addr)
        base_fd = AT_FDCWD
        if not path.startswith(b"/"):
            base_fd, _ = self._base(sup, n, dirfd)
        try:
            return self._open_on_behalf(sup, n, name, base_fd, path, flags, mode, resolve)
        except OSError as exc:  # what the kernel said to our on-behalf open is the child's answer
            return Errno(exc.errno or errno.EACCES)
        finally:
            if base_fd != AT_FDCWD:
                os.close(base_fd)

    # ---- the child's view of /proc/self ----
    # An on-behalf open runs in *our* process: "/proc/self" would name the supervisor, and a magic link
    # such as /dev/stdin -> /proc/self/fd/0 would reach the supervisor's fds. So: literal /proc/self and
    # /proc/thread-self are rewritten to the child's pid, the lookup refuses magic links, a path that ends
    # in the child's own /proc/<pid>/fd/N is served from a duplicate of that fd, and nothing may resolve
    # into the supervisor's own /proc/<pid>.
    @staticmethod
    def _tgid(tid: int) -> int:
        return tgid_of(tid)

    @staticmethod
    def _rewrite_self(path: bytes, tgid: int, tid: int) -> bytes:
        for prefix, repl in ((b"/proc/thread-self", b"/proc/%d/task/%d" % (tgid, tid)),
                             (b"/proc/self", b"/proc/%d" % tgid)):
            if path == prefix or path.startswith(prefix + b"/"):
                return repl + path[len(prefix):]
        return path

    @staticmethod
    def _child_resolve(path: str, base: str, tgid: int, tid: int):
        """Resolve symlinks as the child would see them; ('fd', N) for its own /proc/<pid>/fd/N."""
        import re
        parts = [c for c in path.split("/")]
        cur = "/" if path.startswith("/") else base
        hops = 0
        while parts:
            c = parts.pop(0)
            if c in ("", "."):
                continue
            if c == "..":
                cur = os.path.dirname(cur) or "/"
                continue
            nxt = os.path.join(cur, c)
            if nxt == "/proc/self":
                nxt = f"/proc/{tgid}"
            elif nxt == "/proc/thread-self":
                nxt = f"/proc/{tgid}/task/{tid}"
            m = re.match(r"^/proc/(\d+)(?:/task/\d+)?/fd/(\d+)$", nxt)
            if m and int(m.group(1)) in (tgid, tid):
                if parts:
                    raise OSError(errno.ENOTDIR, "not a directory")
                return "fd", int(m.group(2))
            try:
                target = os.readlink(nxt)
            except OSError:
                cur = nxt
                continue
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, "too many levels of symbolic links")
            parts[:0] = target.split("/")
            if target.startswith("/"):
                cur = "/"
        return "path", cur

    def _locate(self, sup, n, base_fd, path: bytes, flags: int):
        """(O_PATH fd or None if missing, dup of a child fd or -1)."""
        nofollow = flags & os.O_NOFOLLOW
        tid = n.pid
        tgid = self._tgid(tid)
        path = self._rewrite_self(path, tgid, tid)

        def lookup(p, d):
            try:
                return _sys.openat2(d, p, O_PATH | os.O_CLOEXEC | nofollow, 0, _sys.RESOLVE_NO_MAGICLINKS)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
                return None

        own = (b"/proc/%d/" % tgid, b"/proc/%d/" % tid)
        mine = f"/proc/{os.getpid()}"

        def in_the_supervisor(fd) -> bool:
            real = os.readlink(f"/proc/self/fd/{fd}")
            return real == mine or real.startswith(mine + "/")

        def as_the_child():
            """Walk the symlinks with the child's /proc/self (e.g. /etc/mtab -> ../proc/self/mounts)."""
            base = os.readlink(f"/proc/self/fd/{base_fd}") if base_fd != AT_FDCWD else "/"
            kind, val = self._child_resolve(os.fsdecode(path), base, tgid, tid)
            if kind == "fd":
                try:
                    return None, sup.dup_child_fd(n, val)
                except OSError as e:  # no such fd: what the kernel says for /proc/<pid>/fd/N
                    raise OSError(errno.ENOENT if e.errno == errno.EBADF else e.errno, "no such fd") from None
            return sup.state["fsdeny.opener"].call(lambda: lookup(val, AT_FDCWD)), -1

        try:
            if path.startswith(own):  # the child's own /proc entries: the opener's domain cannot see them
                raise OSError(errno.ELOOP, "resolve in the child's view")
            fd = sup.state["fsdeny.opener"].call(lambda: lookup(path, base_fd))
            if fd is not None and in_the_supervisor(fd):  # a symlink on the way named /proc/self
                os.close(fd)
                fd, child_fd = as_the_child()
                if child_fd >= 0:
                    return None, child_fd
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            fd, child_fd = as_the_child()
            if child_fd >= 0:
                return None, child_fd
        if fd is not None and in_the_supervisor(fd):
            os.close(fd)
            raise OSError(errno.EACCES, "the supervisor's /proc entries are not the child's")
        return fd, -1

    def _open_on_behalf(self, sup, n, name, base_fd, path, flags, mode, resolve):
        acc_flags = flags & ~(os.O_CLOEXEC)
        opath, child_fd = self._locate(sup, n, base_fd, path, flags)
        if child_fd >= 0:  # the child's own /proc/<pid>/fd/N: reopen a duplicate of that fd
            opath = child_fd
        if opath is None:  # creating: judge the name it will have
            target = self._resolve_created(base_fd, path)
            if self.deny.denied(target, None):
                return self._record(sup, n, name, target)
            umask = self._child_umask(n.pid)

            def create():
                fd = os.open(path, acc_flags | os.O_CLOEXEC, mode & ~umask & 0o7777, dir_fd=base_fd)
                return fd

            fd = sup.state["fsdeny.opener"].call(create)
            return InjectFd(fd, bool(flags & os.O_CLOEXEC))
        owned = True
        try:
            real = os.readlink(f"/proc/self/fd/{opath}")
            st = os.fstat(opath)
            if self.deny.denied(real, st, opath):
                return self._record(sup, n, name, real)
            if flags & os.O_CREAT and flags & os.O_EXCL:
                return Errno(errno.EEXIST)
            reopen_flags = acc_flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
            if stat.S_ISFIFO(st.st_mode) and not flags & os.O_NONBLOCK:
                owned = False  # the worker closes it
                return self._open_fifo(sup, n, opath, reopen_flags, flags)
            fd = sup.state["fsdeny.opener"].call(lambda: os.open(f"/proc/self/fd/{opath}", reopen_flags | os.O_CLOEXEC))
            return InjectFd(fd, bool(flags & os.O_CLOEXEC))
        finally:
            if owned:
                os.close(opath)

    def _open_fifo(self, sup, n, opath, reopen_flags, flags):
        """A blocking FIFO open waits for its peer: finish it on a worker, answer later (DEFERRED). The wait
        is registered so the end of the run can release it (by opening the other end) instead of leaving a
        blocked thread behind when the child is gone."""
        notif_id, pid = n.id, n.pid
        pending = sup.state.setdefault("fsdeny.fifos", {})
        key = object()
        pending[key] = (opath, reopen_flags)

        def work():
            try:
                fd = self._fifo_open(opath, reopen_flags)
                sup.respond(notif_id, InjectFd(fd, bool(flags & os.O_CLOEXEC)), pid)
            except OSError as exc:
                sup.respond(notif_id, Errno(exc.errno or errno.EACCES), pid)
            finally:
                pending.pop(key, None)
                os.close(opath)

        threading.Thread(target=work, name="sandlock-fifo-open", daemon=True).start()
        return DEFERRED

    @staticmethod
    def release_fifo_waits(sup) -> None:
        """Open the other end of every FIFO a worker still waits on, so its open returns and it exits."""
        for opath, flags in list(sup.state.get("fsdeny.fifos", {}).values()):
            other = os.O_WRONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDONLY
            try:
                os.close(os.open(f"/proc/self/fd/{opath}", other | os.O_NONBLOCK | os.O_CLOEXEC))
            except OSError:
                pass

    def _fifo_open(self, opath: int, flags: int) -> int:
        # A dedicated confined thread per FIFO open: it may block for as long as the peer takes.
        fifo_opener = Opener(self.ruleset_fd)
        try:
            return fifo_opener.call(lambda: os.open(f"/proc/self/fd/{opath}", flags | os.O_CLOEXEC),
                                    timeout=24 * 3600)
        finally:
            fifo_opener.close()

    @staticmethod
    def _child_umask(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Umask:"):
                        return int(line.split()[1], 8)
        except OSError:
            pass
        return 0o022

    @staticmethod
    def _resolve_created(base_fd: int, path: bytes) -> str:
        p = os.fsdecode(path)
        if not p.startswith("/"):
            p = os.path.join(os.readlink(f"/proc/self/fd/{base_fd}"), p)
        head, tail = os.path.split(p)
        return os.path.join(os.path.realpath(head or "/"), tail)

    # ---- handlers ----
    def h_open(self, sup, n):
        a = n.data.args
        return self.open_common(sup, n, "open", AT_FDCWD, a[0], _s32(a[1]), a[2])

    def h_creat(self, sup, n):
        a = n.data.args
        return self.open_common(sup, n, "creat", AT_FDCWD, a[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC, a[1])

    def h_openat(self, sup, n):
        a = n.data.args
        return self.open_common(sup, n, "openat", _s32(a[0]), a[1], _s32(a[2]), a[3])

    def h_openat2(self, sup, n):
        a = n.data.args
        size = a[3]
        if size < 24:
            return Errno(errno.EINVAL)
        flags, mode, resolve = struct.unpack("=QQQ", sup.read_mem(n, a[2], 24))
        if resolve:
            # RESOLVE_* semantics are not reproduced on behalf: refuse rather than guess (fail closed).
            return Errno(errno.EACCES)
        return self.open_common(sup, n, "openat2", _s32(a[0]), a[1], _s32(flags), mode)

    def _check_exec(self, sup, n, name, dirfd, path_addr, flags):
        if flags & AT_EMPTY_PATH:
            fd = sup.dup_child_fd(n, dirfd)
            try:
                real, st = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
            finally:
                os.close(fd)
        else:
            path = sup.read_cstr(n, path_addr)
            p = os.fsdecode(path)
            if not p.startswith("/"):
                base_fd, base = self._base(sup, n, dirfd)
                os.close(base_fd)
                p = os.path.join(base, p)
            real = os.path.realpath(p)
            try:
                st = os.stat(real)
            except OSError:
                st = None
        if self.deny.denied(real, st):
            return self._record(sup, n, name, real)
        return CONTINUE

    def h_execve(self, sup, n):
        return self._check_exec(sup, n, "execve", AT_FDCWD, n.data.args[0], 0)

    def h_execveat(self, sup, n):
        a = n.data.args
        return self._check_exec(sup, n, "execveat", _s32(a[0]), a[1], _s32(a[4]))

    # ---- names (unlink, rename, link, truncate, mkdir, mknod, symlink): on behalf ----
    # Checking the path string and then letting the kernel re-read it would let a thread flip the string in
    # between. So each name is resolved once to (its parent directory as an O_PATH fd, its last component),
    # judged, and the operation is done on behalf on that parent fd, on the thread carrying the sandbox's
    # Landlock domain: what is judged is what is changed.
    def _parent_and_name(self, sup, n, dirfd: int, raw: bytes):
        tid = n.pid
        tgid = self._tgid(tid)
        path = self._rewrite_self(raw, tgid, tid)
        stripped = path.rstrip(b"/") or b"/"
        head, _, tail = stripped.rpartition(b"/")
        if not tail or tail in (b".", b".."):
            raise OSError(errno.EINVAL if tail == b"." else errno.EBUSY, "invalid last component")
        if b"/" not in stripped:
            head = b"."
        elif not head:
            head = b"/"
        base_fd = AT_FDCWD
        if not head.startswith(b"/"):
            base_fd, _ = self._base(sup, n, dirfd)
        try:
            parent = sup.state["fsdeny.opener"].call(lambda: _sys.openat2(
                base_fd, head, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _sys.RESOLVE_NO_MAGICLINKS))
        finally:
            if base_fd != AT_FDCWD:
                os.close(base_fd)
        real_parent = os.readlink(f"/proc/self/fd/{parent}")
        mine = f"/proc/{os.getpid()}"
        if real_parent == mine or real_parent.startswith(mine + "/"):
            os.close(parent)
            raise OSError(errno.EACCES, "the supervisor's /proc entries are not the child's")
        return parent, os.fsdecode(tail), os.path.join(real_parent, os.fsdecode(tail))

    def _name_denied(self, parent: int, name: str, real: str, follow: bool = False) -> bool:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=follow)
        except OSError:
            st = None
        pst = os.fstat(parent)
        if (pst.st_dev, pst.st_ino) in self.deny.dir_inodes or self.deny.denied(real, st):
            return True
        return bool(self.deny.dir_inodes) and self.deny._ancestor_denied(parent, pst)

    def _on_behalf_names(self, sup, n, name: str, pairs, act):
        """Resolve every (dirfd, path address) pair, refuse a denied one, else run act(parents, names)."""
        parents, names = [], []
        try:
            for i, (dirfd, addr) in enumerate(pairs):
                follow = name in ("link", "linkat") and i == 0 and self._link_follows(n, name)
                parent, leaf, real = self._parent_and_name(sup, n, dirfd, sup.read_cstr(n, addr))
                parents.append(parent)
                names.append(leaf)
                if self._name_denied(parent, leaf, real, follow):
                    return self._record(sup, n, name, real)
            sup.state["fsdeny.opener"].call(lambda: act(parents, names))
            return Value(0)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        finally:
            for fd in parents:
                os.close(fd)

    @staticmethod
    def _link_follows(n, name) -> bool:
        return name == "linkat" and bool(_s32(n.data.args[4]) & AT_SYMLINK_FOLLOW)

    def _names(self, name, layout):
        def handler(sup, n):
            a = n.data.args
            pairs = [(AT_FDCWD if d is None else _s32(a[d]), a[p]) for d, p in layout]
            act = self._action(sup, n, name)
            return self._on_behalf_names(sup, n, name, pairs, act)
        return handler

    def _action(self, sup, n, name):
        a = n.data.args
        umask = None

        def fix_mode(parent, leaf, mode):
            os.chmod(leaf, mode, dir_fd=parent, follow_symlinks=True)

        if name in ("unlink", "rmdir") or (name == "unlinkat" and not _s32(a[2]) & AT_REMOVEDIR):
            if name == "rmdir":
                return lambda ps, ns: os.rmdir(ns[0], dir_fd=ps[0])
            return lambda ps, ns: os.unlink(ns[0], dir_fd=ps[0])
        if name == "unlinkat":
            return lambda ps, ns: os.rmdir(ns[0], dir_fd=ps[0])
        if name in ("rename", "renameat"):
            return lambda ps, ns: os.rename(ns[0], ns[1], src_dir_fd=ps[0], dst_dir_fd=ps[1])
        if name == "renameat2":
            flags = _s32(a[4]) & 0xFFFFFFFF
            nr = n.data.nr

            def rename2(ps, ns):
                b0, b1 = os.fsencode(ns[0]) + b"\0", os.fsencode(ns[1]) + b"\0"
                from ._native import ffi
                c0, c1 = ffi.new("char[]", b0), ffi.new("char[]", b1)
                _sys.raw_syscall(nr, ps[0], int(ffi.cast("intptr_t", c0)), ps[1], int(ffi.cast("intptr_t", c1)),
                                 flags)
            return rename2
        if name in ("link", "linkat"):
            follow = self._link_follows(n, name)
            if name == "linkat" and _s32(a[4]) & AT_EMPTY_PATH:
                raise OSError(errno.EPERM, "linkat(AT_EMPTY_PATH) is not supported under fs_denied")
            return lambda ps, ns: os.link(ns[0], ns[1], src_dir_fd=ps[0], dst_dir_fd=ps[1],
                                          follow_symlinks=follow)
        if name == "truncate":
            length = a[1]

            def trunc(ps, ns):
                fd = os.open(ns[0], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=ps[0])
                try:
                    st = os.fstat(fd)
                    if self.deny.denied(os.readlink(f"/proc/self/fd/{fd}"), st, fd):
                        raise OSError(errno.EACCES, "denied")
                    os.ftruncate(fd, length)
                finally:
                    os.close(fd)
            return trunc
        if name in ("mkdir", "mkdirat", "mknod", "mknodat"):
            umask = self._child_umask(n.pid)
            mode_arg = {"mkdir": 1, "mkdirat": 2, "mknod": 1, "mknodat": 2}[name]
            mode = a[mode_arg] & 0o7777
            if name.startswith("mkdir"):
                def mk(ps, ns):
                    os.mkdir(ns[0], mode & ~umask, dir_fd=ps[0])
                    fix_mode(ps[0], ns[0], mode & ~umask)
                return mk
            full_mode = a[mode_arg]
            dev = a[mode_arg + 1]

            def mkn(ps, ns):
                os.mknod(ns[0], (full_mode & ~0o7777) | (mode & ~umask), dev, dir_fd=ps[0])
                fix_mode(ps[0], ns[0], mode & ~umask)
            return mkn
        if name in ("symlink", "symlinkat"):
            target = os.fsdecode(sup.read_cstr(n, a[0]))
            return lambda ps, ns: os.symlink(target, ns[0], dir_fd=ps[0])
        raise OSError(errno.ENOSYS, name)

    def close(self):
        if self.opener is not None:
            self.opener.close()
            self.opener = None


# (syscall, (dirfd arg or None, path arg) pairs) for the name-checked family
NAME_SYSCALLS = {
    "unlink": [(None, 0)], "unlinkat": [(0, 1)], "rmdir": [(None, 0)],
    "rename": [(None, 0), (None, 1)], "renameat": [(0, 1), (2, 3)], "renameat2": [(0, 1), (2, 3)],
    "link": [(None, 0), (None, 1)], "linkat": [(0, 1), (2, 3)],
    "truncate": [(None, 0)], "mkdir": [(None, 0)], "mkdirat": [(0, 1)],
    "mknod": [(None, 0)], "mknodat": [(0, 1)], "symlink": [(None, 1)], "symlinkat": [(1, 2)],
}


def install(builder) -> None:
    policy = builder.policy
    fs = FsDeny(policy, -1)

    builder.notify("open", fs.h_open)
    builder.notify("creat", fs.h_creat)
    builder.notify("openat", fs.h_openat)
    builder.notify("openat2", fs.h_openat2)
    builder.notify("execve", fs.h_execve)
    builder.notify("execveat", fs.h_execveat)
    for name, layout in NAME_SYSCALLS.items():
        builder.notify(name, fs._names(name, layout))

    def on_supervisor(sup):
        fs.ruleset_fd = builder.ruleset_fd
        opener = sup.state["fsdeny.opener"] = Opener(builder.ruleset_fd)  # per run: runs may overlap

        def close():
            FsDeny.release_fifo_waits(sup)
            opener.close()
        sup.on_close(close)

    builder.on_supervisor(on_supervisor)
