"""Copy-on-write filesystem isolation of ``workdir`` by seccomp (no namespaces, no root).

The child's filesystem syscalls that name a path under the workdir are notified; the supervisor resolves the
path itself in the *merged* view (upper over lower, whiteouts, symlinks followed component by component,
``..``, dirfds, ``/proc/<pid>/{cwd,fd,root}``; ``cow_view``) and then:

* read-only opens and stat-like calls of an untouched lower entry CONTINUE: the kernel does them on the lower
  file at full speed (the fast path; when nothing was written yet the path is not even read). "Untouched":
  no component the walk went through is an upper entry other than a plain copy of the lower directory (those
  are made to hold copied-up children, and the kernel walking the lower finds the same names), and the entry
  itself has no upper copy or whiteout. Most of these are answered by the C receive loop without waking
  Python (``cow_fast``: before the first write on the registers alone, afterwards on the name checked against a
  table of touched names, the lower walked with RESOLVE_NO_SYMLINKS); what it cannot decide comes here. The
  lower is cached per run (it does not change while the sandbox runs). fstat (newfstatat/statx with
  AT_EMPTY_PATH) is not notified at all;
* opens that write, create or truncate copy the file up and inject an fd on the upper file (ADDFD|SEND), so
  later reads and writes run at kernel speed;
* unlink/rmdir/mkdir/rename/link/symlink/chmod/chown/utimensat/truncate/mknod are done in the upper and
  recorded (whiteouts for deletions; ``cow_mutate``);
* stat/statx/access/readlink of touched entries are answered from the upper (written into the child's
  buffer); getdents64 on a directory whose content changed returns a merged listing (the file position is the
  index into it); chdir into a directory that exists only in the upper gives the process a *virtual cwd*
  (getcwd answers it; relative paths resolve against it; forks inherit it).
* exec of a binary that exists only in the upper (``cow_exec``): the fd is injected and the path string
  rewritten in place to ``/dev/fd/N``; a shorter string (``./prog``) takes it by running over the bytes after
  its NUL, once every argv/envp string starting there (argv[0] too: shells pass it as the path, and a venv's
  python finds itself through it) was moved below the thread's stack pointer (only for an ELF or ``#!`` file
  with an x bit, which the kernel will run: the old memory is never used again). Under a Landlock filesystem
  policy no rule covers the branch storage, so the child gets a sealed memfd copy to run. A ``#!`` interpreter
  that exists only in the upper (a venv's ``bin/pip``) cannot be found by the kernel, which looks it up in the
  lower: the child runs a sealed ``#!/bin/sh`` memfd that execs the interpreter with the argv the kernel would
  have built, and that exec comes back here.

Rename or link between the workdir and the outside answers EXDEV (programs fall back to copy + delete).
Commit is journaled (``cow_commit``): a commit killed half way is rolled forward by the next one.

What is a boundary and what is not:
* Decisions to CONTINUE depend on the path bytes, which a racing thread can change before the kernel reads
  them. For reads and stat-like calls this only changes which *view* the racer gets (the lower, pre-run file,
  which it could read before it changed it; Landlock judges the kernel's open). For writes it matters: the
  kernel could be made to write the lower. That is refused by Landlock when the policy has filesystem rules
  that do not make the workdir writable (``tests/test_cow_race.py``). A policy without filesystem rules (the
  child may write the whole host anyway) or one that makes the workdir or a parent writable gets COW as a
  convenience, not a boundary.
* For reads, a path that is lexically outside the workdir is not resolved: a symlink elsewhere that points
  into the workdir reads the lower (pre-run) file; in the C loop this holds for relative names too (made
  absolute against a cwd or dirfd outside the workdir). Writes are always resolved. A stat with AT_EMPTY_PATH
  and a non-empty name (no libc makes one) is not notified: it gets the lower entry.
* A file opened read-only before it was copied up keeps showing the lower content (as old OverlayFS).
* A script run from the upper goes through a ``/bin/sh`` relay (one more exec, same argv and environment);
  without /bin/sh it sees ``$0`` as ``/dev/fd/N``. The branch directories are made on the first write.
* xattrs under the workdir cannot be changed (ENOTSUP); legacy utime/utimes/futimesat there answer ENOSYS
  (with NULL times under ``time_start`` they are done in the upper: deterministic.py hands them over).
* COW acts only on objects of the workdir and of its own upper; any other path or fd passes on (None) to
  Landlock, the metadata guard and fsdeny, and what COW must open outside the workdir (an upper symlink's
  target) is opened on the Landlock-confined thread. fs_denied holds inside the workdir: a denied entry is
  never copied up, opened, moved, linked, whited out or created (EACCES; judged by inode on the opened file).
* The branch storage (upper and commit journal) must not be writable by a child that cannot write the
  workdir: such a policy is refused (``_check_storage_not_writable``).
"""
from __future__ import annotations

import errno
import os
import stat
import threading

from ._native import ffi, lib
from .cow_exec import CowExec
from .cow_mutate import CowMutations
from .cow_view import (AT_EACCESS, AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, O_ACCMODE, O_TMPFILE, CowView,
                       _addr, _empty_path, _readlink, _write)
from .errors import PolicyError
from .notif import Errno, InjectFd, Value, s32

_dry = threading.local()


class Cow(CowView, CowMutations, CowExec):
    """The seccomp COW handlers: opens, the stat family, directories, the outcome (mutations and exec in
    the mixins)."""

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
            try:
                if self.deny is not None:  # fsdeny never sees this open
                    self._check_denied(os.readlink(f"/proc/self/fd/{fd}"), fd)
            except BaseException:
                os.close(fd)
                raise
            return InjectFd(fd, cloexec)
        rel = r.rel
        if not write and not r.touched and not b.touched(rel):
            return None  # an untouched lower entry (or none): the kernel's answer is the merged one
        look = self._lookup(rel)
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
            self._check_denied_rel(rel)
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
        if flags & AT_EMPTY_PATH and _empty_path(n, n.data.args[idx]):
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
        if flags & AT_EMPTY_PATH and _empty_path(n, a[1]):
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

    # ---------------------------------------------------------------- outcome
    def finish(self, sup, result):
        b = self.branch
        if b is None or (sup is not None and sup.state.get("cow") is not b):
            return
        self.branch = None
        self.close()
        conclude(b, self.policy, result)


def conclude(b, policy, result) -> None:
    """A finished run's branch: its changes recorded and dropped (dry run), or on_exit/on_error applied.
    Shared by the seccomp COW and the OverlayFS mode (whose upper is adopted into a branch first)."""
    if getattr(_dry, "active", False):
        _dry.changes = b.changes()
        b.discard()
        return
    from .policy_spec import BranchAction
    action = policy.on_exit if result.exit_code == 0 else policy.on_error
    if action is BranchAction.COMMIT:
        b.commit()
    elif action is BranchAction.KEEP:
        b.keep()
        result.cow_upper = b.upper
    else:
        b.discard()


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
    _check_storage_not_writable(policy)
    handlers = {}
    for name, meth in HANDLERS.items():
        handlers[name] = _trampoline(getattr(Cow, meth), name in READ_ONLY)
        builder.notify(name, handlers[name], when=NOTIFY_WHEN.get(name))

    def on_supervisor(sup):
        from . import cow_fast
        cow = Cow(policy, builder.arch, builder.ruleset_fd)
        cow.start(sup)
        sup.state["cow_mech"] = cow
        sup.on_close(cow.close)
        cow.fast = cow_fast.setup(cow, sup, handlers, policy, builder.arch)

    def on_finish(sup, result):
        if sup is not None and "cow_mech" in sup.state:
            cow = sup.state["cow_mech"]
            if cow.fast is not None and hasattr(result, "notifications"):
                result.notifications += cow.fast.served  # answered in C: the loop never saw them
            cow.finish(sup, result)

    builder.on_supervisor(on_supervisor)
    builder.on_finish(on_finish)


def _check_storage_not_writable(policy) -> None:
    """The branch storage holds the upper and the commit journal, both applied to the workdir later: a child
    that may write it but not the workdir could smuggle content (or a whole journal) into the workdir. Where
    the workdir is writable too, COW is no boundary anyway (see the module docstring)."""
    from .cow_branch import storage_base
    if not policy.fs_writable:
        return
    storage, wd = storage_base(policy.fs_storage), os.path.realpath(policy.workdir)
    covers = [p for p in policy.fs_writable if _under(storage, os.path.realpath(p))]
    if covers and not any(_under(wd, os.path.realpath(p)) for p in policy.fs_writable):
        raise PolicyError(f"fs_writable: {covers[0]!r} covers the copy-on-write storage {storage!r} but not the "
                          f"workdir: the sandbox could rewrite its own branch and commit journal; set fs_storage "
                          f"to a directory outside fs_writable")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# fstat is newfstatat/statx(fd, "", AT_EMPTY_PATH): the kernel answers for the very file the fd is on, so the
# filter lets those through (no round trip; a fifth of python3 -c pass's notifications). A caller that passes
# AT_EMPTY_PATH with a non-empty name gets the kernel's (lower) answer for it: a stat, nothing more.
NOTIFY_WHEN = {"newfstatat": (3, AT_EMPTY_PATH, 0), "statx": (2, AT_EMPTY_PATH, 0)}

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
