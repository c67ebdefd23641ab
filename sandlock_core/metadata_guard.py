"""The metadata guard's handlers (see ``metadata``): locate the target in the child's view, judge that very
object, change it on the thread that carries the sandbox's Landlock domain. Imported only when a policy
lets something be written: a read-only policy refuses these syscalls in the filter and never loads this."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from . import _sys, syscalls
from .metadata import FILEATTR_ARG_SIZE, HINT
from .fsdeny import DenySet
from .notif import AT_FDCWD, Errno, Value, s32

AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_MAX = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_NR_UTIMENSAT = syscalls.number("utimensat")
_libc.fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int)


def _cerr(ret: int) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _utimensat(fd: int, path: bytes | None, times: bytes | None, flags: int = 0) -> None:
    # the raw syscall: glibc's wrapper refuses a NULL path (futimens on the fd itself) with EINVAL
    buf = ctypes.create_string_buffer(times, 32) if times is not None else None
    p = ctypes.c_char_p(path) if path is not None else None
    _sys.raw_syscall(_NR_UTIMENSAT, fd,
                     ctypes.cast(p, ctypes.c_void_p).value or 0 if p is not None else 0,
                     ctypes.addressof(buf) if buf is not None else 0, flags)


def _fchownat_empty(fd: int, uid: int, gid: int) -> None:
    _cerr(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH))


class Metadata:
    def __init__(self, policy):
        self.deny = DenySet(policy.fs_denied)
        self.roots = [os.path.realpath(p) for p in policy.fs_writable]
        # Under a pid namespace (isolate_pids) the child's /proc is not ours: absolute names are walked from its
        # root (/proc/<pid>/root, RESOLVE_IN_ROOT), so /proc/<n> there is its process n, never ours.
        self.in_root = False

    def allowed(self, real: str, st, fd: int) -> bool:
        if not real.startswith("/"):
            return False  # pipes, sockets, anon inodes
        if not any(real == r or r == "/" or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            return False
        return not self.deny.denied(real, st, fd)

    # ---- locating the target ----
    def _target(self, sup, n, dirfd: int, path_addr: int | None, nofollow: bool, empty_ok: bool):
        """(fd, is_child_fd): an O_PATH fd of the target (path) or a duplicate of the child's fd."""
        if path_addr is None:
            return sup.dup_child_fd(n, dirfd), True
        path = sup.read_cstr(n, path_addr)
        if not path:
            if not empty_ok:
                raise OSError(errno.ENOENT, "empty path")
            if dirfd == AT_FDCWD:
                return os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_CLOEXEC), False
            return sup.dup_child_fd(n, dirfd), True
        base = AT_FDCWD
        resolve = _sys.RESOLVE_NO_MAGICLINKS
        if path.startswith(b"/"):
            if self.in_root:
                base = os.open(f"/proc/{n.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                resolve |= _sys.RESOLVE_IN_ROOT
        else:
            if dirfd == AT_FDCWD:
                base = os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                base = sup.dup_child_fd(n, dirfd)
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
        try:
            fd = sup.state["metadata.opener"].call(
                lambda: _sys.openat2(base, path, flags, 0, resolve))
        finally:
            if base != AT_FDCWD:
                os.close(base)
        return fd, False

    def run(self, sup, n, name: str, dirfd: int, path_addr, nofollow: bool, op, empty_ok: bool = False):
        """Locate, judge, and run ``op(fd, is_child_fd, st)`` on the opener thread."""
        try:
            fd, child = self._target(sup, n, dirfd, path_addr, nofollow, empty_ok)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
            if not self.allowed(real, st, fd):
                sup.record(name, n.pid, errno.EACCES, real, HINT)
                return Errno(errno.EACCES)
            if not child and stat.S_ISLNK(st.st_mode) and op.__name__ != "chown":
                return Errno(errno.EOPNOTSUPP)
            sup.state["metadata.opener"].call(lambda: op(fd, child, st))
            return Value(0)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        finally:
            os.close(fd)

    # ---- operations (fd: O_PATH of the target, or a dup of the child's fd when child=True) ----
    @staticmethod
    def chmod_op(mode):
        def chmod(fd, child, st):
            if child:
                os.fchmod(fd, mode)
            else:
                os.chmod(f"/proc/self/fd/{fd}", mode)
        return chmod

    @staticmethod
    def chown_op(uid, gid):
        def chown(fd, child, st):
            if child:
                os.fchown(fd, uid, gid)
            else:
                _fchownat_empty(fd, uid, gid)  # works on an O_PATH fd, symlinks included
        return chown

    @staticmethod
    def utimes_op(times):
        def utimes(fd, child, st):
            if child:
                _utimensat(fd, None, times)
            else:
                _utimensat(AT_FDCWD, b"/proc/self/fd/%d" % fd, times)
        return utimes

    @staticmethod
    def setxattr_op(attr, value, flags):
        def setxattr(fd, child, st):
            os.setxattr(fd if child else f"/proc/self/fd/{fd}", attr, value, flags)
        return setxattr

    @staticmethod
    def removexattr_op(attr):
        def removexattr(fd, child, st):
            os.removexattr(fd if child else f"/proc/self/fd/{fd}", attr)
        return removexattr

    @staticmethod
    def fileattr_op(cmd, arg: bytes):
        def fileattr(fd, child, st):
            fcntl.ioctl(fd, cmd, bytearray(arg))  # our copy: the kernel never reads the child's memory
        return fileattr

    def fileattr_ioctl(self, sup, n):
        """ioctl(fd, FS_IOC_*SET*, arg): on behalf, on a duplicate of the fd, inside fs_writable only."""
        a = n.data.args
        cmd = a[1] & 0xFFFFFFFF
        size = FILEATTR_ARG_SIZE.get(cmd)
        if size is None:
            return None  # another ioctl (when something else notifies them all)
        try:
            arg = sup.read_mem(n, a[2], size)
            if len(arg) != size:
                return Errno(errno.EFAULT)
        except OSError as exc:
            return Errno(exc.errno or errno.EFAULT)
        return self.run(sup, n, "ioctl", s32(a[0]), None, False, self.fileattr_op(cmd, arg))

    # ---- argument decoding ----
    def _times(self, sup, n, addr: int, kind: str) -> bytes | None:
        """The child's times as a timespec[2] (None: now)."""
        if addr == 0:
            return None
        if kind == "timespec":
            return sup.read_mem(n, addr, 32)
        if kind == "utimbuf":
            a, m = struct.unpack("=qq", sup.read_mem(n, addr, 16))
            return struct.pack("=qqqq", a, 0, m, 0)
        s0, u0, s1, u1 = struct.unpack("=qqqq", sup.read_mem(n, addr, 32))  # timeval[2]
        if not (0 <= u0 < 1000000 and 0 <= u1 < 1000000):
            raise OSError(errno.EINVAL, "bad timeval")
        return struct.pack("=qqqq", s0, u0 * 1000, s1, u1 * 1000)

    def _xattr(self, sup, n, name_addr: int, value_addr: int | None = None, size: int = 0):
        attr = sup.read_cstr(n, name_addr, 256)
        if not attr or len(attr) > 255:
            raise OSError(errno.ERANGE, "bad xattr name")
        if value_addr is None:
            return os.fsdecode(attr), None
        if size > XATTR_MAX:
            raise OSError(errno.E2BIG, "xattr value too large")
        value = sup.read_mem(n, value_addr, size) if size else b""
        if len(value) != size:
            raise OSError(errno.EFAULT, "short read")
        return os.fsdecode(attr), value

    def handlers(self):
        def guard(fn):
            def h(sup, n):
                try:
                    return fn(sup, n, n.data.args)
                except OSError as exc:
                    return Errno(exc.errno or errno.EACCES)
            return h

        def chmod_at(name, dirfd_i, path_i, mode_i, flags_i):
            def f(sup, n, a):
                flags = s32(a[flags_i]) if flags_i is not None else 0
                dirfd = s32(a[dirfd_i]) if dirfd_i is not None else AT_FDCWD
                return self.run(sup, n, name, dirfd, a[path_i], bool(flags & AT_SYMLINK_NOFOLLOW),
                                self.chmod_op(a[mode_i] & 0o7777), bool(flags & AT_EMPTY_PATH))
            return guard(f)

        def chown_at(name, dirfd_i, path_i, flags_i, nofollow=False):
            def f(sup, n, a):
                uid, gid = s32(a[path_i + 1]), s32(a[path_i + 2])
                flags = s32(a[flags_i]) if flags_i is not None else 0
                dirfd = s32(a[dirfd_i]) if dirfd_i is not None else AT_FDCWD
                return self.run(sup, n, name, dirfd, a[path_i], nofollow or bool(flags & AT_SYMLINK_NOFOLLOW),
                                self.chown_op(uid, gid), bool(flags & AT_EMPTY_PATH))
            return guard(f)

        def by_fd(name, make_op):
            return guard(lambda sup, n, a: self.run(sup, n, name, s32(a[0]), None, False, make_op(sup, n, a)))

        def utimensat(sup, n, a):
            flags = s32(a[3])
            times = self._times(sup, n, a[2], "timespec")
            path_addr = a[1] if a[1] else None  # NULL path: the fd itself (futimens)
            return self.run(sup, n, "utimensat", s32(a[0]), path_addr, bool(flags & AT_SYMLINK_NOFOLLOW),
                            self.utimes_op(times), bool(flags & AT_EMPTY_PATH))

        def path_times(name, kind, dirfd_i, path_i, times_i):
            def f(sup, n, a):
                dirfd = s32(a[dirfd_i]) if dirfd_i is not None else AT_FDCWD
                times = self._times(sup, n, a[times_i], kind)
                return self.run(sup, n, name, dirfd, a[path_i], False, self.utimes_op(times))
            return guard(f)

        def setx(name, by, nofollow=False):
            def f(sup, n, a):
                attr, value = self._xattr(sup, n, a[1], a[2], a[3])
                op = self.setxattr_op(attr, value, s32(a[4]))
                if by == "fd":
                    return self.run(sup, n, name, s32(a[0]), None, False, op)
                return self.run(sup, n, name, AT_FDCWD, a[0], nofollow, op)
            return guard(f)

        def removex(name, by, nofollow=False):
            def f(sup, n, a):
                attr, _ = self._xattr(sup, n, a[1])
                op = self.removexattr_op(attr)
                if by == "fd":
                    return self.run(sup, n, name, s32(a[0]), None, False, op)
                return self.run(sup, n, name, AT_FDCWD, a[0], nofollow, op)
            return guard(f)

        return {
            "chmod": chmod_at("chmod", None, 0, 1, None),
            "fchmodat": chmod_at("fchmodat", 0, 1, 2, None),
            "fchmodat2": chmod_at("fchmodat2", 0, 1, 2, 3),
            "fchmod": by_fd("fchmod", lambda sup, n, a: self.chmod_op(a[1] & 0o7777)),
            "chown": chown_at("chown", None, 0, None),
            "lchown": chown_at("lchown", None, 0, None, nofollow=True),
            "fchownat": chown_at("fchownat", 0, 1, 4),
            "fchown": by_fd("fchown", lambda sup, n, a: self.chown_op(s32(a[1]), s32(a[2]))),
            "utime": path_times("utime", "utimbuf", None, 0, 1),
            "utimes": path_times("utimes", "timeval", None, 0, 1),
            "futimesat": guard(lambda sup, n, a: (
                path_times("futimesat", "timeval", 0, 1, 2)(sup, n) if a[1]
                else self.run(sup, n, "futimesat", s32(a[0]), None, False,
                              self.utimes_op(self._times(sup, n, a[2], "timeval"))))),
            "utimensat": guard(utimensat),
            "setxattr": setx("setxattr", "path"),
            "lsetxattr": setx("lsetxattr", "path", nofollow=True),
            "fsetxattr": setx("fsetxattr", "fd"),
            "removexattr": removex("removexattr", "path"),
            "lremovexattr": removex("lremovexattr", "path", nofollow=True),
            "fremovexattr": removex("fremovexattr", "fd"),
        }


