"""Copy-on-write filesystem isolation of ``workdir`` by seccomp (no namespaces, no root).

The child's filesystem syscalls that name a path under the workdir are notified; the supervisor resolves the
path itself in the *merged* view (upper over lower, whiteouts, symlinks followed component by component,
``..``, dirfds, ``/proc/<pid>/{cwd,fd,root}``) and then:

* read-only opens and stat-like calls of an untouched lower entry CONTINUE: the kernel does them on the lower
  file at full speed (the fast path; when nothing was written yet the path is not even resolved);
* opens that write, create or truncate copy the file up and inject an fd on the upper file (ADDFD|SEND), so
  later reads and writes run at kernel speed;
* unlink/rmdir/mkdir/rename/link/symlink/chmod/chown/utimensat/truncate/mknod are done in the upper and
  recorded (whiteouts for deletions);
* stat/statx/access/readlink of touched entries are answered from the upper (written into the child's
  buffer); getdents64 on a directory whose content changed returns a merged listing (the file position is the
  index into it); chdir into a directory that exists only in the upper gives the process a *virtual cwd*
  (getcwd answers it; relative paths resolve against it; forks inherit it).
* exec of a binary that exists only in the upper: the fd is injected and the path argument rewritten to
  ``/proc/self/fd/N`` when the original string is long enough to hold it (otherwise EACCES, recorded).

Rename or link between the workdir and the outside answers EXDEV (programs fall back to copy + delete).

Residual risks (documented, by design):
* CONTINUE decisions re-read the child's path: a racing thread can make the kernel act on another path. Under
  a Landlock policy that does not let the child write the workdir this reaches nothing the child could not
  reach anyway (reads of lower files; writes into the workdir are refused by Landlock). If the policy *does*
  make the workdir (or a parent) writable, a racing child could write the host tree directly: COW is then a
  convenience, not a boundary.
* For reads, a path that is lexically outside the workdir is not resolved: a symlink elsewhere that points
  into the workdir reads the lower (pre-run) file. Writes are always resolved.
* A file opened read-only before it was copied up keeps showing the lower content (as old OverlayFS).
* xattrs under the workdir cannot be changed (ENOTSUP); legacy utime/utimes/futimesat there answer ENOSYS.
"""
from __future__ import annotations

import collections
import errno
import os
import stat
import threading

from . import cow_commit, syscalls
from ._native import ffi, lib
from .cow_branch import Branch, check_storage, storage_base
from .errors import PolicyError
from .notif import DEFERRED, Errno, InjectFd, Value, s32  # noqa: F401

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_REMOVEDIR = 0x200
AT_EACCESS = 0x200
O_ACCMODE = 3
O_TMPFILE = 0o20000000 | os.O_DIRECTORY
RENAME_NOREPLACE = 1
MAX_HOPS = 40
ARGV0_GAP = 16384  # below the stack pointer: past the red zone and any signal frame (see _make_room)

_dry = threading.local()


def _fsdecode(b: bytes) -> str:
    return os.fsdecode(b)


# What a lower entry is (cached per run: the lower does not change while the sandbox runs, see _lower_entry).
_MISSING, _DIR, _LINK, _OTHER = "missing", "dir", "link", "other"
LOWER_CACHE_MAX = 1 << 16


class Resolved:
    """A path resolved in the merged view. ``touched``: the kernel's own resolution of the same string could
    differ from ours (a component came from the upper and is not a plain copy of the lower directory, a
    whiteout, a virtual cwd, a /proc link into the upper), so the kernel must not be left to do it."""
    __slots__ = ("vpath", "rel", "touched")

    def __init__(self, vpath, rel, touched):
        self.vpath, self.rel, self.touched = vpath, rel, touched


class Cow:
    def __init__(self, policy, arch: str, ruleset_fd: int):
        self.policy = policy
        self.arch = arch
        self.ruleset_fd = ruleset_fd
        self.workdir = os.path.realpath(policy.workdir)
        if not os.path.isdir(self.workdir):
            raise PolicyError(f"workdir: {policy.workdir!r} is not a directory")
        self.wd_b = os.fsencode(self.workdir)
        self.branch: Branch | None = None
        self.vcwd: dict[int, str | None] = {}
        self.tgids: dict[int, int] = {}
        self.opener = None
        self.nr = {name: syscalls.number(name, arch) for name in
                   ("newfstatat", "statx", "faccessat2", "utimensat", "lgetxattr", "llistxattr")}
        self.dir_cache: dict = {}
        self.lower_cache: dict[str, tuple[str, str | None]] = {}
        # Exec of an upper file rewrites the path string in place to a name of the injected fd: /dev/fd/N is
        # the shortest, where it is the usual link to /proc/self/fd (and no chroot can hide it).
        self.fd_dir = "/dev/fd/" if not getattr(policy, "chroot", None) and _readlink("/dev/fd") in (
            "/proc/self/fd", "/proc/self/fd/") else "/proc/self/fd/"

    # ---------------------------------------------------------------- per run
    def start(self, sup):
        storage = storage_base(self.policy.fs_storage)
        check_storage(self.workdir, storage)
        cow_commit.recover(self.workdir)  # a commit killed half way: finish it before reading the tree
        self.branch = Branch(self.workdir, storage, self.policy.max_disk)
        self.vcwd = {}
        self.tgids = {}
        self.dir_cache = {}
        self.lower_cache = {}
        sup.state["cow"] = self.branch

    def _opener(self):
        if self.opener is None:
            from .fsdeny import Opener
            self.opener = Opener(self.ruleset_fd)
        return self.opener

    def close(self):
        if self.opener is not None:
            self.opener.close()
            self.opener = None

    # ---------------------------------------------------------------- process cwd
    def _tgid(self, pid: int) -> tuple[int, int]:
        tg = pp = pid
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        tg = int(line.split()[1])
                    elif line.startswith(b"PPid:"):
                        pp = int(line.split()[1])
                        break
        except OSError:
            pass
        return tg, pp

    def _vcwd(self, pid: int) -> str | None:
        if not self.vcwd:
            return None
        if pid in self.vcwd:
            return self.vcwd[pid]
        tg, pp = self._tgid(pid)
        seen = 0
        while tg not in self.vcwd and pp > 1 and seen < 64:
            if pp in self.vcwd:
                tg = pp
                break
            _, pp = self._tgid(pp)
            seen += 1
        val = self.vcwd.get(tg)
        self.vcwd[pid] = val
        return val

    def _set_vcwd(self, pid: int, path: str | None) -> None:
        if path is None and not self.vcwd:
            return
        tg, _ = self._tgid(pid)
        for p in [p for p, _ in self.vcwd.items() if p == pid or self.tgids.get(p) == tg]:
            self.vcwd[p] = path
        self.vcwd[pid] = path
        self.vcwd[tg] = path
        self.tgids[pid] = tg

    # ---------------------------------------------------------------- resolution
    def _base(self, sup, n, dirfd: int) -> tuple[str, bool]:
        if dirfd == AT_FDCWD:
            v = self._vcwd(n.pid)
            if v is not None:
                return v, True
            real = os.readlink(f"/proc/{n.pid}/cwd")
        else:
            try:
                real = os.readlink(f"/proc/{n.pid}/fd/{dirfd}")
            except FileNotFoundError:
                raise OSError(errno.EBADF, "bad dirfd") from None
            if not real.startswith("/"):
                raise OSError(errno.ENOTDIR, "dirfd is not a directory")
        return self.branch.virtual_of(real)

    def _outside_lexically(self, path: bytes) -> bool:
        """Cheap test for the read fast path: an absolute path that is plainly not under the workdir."""
        if not path.startswith(b"/"):
            return False
        w = self.wd_b
        if path.startswith(w) and (len(path) == len(w) or path[len(w):len(w) + 1] == b"/"):
            return False
        if path.startswith(b"/proc") or path.startswith(b"/dev/fd") or b".." in path:
            return False
        return True

    def _lower_entry(self, rel: str) -> tuple[str, str | None]:
        """(kind, symlink target) of the lower entry at rel, cached. Only the supervisor writes under the
        workdir during a run (the child's writes go to the upper), so the lower is fixed until the commit;
        if the policy also makes the workdir writable to the child, COW is documented as no boundary."""
        ent = self.lower_cache.get(rel)
        if ent is not None:
            return ent
        path = self.branch.lower_path(rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            ent = (_MISSING, None)
        else:
            if stat.S_ISLNK(st.st_mode):
                ent = (_LINK, os.readlink(path))
            else:
                ent = (_DIR if stat.S_ISDIR(st.st_mode) else _OTHER, None)
        if len(self.lower_cache) >= LOWER_CACHE_MAX:
            self.lower_cache.clear()
        self.lower_cache[rel] = ent
        return ent

    def _transparent(self, rel: str) -> bool:
        """Is the upper directory at rel a plain copy of a lower directory (made to hold copied-up
        children), so that the kernel, walking the lower, finds every name not in the upper just as we do?"""
        b = self.branch
        return rel not in b.opaque and not b.hidden(rel) and self._lower_entry(rel)[0] is _DIR

    def resolve(self, sup, n, dirfd: int, path: bytes, follow: bool) -> Resolved:
        b = self.branch
        p = _fsdecode(path)
        if p == "":
            raise OSError(errno.ENOENT, "empty path")
        if p.endswith("/"):
            follow = True
        touched = False
        if p.startswith("/"):
            w = self.workdir
            if p == w or p.startswith(w + "/"):
                cur = w[1:].split("/")
                rest = p[len(w) + 1:].split("/")
            else:
                cur, rest = [], p.split("/")
        else:
            base, touched = self._base(sup, n, dirfd)
            cur = [c for c in base.split("/") if c]
            rest = p.split("/")
        while rest and rest[-1] == "":
            rest.pop()
        rest = collections.deque(rest)
        hops = 0
        pid = n.pid
        while rest:
            c = rest.popleft()
            if c == "" or c == ".":
                continue
            if c == "..":
                if cur:
                    cur.pop()
                continue
            cur.append(c)
            if not rest and not follow:
                break
            link = None
            vp = "/" + "/".join(cur)
            rel = b.rel_of(vp)
            if rel is not None:
                if rel in b.present:
                    st = os.lstat(b.upper_path(rel))
                    if stat.S_ISLNK(st.st_mode):
                        touched = True
                        link = os.readlink(b.upper_path(rel))
                    elif not stat.S_ISDIR(st.st_mode):
                        touched = True
                        if rest:
                            raise OSError(errno.ENOTDIR, vp)
                    elif not self._transparent(rel):
                        touched = True
                elif b.hidden(rel):
                    touched = True
                    if rest:
                        raise OSError(errno.ENOENT, vp)
                else:
                    kind, target = self._lower_entry(rel)
                    if kind is _MISSING:
                        if rest:
                            raise OSError(errno.ENOENT, vp)
                    elif kind is _LINK:
                        link = target
                    elif rest and kind is not _DIR:
                        raise OSError(errno.ENOTDIR, vp)
            elif cur[0] == "proc" and len(cur) >= 2:
                if len(cur) == 2 and c in ("self", "thread-self"):
                    cur[1] = str(pid)
                    continue
                if len(cur) == 3 and c == "cwd" and cur[1].isdigit():
                    v = self._vcwd(int(cur[1]))
                    if v is None:
                        real = _readlink(f"/proc/{cur[1]}/cwd")
                        if real is None:
                            continue
                        v, t = b.virtual_of(real)
                        touched |= t
                    link = v
                elif len(cur) == 3 and c == "root" and cur[1].isdigit():
                    link = "/"
                elif len(cur) == 4 and cur[2] == "fd" and cur[1].isdigit():
                    real = _readlink(vp)
                    if real is not None and real.startswith("/"):
                        if real.endswith(" (deleted)"):
                            continue
                        link, t = b.virtual_of(real)
                        touched |= t
                elif len(cur) == 2:
                    pass  # /proc/<pid>: a directory
                else:
                    link = _readlink_if_link(vp)
            else:
                link = _readlink_if_link(vp)
            if link is not None:
                hops += 1
                if hops > MAX_HOPS:
                    raise OSError(errno.ELOOP, vp)
                cur.pop()
                if link.startswith("/"):
                    cur = []
                rest.extendleft(reversed(link.split("/")))
        vpath = "/" + "/".join(cur)
        return Resolved(vpath, b.rel_of(vpath), touched)

    # ---------------------------------------------------------------- helpers
    def _real(self, rel: str, look) -> str:
        return self.branch.upper_path(rel) if look[0] == "U" else self.branch.lower_path(rel)

    def _upper_open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        pfd, leaf = self.branch.parent_fd(rel, create=True)
        try:
            return os.open(leaf, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=pfd)
        finally:
            os.close(pfd)

    def _in_upper(self, rel: str, fn):
        """fn(parent_fd, leaf) in the upper (parents copied up)."""
        pfd, leaf = self.branch.parent_fd(rel, create=True)
        try:
            return fn(pfd, leaf)
        finally:
            os.close(pfd)

    @staticmethod
    def _umask(pid: int) -> int:
        """The child's umask: the second line of /proc/<pid>/status (one short read, no line loop)."""
        try:
            fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                head = os.read(fd, 256)
            finally:
                os.close(fd)
            i = head.index(b"Umask:")
            return int(head[i + 6:head.index(b"\n", i)], 8)
        except (OSError, ValueError):
            return 0o022

    def _host(self, fn):
        return self._opener().call(fn)

    def _fd_path(self, sup, n, fd: int):
        """(dup, virtual path, in_upper) of the child's fd, or (dup, None, False) when not a path."""
        dup = sup.dup_child_fd(n, fd)
        real = os.readlink(f"/proc/self/fd/{dup}")
        if not real.startswith("/") or real.endswith(" (deleted)"):
            return dup, None, False
        v, up = self.branch.virtual_of(real)
        return dup, v, up

    # ---------------------------------------------------------------- open
    def open_common(self, sup, n, idx: int, dirfd: int, flags: int, mode: int):
        b = self.branch
        acc = flags & O_ACCMODE
        write = acc != os.O_RDONLY or flags & (os.O_CREAT | os.O_TRUNC) or (flags & O_TMPFILE) == O_TMPFILE
        if not write and b.clean and not self.vcwd:
            return None
        path = sup.path_arg(n, idx)
        if not write and self._outside_lexically(path):
            return None
        follow = not (flags & os.O_NOFOLLOW) and not (flags & os.O_CREAT and flags & os.O_EXCL)
        r = self.resolve(sup, n, dirfd, path, follow)
        cloexec = bool(flags & os.O_CLOEXEC)
        if r.rel is None:
            if not r.touched:
                return None
            vp = r.vpath
            fd = self._host(lambda: os.open(vp, flags | os.O_CLOEXEC, mode & 0o7777))
            return InjectFd(fd, cloexec)
        rel = r.rel
        if not write and not r.touched and not b.touched(rel):
            return None  # an untouched lower entry (or none): the kernel's answer is the merged one
        look = b.lookup(rel)
        if not write:
            if look is None:
                return Errno(errno.ENOENT)
            if look[0] == "L":
                if not r.touched:
                    return None
                return InjectFd(b.open_lower(rel, flags & ~os.O_NOFOLLOW), cloexec)
            if stat.S_ISDIR(look[1].st_mode):
                return InjectFd(self._upper_open(rel, flags & ~os.O_NOFOLLOW), cloexec)
            return InjectFd(self._upper_open(rel, flags), cloexec)
        if (flags & O_TMPFILE) == O_TMPFILE:
            if look is None:
                return Errno(errno.ENOENT)
            if not stat.S_ISDIR(look[1].st_mode):
                return Errno(errno.ENOTDIR)
            b.copy_up(rel)
            fd = self._upper_open(rel, flags & ~os.O_NOFOLLOW, mode & 0o7777 & ~self._umask(n.pid))
            return InjectFd(fd, cloexec)
        if look is None:
            if not flags & os.O_CREAT:
                return Errno(errno.ENOENT)
            if rel == "":
                return Errno(errno.EISDIR)
            b.charge(rel, 0)
            fd = self._upper_open(rel, (flags & ~os.O_CLOEXEC) | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, mode & 0o7777 & ~self._umask(n.pid))
            except OSError:
                os.close(fd)
                raise
            b.placed(rel, False)
        else:
            kind, st = look
            if flags & os.O_CREAT and flags & os.O_EXCL:
                return Errno(errno.EEXIST)
            if stat.S_ISDIR(st.st_mode):
                return Errno(errno.EISDIR)
            if stat.S_ISLNK(st.st_mode):
                return Errno(errno.ELOOP)
            if not stat.S_ISREG(st.st_mode):
                if kind == "L" and not r.touched:
                    return None  # a FIFO or device: opening it changes no file
                return Errno(errno.EACCES)
            if kind == "L":
                b.copy_up(rel, truncate=bool(flags & os.O_TRUNC))
            fd = self._upper_open(rel, flags & ~(os.O_CREAT | os.O_EXCL))
        if acc != os.O_RDONLY:
            b.open_rw.add(rel)
        return InjectFd(fd, cloexec)

    def h_open(self, sup, n):
        a = n.data.args
        return self._wrap(self.open_common, sup, n, 0, AT_FDCWD, s32(a[1]), a[2])

    def h_creat(self, sup, n):
        return self._wrap(self.open_common, sup, n, 0, AT_FDCWD, os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                          n.data.args[1])

    def h_openat(self, sup, n):
        a = n.data.args
        return self._wrap(self.open_common, sup, n, 1, s32(a[0]), s32(a[2]), a[3])

    def h_openat2(self, sup, n):
        a = n.data.args
        if a[3] < 24:
            return Errno(errno.EINVAL)
        import struct
        flags, mode, resolve = struct.unpack("=QQQ", sup.read_mem(n, a[2], 24))
        if self.branch.clean and not self.vcwd and not (s32(flags) & (O_ACCMODE | os.O_CREAT | os.O_TRUNC)):
            return None
        if resolve:
            path = sup.path_arg(n, 1)
            if self._outside_lexically(path) and not s32(flags) & (O_ACCMODE | os.O_CREAT | os.O_TRUNC):
                return None
            return Errno(errno.EACCES)  # RESOLVE_* semantics are not reproduced in the merged view
        return self._wrap(self.open_common, sup, n, 1, s32(a[0]), s32(flags), mode)

    @staticmethod
    def _wrap(fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)

    # ---------------------------------------------------------------- stat family
    def _lookup_for_read(self, sup, n, idx, dirfd, follow):
        """None: let the kernel answer; else (real path, is_in) or an Errno."""
        b = self.branch
        if b.clean and not self.vcwd:
            return None
        path = sup.path_arg(n, idx)
        if self._outside_lexically(path):
            return None
        if path == b"":
            return None
        r = self.resolve(sup, n, dirfd, path, follow)
        if r.rel is None:
            return None if not r.touched else (r.vpath, False)
        if not r.touched and not b.touched(r.rel):
            return None  # the kernel walks the lower exactly as we did, and the merged entry is the lower one
        look = b.lookup(r.rel)
        if look is None:
            return Errno(errno.ENOENT)
        if look[0] == "L" and not r.touched:
            return None
        return self._real(r.rel, look), True

    def _stat(self, sup, n, idx, dirfd, flags, buf_addr):
        if flags & AT_EMPTY_PATH and (not n.data.args[idx] or sup.path_arg(n, idx) == b""):
            return None  # fstat of an fd: the kernel answers for the very file the fd is on
        got = self._lookup_for_read(sup, n, idx, dirfd, not flags & AT_SYMLINK_NOFOLLOW)
        if got is None or isinstance(got, Errno):
            return got
        real, _ = got
        buf = ffi.new("char[]", 256)
        cpath = ffi.new("char[]", os.fsencode(real))  # keep it alive across the call
        rc = lib.sl_raw_syscall6(self.nr["newfstatat"], AT_FDCWD, _addr(cpath),
                                 _addr(buf), flags & AT_SYMLINK_NOFOLLOW | (AT_SYMLINK_NOFOLLOW if got[1] else 0),
                                 0, 0)
        if rc < 0:
            return Errno(-rc)
        _write(sup, n, buf_addr, ffi.buffer(buf, 144)[:])
        return Value(0)

    def h_newfstatat(self, sup, n):
        a = n.data.args
        return self._wrap(self._stat, sup, n, 1, s32(a[0]), s32(a[3]), a[2])

    def h_stat(self, sup, n):
        return self._wrap(self._stat, sup, n, 0, AT_FDCWD, 0, n.data.args[1])

    def h_lstat(self, sup, n):
        return self._wrap(self._stat, sup, n, 0, AT_FDCWD, AT_SYMLINK_NOFOLLOW, n.data.args[1])

    def _statx(self, sup, n):
        a = n.data.args
        flags = s32(a[2])
        if flags & AT_EMPTY_PATH and (not a[1] or sup.path_arg(n, 1) == b""):
            return None
        got = self._lookup_for_read(sup, n, 1, s32(a[0]), not flags & AT_SYMLINK_NOFOLLOW)
        if got is None or isinstance(got, Errno):
            return got
        real, inside = got
        buf = ffi.new("char[]", 256)
        fl = (flags & ~AT_EMPTY_PATH) | (AT_SYMLINK_NOFOLLOW if inside else 0)
        cpath = ffi.new("char[]", os.fsencode(real))
        rc = lib.sl_raw_syscall6(self.nr["statx"], AT_FDCWD, _addr(cpath), fl,
                                 a[3] & 0xFFFFFFFF, _addr(buf), 0)
        if rc < 0:
            return Errno(-rc)
        _write(sup, n, a[4], ffi.buffer(buf, 256)[:])
        return Value(0)

    def h_statx(self, sup, n):
        return self._wrap(self._statx, sup, n)

    def _access(self, sup, n, idx, dirfd, mode, flags):
        got = self._lookup_for_read(sup, n, idx, dirfd, not flags & AT_SYMLINK_NOFOLLOW)
        if got is None or isinstance(got, Errno):
            return got
        real, inside = got
        cpath = ffi.new("char[]", os.fsencode(real))
        rc = lib.sl_raw_syscall6(self.nr["faccessat2"], AT_FDCWD, _addr(cpath),
                                 mode, flags & AT_EACCESS | (AT_SYMLINK_NOFOLLOW if inside else 0), 0, 0)
        return Errno(-rc) if rc < 0 else Value(0)

    def h_access(self, sup, n):
        a = n.data.args
        return self._wrap(self._access, sup, n, 0, AT_FDCWD, s32(a[1]), 0)

    def h_faccessat(self, sup, n):
        a = n.data.args
        return self._wrap(self._access, sup, n, 1, s32(a[0]), s32(a[2]), 0)

    def h_faccessat2(self, sup, n):
        a = n.data.args
        return self._wrap(self._access, sup, n, 1, s32(a[0]), s32(a[2]), s32(a[3]))

    def _readlink(self, sup, n, idx, dirfd, buf_addr, size):
        if s32(size) <= 0:
            return Errno(errno.EINVAL)
        got = self._lookup_for_read(sup, n, idx, dirfd, False)
        if got is None or isinstance(got, Errno):
            return got
        target = os.fsencode(os.readlink(got[0]))[:size]
        _write(sup, n, buf_addr, target)
        return Value(len(target))

    def h_readlink(self, sup, n):
        a = n.data.args
        return self._wrap(self._readlink, sup, n, 0, AT_FDCWD, a[1], a[2])

    def h_readlinkat(self, sup, n):
        a = n.data.args
        return self._wrap(self._readlink, sup, n, 1, s32(a[0]), a[2], a[3])

    # ---------------------------------------------------------------- directories
    def _getdents(self, sup, n):
        b = self.branch
        if b.clean:
            return None
        a = n.data.args
        fd = s32(a[0])
        # Look before taking a duplicate: a directory outside the workdir or one whose listing did not change
        # is listed by the kernel. (If another thread swaps the fd meanwhile, the kernel lists whatever the
        # fd then is: a listing the child could read anyway.)
        real = _readlink(f"/proc/{n.pid}/fd/{fd}")
        if real is None or not real.startswith("/"):
            return None
        v, up = b.virtual_of(real)
        rel = b.rel_of(v)
        if rel is None or (not up and rel not in b.dirty and rel not in b.present and not b.hidden(rel)):
            return None
        dup, v, up = self._fd_path(sup, n, fd)
        try:
            rel = b.rel_of(v) if v is not None else None
            if rel is None:
                return None
            pos = os.lseek(dup, 0, os.SEEK_CUR)
            key = (n.pid, fd, rel)
            entries = self.dir_cache.get(key) if pos else None
            if entries is None:
                entries = b.merged_entries(rel)
                self.dir_cache[key] = entries
            count = a[2] & 0xFFFFFFFF
            out = bytearray()
            i = pos
            while i < len(entries):
                name, ino, dtype = entries[i]
                nb = os.fsencode(name)
                reclen = (19 + len(nb) + 1 + 7) & ~7
                if len(out) + reclen > count:
                    break
                rec = bytearray(reclen)
                rec[0:8] = (ino & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
                rec[8:16] = (i + 1).to_bytes(8, "little")
                rec[16:18] = reclen.to_bytes(2, "little")
                rec[18] = dtype
                rec[19:19 + len(nb)] = nb
                out += rec
                i += 1
            if i < len(entries) and not out:
                return Errno(errno.EINVAL)
            if out:
                _write(sup, n, a[1], bytes(out))
            os.lseek(dup, i, os.SEEK_SET)
            if i >= len(entries):
                self.dir_cache.pop(key, None)
            return Value(len(out))
        finally:
            os.close(dup)

    def h_getdents64(self, sup, n):
        return self._wrap(self._getdents, sup, n)

    def _chdir(self, sup, n):
        path = sup.path_arg(n, 0)
        b = self.branch
        if b.clean and not self.vcwd:
            return None
        r = self.resolve(sup, n, AT_FDCWD, path, True)
        if r.rel is None:
            if not r.touched:
                self._set_vcwd(n.pid, None)
                return None
            if not os.path.isdir(r.vpath):
                return Errno(errno.ENOTDIR)
            self._set_vcwd(n.pid, r.vpath)
            return Value(0)
        look = b.lookup(r.rel)
        if look is None:
            return Errno(errno.ENOENT)
        if not stat.S_ISDIR(look[1].st_mode):
            return Errno(errno.ENOTDIR)
        if look[0] == "L" and not r.touched:
            self._set_vcwd(n.pid, None)
            return None
        self._set_vcwd(n.pid, r.vpath)
        return Value(0)

    def h_chdir(self, sup, n):
        return self._wrap(self._chdir, sup, n)

    def _fchdir(self, sup, n):
        dup, v, up = self._fd_path(sup, n, s32(n.data.args[0]))
        try:
            if up:
                if not stat.S_ISDIR(os.fstat(dup).st_mode):
                    return Errno(errno.ENOTDIR)
                self._set_vcwd(n.pid, v)
                return Value(0)
            self._set_vcwd(n.pid, None)
            return None
        finally:
            os.close(dup)

    def h_fchdir(self, sup, n):
        return self._wrap(self._fchdir, sup, n)

    def h_getcwd(self, sup, n):
        v = self._vcwd(n.pid) if self.vcwd else None
        if v is None:
            return None
        data = os.fsencode(v) + b"\0"
        if len(data) > n.data.args[1]:
            return Errno(errno.ERANGE)
        _write(sup, n, n.data.args[0], data)
        return Value(len(data))

    # ---------------------------------------------------------------- mutations
    def _resolve_w(self, sup, n, idx, dirfd, follow):
        return self.resolve(sup, n, dirfd, sup.path_arg(n, idx), follow)

    def _unlink(self, sup, n, idx, dirfd, rmdir):
        b = self.branch
        r = self._resolve_w(sup, n, idx, dirfd, False)
        if r.rel is None:
            if not r.touched:
                return None
            vp = r.vpath
            self._host(lambda: os.rmdir(vp) if rmdir else os.unlink(vp))
            return Value(0)
        rel = r.rel
        look = b.lookup(rel)
        if look is None:
            return Errno(errno.ENOENT)
        isdir = stat.S_ISDIR(look[1].st_mode)
        if rel == "":
            return Errno(errno.EBUSY if rmdir else errno.EISDIR)
        if rmdir:
            if not isdir:
                return Errno(errno.ENOTDIR)
            if b.list_names(rel):
                return Errno(errno.ENOTEMPTY)
        elif isdir:
            return Errno(errno.EISDIR)
        lower_visible = not b.hidden(rel) and b.lower_exists_raw(rel)
        if look[0] == "U":
            self._in_upper(rel, lambda pfd, leaf: os.rmdir(leaf, dir_fd=pfd) if rmdir
                           else os.unlink(leaf, dir_fd=pfd))
        b.removed(rel, lower_visible)
        self.dir_cache.clear()
        return Value(0)

    def h_unlink(self, sup, n):
        return self._wrap(self._unlink, sup, n, 0, AT_FDCWD, False)

    def h_rmdir(self, sup, n):
        return self._wrap(self._unlink, sup, n, 0, AT_FDCWD, True)

    def h_unlinkat(self, sup, n):
        a = n.data.args
        return self._wrap(self._unlink, sup, n, 1, s32(a[0]), bool(s32(a[2]) & AT_REMOVEDIR))

    def _mkdir(self, sup, n, idx, dirfd, mode):
        b = self.branch
        r = self._resolve_w(sup, n, idx, dirfd, False)
        if r.rel is None:
            if not r.touched:
                return None
            vp = r.vpath
            self._host(lambda: os.mkdir(vp, mode & 0o7777))
            return Value(0)
        rel = r.rel
        if rel == "" or b.lookup(rel) is not None:
            return Errno(errno.EEXIST)
        m = mode & 0o7777 & ~self._umask(n.pid)
        self._in_upper(rel, lambda pfd, leaf: b._mkdir_at(pfd, leaf, m))
        b.placed(rel, True)
        return Value(0)

    def h_mkdir(self, sup, n):
        a = n.data.args
        return self._wrap(self._mkdir, sup, n, 0, AT_FDCWD, a[1])

    def h_mkdirat(self, sup, n):
        a = n.data.args
        return self._wrap(self._mkdir, sup, n, 1, s32(a[0]), a[2])

    def _mknod(self, sup, n, idx, dirfd, mode, dev):
        b = self.branch
        r = self._resolve_w(sup, n, idx, dirfd, False)
        if r.rel is None:
            return None if not r.touched else Errno(errno.EPERM)
        rel = r.rel
        if rel == "" or b.lookup(rel) is not None:
            return Errno(errno.EEXIST)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        m = mode & 0o7777 & ~self._umask(n.pid)
        if kind == stat.S_IFREG:
            os.close(self._upper_open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, m))
        elif kind == stat.S_IFIFO:
            self._in_upper(rel, lambda pfd, leaf: os.mkfifo(leaf, m, dir_fd=pfd))
        else:
            return Errno(errno.EPERM)
        b.placed(rel, False)
        return Value(0)

    def h_mknod(self, sup, n):
        a = n.data.args
        return self._wrap(self._mknod, sup, n, 0, AT_FDCWD, a[1], a[2])

    def h_mknodat(self, sup, n):
        a = n.data.args
        return self._wrap(self._mknod, sup, n, 1, s32(a[0]), a[2], a[3])

    def _rename(self, sup, n, od, oi, nd, ni, flags):
        b = self.branch
        if flags & ~RENAME_NOREPLACE:
            src_out = self._outside_lexically(sup.read_cstr(n, n.data.args[oi]))
            dst_out = self._outside_lexically(sup.read_cstr(n, n.data.args[ni]))
            if src_out and dst_out:
                return None
            return Errno(errno.EINVAL)  # RENAME_EXCHANGE / RENAME_WHITEOUT are not emulated in the workdir
        src = self.resolve(sup, n, od, sup.read_cstr(n, n.data.args[oi]), False)
        dst = self.resolve(sup, n, nd, sup.read_cstr(n, n.data.args[ni]), False)
        if src.rel is None and dst.rel is None:
            if not src.touched and not dst.touched:
                return None
            s, d = src.vpath, dst.vpath
            self._host(lambda: os.rename(s, d))
            return Value(0)
        if src.rel is None or dst.rel is None:
            return Errno(errno.EXDEV)
        s, d = src.rel, dst.rel
        if s == "" or d == "":
            return Errno(errno.EBUSY)
        slook = b.lookup(s)
        if slook is None:
            return Errno(errno.ENOENT)
        dlook = b.lookup(d)
        if s == d:
            return Value(0)
        sdir = stat.S_ISDIR(slook[1].st_mode)
        if sdir and d.startswith(s + "/"):
            return Errno(errno.EINVAL)
        if dlook is not None:
            if flags & RENAME_NOREPLACE:
                return Errno(errno.EEXIST)
            ddir = stat.S_ISDIR(dlook[1].st_mode)
            if sdir and not ddir:
                return Errno(errno.ENOTDIR)
            if ddir and not sdir:
                return Errno(errno.EISDIR)
            if ddir and b.list_names(d):
                return Errno(errno.ENOTEMPTY)
        # the destination's parent must be a directory in the merged view
        dparent = d.rsplit("/", 1)[0] if "/" in d else ""
        pl = b.lookup(dparent)
        if pl is None:
            return Errno(errno.ENOENT)
        if not stat.S_ISDIR(pl[1].st_mode):
            return Errno(errno.ENOTDIR)
        src_lower = not b.hidden(s) and b.lower_exists_raw(s)
        dst_lower_dir = (not b.hidden(d) and os.path.isdir(b.lower_path(d))
                         and not os.path.islink(b.lower_path(d)))
        if sdir:
            b.copy_up_tree(s)
        else:
            b.copy_up(s)
        if dlook is not None and dlook[0] == "U" and stat.S_ISDIR(dlook[1].st_mode):
            self._in_upper(d, lambda pfd, leaf: os.rmdir(leaf, dir_fd=pfd))
            b.present.discard(d)
        spfd, sleaf = b.parent_fd(s, create=False)
        try:
            dpfd, dleaf = b.parent_fd(d, create=True)
            try:
                os.rename(sleaf, dleaf, src_dir_fd=spfd, dst_dir_fd=dpfd)
            finally:
                os.close(dpfd)
        finally:
            os.close(spfd)
        moved = [p for p in b.present if p == s or p.startswith(s + "/")]
        sizes = {p: b.sizes.get(p) for p in moved}
        b.removed(s, src_lower)
        # entries of the destination subtree now come from the upper only
        prefix = d + "/"
        for coll in (b.deleted, b.opaque, b.present):
            for p in [p for p in coll if p.startswith(prefix)]:
                coll.discard(p)
        for p in moved:
            np = d + p[len(s):]
            b.present.add(np)
            if sizes.get(p) is not None:
                b.sizes[np] = sizes[p]
            if stat.S_ISDIR(os.lstat(b.upper_path(np)).st_mode):
                b.dirty.add(np)
        b.placed(d, sdir, replaces_dir=sdir and dst_lower_dir)
        if sdir and dst_lower_dir:
            b.opaque.add(d)
        self.dir_cache.clear()
        return Value(0)

    def h_rename(self, sup, n):
        return self._wrap(self._rename, sup, n, AT_FDCWD, 0, AT_FDCWD, 1, 0)

    def h_renameat(self, sup, n):
        a = n.data.args
        return self._wrap(self._rename, sup, n, s32(a[0]), 1, s32(a[2]), 3, 0)

    def h_renameat2(self, sup, n):
        a = n.data.args
        return self._wrap(self._rename, sup, n, s32(a[0]), 1, s32(a[2]), 3, s32(a[4]))

    def _link(self, sup, n, od, oi, nd, ni, flags):
        b = self.branch
        if flags & AT_EMPTY_PATH:
            return Errno(errno.EXDEV) if not self._outside_lexically(sup.read_cstr(n, n.data.args[ni])) else None
        src = self.resolve(sup, n, od, sup.read_cstr(n, n.data.args[oi]), bool(flags & AT_SYMLINK_FOLLOW))
        dst = self.resolve(sup, n, nd, sup.read_cstr(n, n.data.args[ni]), False)
        if src.rel is None and dst.rel is None:
            if not src.touched and not dst.touched:
                return None
            s, d = src.vpath, dst.vpath
            self._host(lambda: os.link(s, d, follow_symlinks=False))
            return Value(0)
        if src.rel is None or dst.rel is None:
            return Errno(errno.EXDEV)
        slook = b.lookup(src.rel)
        if slook is None:
            return Errno(errno.ENOENT)
        if stat.S_ISDIR(slook[1].st_mode):
            return Errno(errno.EPERM)
        if dst.rel == "" or b.lookup(dst.rel) is not None:
            return Errno(errno.EEXIST)
        b.copy_up(src.rel)
        spfd, sleaf = b.parent_fd(src.rel, create=False)
        try:
            dpfd, dleaf = b.parent_fd(dst.rel, create=True)
            try:
                os.link(sleaf, dleaf, src_dir_fd=spfd, dst_dir_fd=dpfd, follow_symlinks=False)
            finally:
                os.close(dpfd)
        finally:
            os.close(spfd)
        b.placed(dst.rel, False)
        if src.rel in b.sizes:
            b.sizes[dst.rel] = 0
        return Value(0)

    def h_link(self, sup, n):
        return self._wrap(self._link, sup, n, AT_FDCWD, 0, AT_FDCWD, 1, 0)

    def h_linkat(self, sup, n):
        a = n.data.args
        return self._wrap(self._link, sup, n, s32(a[0]), 1, s32(a[2]), 3, s32(a[4]))

    def _symlink(self, sup, n, ti, nd, ni):
        b = self.branch
        target = sup.read_cstr(n, n.data.args[ti])
        dst = self.resolve(sup, n, nd, sup.read_cstr(n, n.data.args[ni]), False)
        if dst.rel is None:
            if not dst.touched:
                return None
            d = dst.vpath
            self._host(lambda: os.symlink(target, d))
            return Value(0)
        if dst.rel == "" or b.lookup(dst.rel) is not None:
            return Errno(errno.EEXIST)
        if not target:
            return Errno(errno.ENOENT)
        self._in_upper(dst.rel, lambda pfd, leaf: os.symlink(target, leaf, dir_fd=pfd))
        b.placed(dst.rel, False)
        return Value(0)

    def h_symlink(self, sup, n):
        return self._wrap(self._symlink, sup, n, 0, AT_FDCWD, 1)

    def h_symlinkat(self, sup, n):
        a = n.data.args
        return self._wrap(self._symlink, sup, n, 0, s32(a[1]), 2)

    def _meta(self, sup, n, idx, dirfd, follow, fn):
        """chmod/chown/utimensat/truncate of a path: fn(parent_fd, leaf) on the copied-up entry."""
        b = self.branch
        r = self._resolve_w(sup, n, idx, dirfd, follow)
        if r.rel is None:
            if not r.touched:
                return None
            return Errno(errno.EPERM)
        look = b.lookup(r.rel)
        if look is None:
            return Errno(errno.ENOENT)
        b.copy_up(r.rel)
        if r.rel == "":
            return Errno(errno.EPERM)  # the workdir's own metadata is not versioned
        self._in_upper(r.rel, fn)
        return Value(0)

    def h_chmod(self, sup, n):
        m = n.data.args[1] & 0o7777
        return self._wrap(self._meta, sup, n, 0, AT_FDCWD, True,
                          lambda pfd, leaf: os.chmod(leaf, m, dir_fd=pfd, follow_symlinks=False))

    def h_fchmodat(self, sup, n):
        a = n.data.args
        m = a[2] & 0o7777
        flags = s32(a[3]) if self._nr_is(n, "fchmodat2") else 0
        return self._wrap(self._meta, sup, n, 1, s32(a[0]), not flags & AT_SYMLINK_NOFOLLOW,
                          lambda pfd, leaf: os.chmod(leaf, m, dir_fd=pfd, follow_symlinks=False))

    def _chown_fn(self, uid, gid):
        return lambda pfd, leaf: os.chown(leaf, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def h_chown(self, sup, n):
        a = n.data.args
        return self._wrap(self._meta, sup, n, 0, AT_FDCWD, True, self._chown_fn(s32(a[1]), s32(a[2])))

    def h_lchown(self, sup, n):
        a = n.data.args
        return self._wrap(self._meta, sup, n, 0, AT_FDCWD, False, self._chown_fn(s32(a[1]), s32(a[2])))

    def h_fchownat(self, sup, n):
        a = n.data.args
        flags = s32(a[4])
        if flags & AT_EMPTY_PATH and a[1] and sup.path_arg(n, 1) == b"":
            return self._wrap(self._fd_meta, sup, n, s32(a[0]), lambda fd: os.fchown(fd, s32(a[2]), s32(a[3])))
        return self._wrap(self._meta, sup, n, 1, s32(a[0]), not flags & AT_SYMLINK_NOFOLLOW,
                          self._chown_fn(s32(a[2]), s32(a[3])))

    def h_utimensat(self, sup, n):
        a = n.data.args
        flags = s32(a[3])
        times = sup.read_mem(n, a[2], 32) if a[2] else None
        tbuf = ffi.new("char[]", times) if times else ffi.NULL
        nr = self.nr["utimensat"]

        def apply(fd, leaf=None):
            name = ffi.new("char[]", os.fsencode(leaf)) if leaf is not None else ffi.NULL
            rc = lib.sl_raw_syscall6(nr, fd, _addr(name), _addr(tbuf), AT_SYMLINK_NOFOLLOW if leaf else 0, 0, 0)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
        if a[1] == 0:  # futimens
            return self._wrap(self._fd_meta, sup, n, s32(a[0]), apply)
        if flags & AT_EMPTY_PATH and sup.path_arg(n, 1) == b"":
            return self._wrap(self._fd_meta, sup, n, s32(a[0]), apply)
        return self._wrap(self._meta, sup, n, 1, s32(a[0]), not flags & AT_SYMLINK_NOFOLLOW,
                          lambda pfd, leaf: apply(pfd, leaf))

    def h_legacy_utime(self, sup, n):
        idx = 1 if self._nr_is(n, "futimesat") else 0
        dirfd = s32(n.data.args[0]) if idx else AT_FDCWD
        try:
            r = self._resolve_w(sup, n, idx, dirfd, True)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        if r.rel is None and not r.touched:
            return None
        return Errno(errno.ENOSYS)

    def _truncate(self, sup, n):
        b = self.branch
        length = n.data.args[1]
        if length >= 1 << 63:
            return Errno(errno.EINVAL)
        r = self._resolve_w(sup, n, 0, AT_FDCWD, True)
        if r.rel is None:
            return None if not r.touched else Errno(errno.EPERM)
        look = b.lookup(r.rel)
        if look is None:
            return Errno(errno.ENOENT)
        if stat.S_ISDIR(look[1].st_mode):
            return Errno(errno.EISDIR)
        b.copy_up(r.rel, truncate=length == 0)
        b.charge(r.rel, length)
        fd = self._upper_open(r.rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        return Value(0)

    def h_truncate(self, sup, n):
        return self._wrap(self._truncate, sup, n)

    def _fd_meta(self, sup, n, fd, fn):
        """fchmod/fchown/futimens: on the copied-up file if fd is a lower workdir file, else on the child's
        own open file (our duplicate: the very object the child named, no race)."""
        b = self.branch
        dup, v, up = self._fd_path(sup, n, fd)
        try:
            rel = b.rel_of(v) if v is not None else None
            if rel is None or up:
                fn(dup)
                return Value(0)
            if rel == "":
                return Errno(errno.EPERM)
            if b.lookup(rel) is None:
                return Errno(errno.ENOENT)
            b.copy_up(rel)
            pfd, leaf = b.parent_fd(rel, create=False)
            try:
                tfd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            finally:
                os.close(pfd)
            try:
                try:
                    fn(tfd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
                    fn2 = os.open(f"/proc/self/fd/{tfd}", os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        fn(fn2)
                    finally:
                        os.close(fn2)
            finally:
                os.close(tfd)
            return Value(0)
        finally:
            os.close(dup)

    def h_fchmod(self, sup, n):
        a = n.data.args
        m = a[1] & 0o7777
        return self._wrap(self._fd_meta, sup, n, s32(a[0]), lambda fd: os.fchmod(fd, m))

    def h_fchown(self, sup, n):
        a = n.data.args
        return self._wrap(self._fd_meta, sup, n, s32(a[0]), lambda fd: os.fchown(fd, s32(a[1]), s32(a[2])))

    def h_xattr(self, sup, n):
        try:
            r = self._resolve_w(sup, n, 0, AT_FDCWD, not self._nr_is(n, "lsetxattr", "lremovexattr"))
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        if r.rel is None and not r.touched:
            return None
        return Errno(errno.ENOTSUP)

    def h_fxattr(self, sup, n):
        try:
            dup, v, up = self._fd_path(sup, n, s32(n.data.args[0]))
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF)
        os.close(dup)
        if v is not None and self.branch.rel_of(v) is not None and not up:
            return Errno(errno.ENOTSUP)
        return None

    def _getxattr(self, sup, n, listing: bool, follow: bool):
        a = n.data.args
        got = self._lookup_for_read(sup, n, 0, AT_FDCWD, follow)
        if got is None or isinstance(got, Errno):
            return got
        real = ffi.new("char[]", os.fsencode(got[0]))
        size = a[2] if listing else a[3]
        size = min(size & 0xFFFFFFFF, 1 << 16)
        buf = ffi.new("char[]", max(size, 1))
        if listing:
            rc = lib.sl_raw_syscall6(self.nr["llistxattr"], _addr(real), _addr(buf), size, 0, 0, 0)
            out_addr = a[1]
        else:
            name = ffi.new("char[]", sup.read_cstr(n, a[1], 256))
            rc = lib.sl_raw_syscall6(self.nr["lgetxattr"], _addr(real), _addr(name), _addr(buf), size, 0, 0)
            out_addr = a[2]
        if rc < 0:
            return Errno(-rc)
        if size and rc:
            _write(sup, n, out_addr, ffi.buffer(buf, rc)[:])
        return Value(rc)

    def h_getxattr(self, sup, n):
        return self._wrap(self._getxattr, sup, n, False, not self._nr_is(n, "lgetxattr"))

    def h_listxattr(self, sup, n):
        return self._wrap(self._getxattr, sup, n, True, not self._nr_is(n, "llistxattr"))

    def _nr_is(self, n, *names) -> bool:
        return any(syscalls.number(x, self.arch) == n.data.nr for x in names)

    # ---------------------------------------------------------------- exec
    def _exec(self, sup, n, idx, dirfd, flags):
        b = self.branch
        if b.clean and not self.vcwd:
            return None
        if flags & AT_EMPTY_PATH:
            return None
        path = sup.path_arg(n, idx)
        if self._outside_lexically(path):
            return None
        r = self.resolve(sup, n, dirfd, path, True)
        if r.rel is None:
            if not r.touched:
                return None
            real = r.vpath
        else:
            look = b.lookup(r.rel)
            if look is None:
                return Errno(errno.ENOENT)
            if look[0] == "L" and not r.touched:
                return None
            if stat.S_ISDIR(look[1].st_mode):
                return Errno(errno.EACCES)
            real = self._real(r.rel, look)
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if r.rel is not None else 0))
        try:
            head = os.pread(fd, 256, 0)
            script = head.startswith(b"#!")
            if script and self._interpreter_in_upper(sup, n, head):
                return Errno(errno.ENOENT)  # what the kernel would answer; recorded with the way out
            newfd = lib.sl_notif_addfd(sup.listener, n.id, fd, 0, 0 if script else os.O_CLOEXEC, 0)
        finally:
            os.close(fd)
        if newfd < 0:
            return Errno(-newfd)
        new = f"{self.fd_dir}{newfd}".encode()
        if not self._make_room(sup, n, idx, path, len(new)):
            return self._exec_path_too_short(sup, n, r.vpath)
        _write(sup, n, n.data.args[idx], new + b"\0")
        return None  # CONTINUE: the kernel now execs the injected fd (Landlock still checks EXECUTE)

    def _make_room(self, sup, n, idx: int, path: bytes, new_len: int) -> bool:
        """Prepare the child's memory for the path string to be rewritten to ``new_len`` bytes.

        Shells pass argv[0] itself as the path (execve(argv[0], argv, envp)): rewriting the path would rename
        the program (a venv's python finds its pyvenv.cfg through argv[0]). And a path shorter than the fd name
        (``./prog``) can only take it by running over the bytes after its NUL. A thread blocked in execve never
        returns to its old memory when the exec succeeds (the supervisor checked the file first), so: every
        argv/envp string that starts inside the bytes to be overwritten (argv[0] included) is copied well below
        the thread's stack pointer (dead memory for it) and its pointer moved there. Refused (False) when an
        argv/envp pointer array itself lies in those bytes or the child's memory cannot be read or written."""
        a = n.data.args
        addr, argv_addr, envp_addr = a[idx], a[idx + 1], a[idx + 2]
        end = addr + max(new_len, len(path)) + 1
        try:
            with open(f"/proc/{n.pid}/syscall", "rb") as f:
                fields = f.read().split()
            if len(fields) < 9 or int(fields[0]) != n.data.nr:
                return new_len <= len(path)
            scratch = (int(fields[7], 16) - ARGV0_GAP) & ~15
            for arr in (argv_addr, envp_addr):
                ptrs = self._pointer_array(sup, n, arr)
                if arr and arr < end and arr + 8 * (len(ptrs) + 1) > addr and new_len > len(path):
                    return False
                for i, p in enumerate(ptrs):
                    if addr <= p < end:
                        text = sup.read_cstr(n, p, 1 << 17) + b"\0"
                        scratch = (scratch - len(text)) & ~15
                        sup.write_mem(n, scratch, text)
                        sup.write_mem(n, arr + 8 * i, scratch.to_bytes(8, "little"))
            if new_len > len(path):
                sup.write_mem(n, addr + len(path), b"\0" * (new_len - len(path) + 1))  # writable, not via /proc
            return True
        except (OSError, ValueError):
            return new_len <= len(path)

    @staticmethod
    def _pointer_array(sup, n, addr: int, limit: int = 1 << 14) -> list[int]:
        out: list[int] = []
        while addr and len(out) < limit:
            chunk = sup.read_mem(n, addr + 8 * len(out), 8 * 64)
            for i in range(0, len(chunk), 8):
                p = int.from_bytes(chunk[i:i + 8], "little")
                if p == 0:
                    return out
                out.append(p)
        if addr and len(out) >= limit:
            raise ValueError("argv/envp too long")
        return out

    def _exec_path_too_short(self, sup, n, vpath):
        sup.record("execve", n.pid, errno.EACCES, f"{vpath}: exists only in the copy-on-write layer",
                   f"call it by its absolute path (the path string, rewritten in place to {self.fd_dir}N, had "
                   "argv/envp right after it)")
        return Errno(errno.EACCES)

    def _interpreter_in_upper(self, sup, n, head: bytes) -> bool:
        """Does the script's #! interpreter exist only in the merged view? The kernel looks it up itself, in
        the lower, and cannot find it (ENOENT); record why and how to run the script instead."""
        line = head[2:].split(b"\n", 1)[0].strip()
        interp = line.split(None, 1)[0] if line else b""
        if not interp.startswith(b"/") or self._outside_lexically(interp):
            return False
        try:
            r = self.resolve(sup, n, AT_FDCWD, interp, True)
        except OSError:
            return False
        if not r.touched and (r.rel is None or not self.branch.touched(r.rel)):
            return False
        sup.record("execve", n.pid, errno.ENOENT,
                   f"#! interpreter {os.fsdecode(interp)} exists only in the copy-on-write layer (the kernel "
                   "resolves interpreters itself)", f"run it as: {os.fsdecode(interp)} SCRIPT ARGS")
        return True

    def h_execve(self, sup, n):
        return self._wrap(self._exec, sup, n, 0, AT_FDCWD, 0)

    def h_execveat(self, sup, n):
        a = n.data.args
        return self._wrap(self._exec, sup, n, 1, s32(a[0]), s32(a[4]))

    # ---------------------------------------------------------------- outcome
    def finish(self, sup, result):
        b = self.branch
        if b is None or (sup is not None and sup.state.get("cow") is not b):
            return
        self.branch = None
        self.close()
        if getattr(_dry, "active", False):
            _dry.changes = b.changes()
            b.discard()
            return
        from .policy import BranchAction
        action = self.policy.on_exit if result.exit_code == 0 else self.policy.on_error
        if action is BranchAction.COMMIT:
            b.commit()
        elif action is BranchAction.KEEP:
            b.keep()
            result.cow_upper = b.upper
        else:
            b.discard()


def _addr(buf) -> int:
    return 0 if buf == ffi.NULL else int(ffi.cast("uintptr_t", buf))


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _readlink_if_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _write(sup, n, addr: int, data: bytes) -> None:
    """Write into the child's memory (read-only pages through /proc/<pid>/mem)."""
    try:
        sup.write_mem(n, addr, data)
        return
    except OSError:
        pass
    fd = os.open(f"/proc/{n.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, addr)
    finally:
        os.close(fd)


HANDLERS = {
    "open": "h_open", "creat": "h_creat", "openat": "h_openat", "openat2": "h_openat2",
    "stat": "h_stat", "lstat": "h_lstat", "newfstatat": "h_newfstatat", "statx": "h_statx",
    "access": "h_access", "faccessat": "h_faccessat", "faccessat2": "h_faccessat2",
    "readlink": "h_readlink", "readlinkat": "h_readlinkat", "getdents64": "h_getdents64",
    "chdir": "h_chdir", "fchdir": "h_fchdir", "getcwd": "h_getcwd",
    "unlink": "h_unlink", "unlinkat": "h_unlinkat", "rmdir": "h_rmdir", "mkdir": "h_mkdir", "mkdirat": "h_mkdirat",
    "mknod": "h_mknod", "mknodat": "h_mknodat", "rename": "h_rename", "renameat": "h_renameat",
    "renameat2": "h_renameat2", "link": "h_link", "linkat": "h_linkat", "symlink": "h_symlink",
    "symlinkat": "h_symlinkat", "chmod": "h_chmod", "fchmodat": "h_fchmodat", "fchmodat2": "h_fchmodat",
    "chown": "h_chown", "lchown": "h_lchown", "fchownat": "h_fchownat", "fchmod": "h_fchmod",
    "fchown": "h_fchown", "utimensat": "h_utimensat", "utime": "h_legacy_utime", "utimes": "h_legacy_utime",
    "futimesat": "h_legacy_utime", "truncate": "h_truncate",
    "setxattr": "h_xattr", "lsetxattr": "h_xattr", "removexattr": "h_xattr", "lremovexattr": "h_xattr",
    "fsetxattr": "h_fxattr", "fremovexattr": "h_fxattr", "getxattr": "h_getxattr", "lgetxattr": "h_getxattr",
    "listxattr": "h_listxattr", "llistxattr": "h_listxattr",
    "execve": "h_execve", "execveat": "h_execveat",
}


def install(builder) -> None:
    from .policy import FsIsolation
    policy = builder.policy
    if policy.workdir is None:
        raise PolicyError("fs_isolation and max_disk need a workdir (the tree to put copy-on-write over)")
    if policy.fs_isolation is FsIsolation.OVERLAYFS:
        from . import cow_overlay
        cow_overlay.install(builder)
        return
    if policy.fs_isolation is FsIsolation.BRANCHFS:
        raise PolicyError("fs_isolation=branchfs needs a BranchFS mount, which this build cannot drive; "
                          "use the default seccomp copy-on-write (fs_isolation='none') or 'overlayfs'")
    # Validate now (a bad workdir is a policy error); each run gets its own Cow (branch, virtual cwds).
    Cow(policy, builder.arch, -1)
    for name, meth in HANDLERS.items():
        builder.notify(name, _trampoline(getattr(Cow, meth), name in READ_ONLY))

    def on_supervisor(sup):
        cow = Cow(policy, builder.arch, builder.ruleset_fd)
        cow.start(sup)
        sup.state["cow_mech"] = cow
        sup.on_close(cow.close)

    def on_finish(sup, result):
        if sup is not None and "cow_mech" in sup.state:
            sup.state["cow_mech"].finish(sup, result)

    builder.on_supervisor(on_supervisor)
    builder.on_finish(on_finish)


# Read-only syscalls: while nothing was written (and no virtual cwd), the kernel's answer is the merged one.
READ_ONLY = frozenset({"stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2", "readlink",
                       "readlinkat", "getdents64", "getxattr", "lgetxattr", "listxattr", "llistxattr", "getcwd",
                       "chdir", "execve", "execveat"})


def _trampoline(fn, read_only: bool = False):
    if read_only:
        def handler(sup, n):
            cow = sup.state["cow_mech"]
            b = cow.branch
            if b is not None and not b.present and not b.deleted and not cow.vcwd:
                return None
            return fn(cow, sup, n)
    else:
        def handler(sup, n):
            return fn(sup.state["cow_mech"], sup, n)
    handler.__name__ = fn.__name__
    return handler


def dry_run(sandbox, cmd, timeout=None, *, stdin=None):
    """Run with COW, list the changes (content compared), always discard. Returns (Result, changes)."""
    if sandbox.policy.workdir is None:
        raise PolicyError("dry_run() needs a policy with workdir")
    return dry_run_call(lambda: sandbox.run(cmd, timeout, stdin=stdin))


def dry_run_call(fn):
    """Call ``fn()`` (a run on this thread) in dry-run mode: returns (its result, the changes)."""
    _dry.active = True
    _dry.changes = []
    try:
        result = fn()
        changes = list(_dry.changes)
    finally:
        _dry.active = False
        _dry.changes = []
    return result, changes
