"""Copy-on-write mutations under the workdir, done by the supervisor in the upper: unlink/rmdir (whiteouts),
mkdir, mknod, rename, link, symlink, chmod/chown/utimensat/truncate (copy-up first), xattrs, fd metadata."""
from __future__ import annotations

import errno
import os
import stat

from . import syscalls
from ._native import ffi, lib
from .cow_view import (AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_SYMLINK_NOFOLLOW,
                       RENAME_NOREPLACE, _addr, _write)
from .notif import Errno, Value, s32


class CowMutations:
    """Mixin of cow.Cow (uses its resolve, branch, _wrap)."""

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
            self._check_denied(vp)
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
        if look[0] == "L":
            b.refuse_denied(rel, look[1])  # a whiteout would delete it at the commit
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
            self._check_denied(vp)
            self._host(lambda: os.mkdir(vp, mode & 0o7777))
            return Value(0)
        rel = r.rel
        if rel == "" or b.lookup(rel) is not None:
            return Errno(errno.EEXIST)
        self._check_denied_rel(rel)
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
        self._check_denied_rel(rel)
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
            self._check_denied(s)
            self._check_denied(d)
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
        self._check_denied_rel(d)  # replacing (or creating) a denied name; the source is judged at its copy-up
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
            self._check_denied(s)
            self._check_denied(d)
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
        self._check_denied_rel(dst.rel)
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
            self._check_denied(d)
            self._host(lambda: os.symlink(target, d))
            return Value(0)
        if dst.rel == "" or b.lookup(dst.rel) is not None:
            return Errno(errno.EEXIST)
        if not target:
            return Errno(errno.ENOENT)
        self._check_denied_rel(dst.rel)
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
        return self._meta_path(sup, n, sup.path_arg(n, idx), dirfd, follow, fn)

    def _meta_path(self, sup, n, path: bytes, dirfd, follow, fn):
        b = self.branch
        r = self.resolve(sup, n, dirfd, path, follow)
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

    def _utimens_fn(self, times: bytes | None):
        """fn(fd[, leaf]) setting ``times`` (struct timespec[2], or None: now) like utimensat."""
        tbuf = ffi.new("char[]", times) if times else ffi.NULL
        nr = self.nr["utimensat"]

        def apply(fd, leaf=None):
            name = ffi.new("char[]", os.fsencode(leaf)) if leaf is not None else ffi.NULL
            rc = lib.sl_raw_syscall6(nr, fd, _addr(name), _addr(tbuf), AT_SYMLINK_NOFOLLOW if leaf else 0, 0, 0)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
        return apply

    def set_times(self, sup, n, dirfd: int, path_addr, nofollow: bool, empty_ok: bool, times: bytes):
        """utimensat/utimes/utime whose times deterministic.py decided (its clock's "now"; it comes first in
        the chain): done in the upper for a workdir object (never on the lower), None for anything else (the
        caller goes on: metadata guard or its own lookup)."""
        if self.branch is None:
            return None
        apply = self._utimens_fn(times)
        path = sup.read_cstr(n, path_addr) if path_addr is not None else b""
        if path == b"" and path_addr is not None and not empty_ok:
            return Errno(errno.ENOENT)
        if path == b"" and dirfd != AT_FDCWD:
            return self._wrap(self._fd_meta, sup, n, dirfd, apply)
        if path and self._outside_lexically(path) and self.branch.clean and not self.vcwd:
            return None
        return self._wrap(self._meta_path, sup, n, path or b".", dirfd, not nofollow,
                          lambda pfd, leaf: apply(pfd, leaf))

    def h_utimensat(self, sup, n):
        a = n.data.args
        flags = s32(a[3])
        apply = self._utimens_fn(sup.read_mem(n, a[2], 32) if a[2] else None)
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
        """fchmod/fchown/futimens: on the copied-up file if fd is a lower workdir file, on the child's own
        upper file (our duplicate: the very object the child named, no race); any other fd is not COW's
        business (None: the metadata guard or the kernel judges it)."""
        b = self.branch
        dup, v, up = self._fd_path(sup, n, fd)
        try:
            rel = b.rel_of(v) if v is not None else None
            if rel is None:
                return None
            if up:
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
        if v is not None and self.branch.rel_of(v) is not None:
            return Errno(errno.ENOTSUP)  # lower or upper file: xattrs in the workdir are not versioned
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
