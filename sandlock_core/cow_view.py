"""The merged view of the seccomp copy-on-write workdir: path resolution (upper over lower, whiteouts,
symlinks, ``..``, dirfds, /proc links, virtual cwds) and the helpers every COW handler shares. See cow.py."""
from __future__ import annotations

import collections
import errno
import os
import stat

from . import _sys, cow_commit, syscalls
from ._native import ffi
from .cow_branch import Branch, check_storage, storage_base
from .errors import PolicyError

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


class CowView:
    """Per-run state and the merged view; the handlers live in cow.Cow and its mixins."""

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
        self.fast = None  # cow_fast.CowFast: the read path in C, set per run
        self.lower_cache: dict[str, tuple[str, str | None]] = {}
        # Exec of an upper file rewrites the path string in place to a name of the injected fd: /dev/fd/N is
        # the shortest, where it is the usual link to /proc/self/fd (and no chroot can hide it).
        # Exec of an upper file under a Landlock filesystem policy goes through a memfd copy (cow_exec).
        self.exec_by_copy = bool(policy.fs_readable or policy.fs_writable or policy.net_bind or policy.net_connect
                                 or policy.isolate_ipc or policy.isolate_signals)
        # fs_denied also holds under the workdir: COW must not copy up, open, move or link a denied file for
        # the child (fsdeny.py, later in the chain, never sees the paths COW answers).
        from .fsdeny import DenySet
        self.deny = DenySet(policy.fs_denied) if policy.fs_denied else None
        self.fd_dir = "/dev/fd/" if not getattr(policy, "chroot", None) and _readlink("/dev/fd") in (
            "/proc/self/fd", "/proc/self/fd/") else "/proc/self/fd/"

    # ---------------------------------------------------------------- per run
    def start(self, sup):
        storage = storage_base(self.policy.fs_storage)
        check_storage(self.workdir, storage)
        cow_commit.recover(self.workdir, storage)  # a commit killed half way: finish it before reading the tree
        self.branch = Branch(self.workdir, storage, self.policy.max_disk, lazy=True)
        self.branch.deny = self.deny
        self.vcwd = {}
        self.tgids = {}
        self.dir_cache = {}
        self.lower_cache = {}
        self.fast = None
        sup.state["cow"] = self.branch

    def _opener(self):
        if self.opener is None:
            from .fsdeny import Opener
            self.opener = Opener(self.ruleset_fd)
        return self.opener

    def close(self):
        if self.fast is not None:
            self.fast.close()
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
        if self.fast is not None:
            self.fast.vcwd_changed()

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
        workdir during a run (the child's writes go to the upper), so the lower is fixed until the commit
        (a commit by another sandbox on the same workdir meanwhile is not seen by this run's resolution; if the
        policy makes the workdir writable to the child, COW is documented as no boundary)."""
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

    def _lookup(self, rel: str):
        """Branch.lookup, without a system call for a name the (cached) lower does not have."""
        b = self.branch
        if rel and rel not in b.present and self._lower_entry(rel)[0] is _MISSING:
            return None
        return b.lookup(rel)

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

    def _check_denied(self, path: str, fd: int = -1) -> None:
        """EACCES if the file at ``path`` (or open as ``fd``: judged by inode too) is in fs_denied."""
        if self.deny is None:
            return
        try:
            st = os.fstat(fd) if fd >= 0 else os.lstat(path)
        except OSError:
            st = None
        if self.deny.denied(path, st, fd):
            raise OSError(errno.EACCES, f"{path} is in fs_denied")

    def _check_denied_rel(self, rel: str) -> None:
        """EACCES when the workdir name rel is denied (a name to be created or replaced, or a lower entry)."""
        if self.deny is not None:
            self._check_denied(self.branch.lower_path(rel))

    def _fd_path(self, sup, n, fd: int):
        """(dup, virtual path, in_upper) of the child's fd, or (dup, None, False) when not a path."""
        dup = sup.dup_child_fd(n, fd)
        real = os.readlink(f"/proc/self/fd/{dup}")
        if not real.startswith("/") or real.endswith(" (deleted)"):
            return dup, None, False
        v, up = self.branch.virtual_of(real)
        return dup, v, up

def _empty_path(n, addr: int) -> bool:
    """Is the path argument NULL or "" (an fstat through AT_EMPTY_PATH)? One byte read, no validity check: a
    stale notification or a byte the child changes afterwards only changes which metadata the kernel reports
    (stat-like calls reveal nothing the child could not stat itself; the merged view is the only stake)."""
    if not addr:
        return True
    try:
        return _sys.process_vm_readv(n.pid, addr, 1) == b"\0"
    except OSError:
        return False


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
