"""Python face of the native bindings: every call returns its result or raises ``OSError`` with errno.

The compiled module (``_native``) is built by cffi in API mode at install time; this module only turns
``-errno`` returns into exceptions and bytes into buffers. Nothing here decides policy.
"""
from __future__ import annotations

import os

from ._native import ffi, lib

# seccomp(2)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_THP_DISABLE = 41
PR_SET_CHILD_SUBREAPER = 36

ADDR_NO_RANDOMIZE = 0x0040000


def _check(ret: int) -> int:
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def landlock_create_ruleset(handled_fs: int, handled_net: int = 0, scoped: int = 0, *, size: int | None = None) -> int:
    attr = ffi.new("struct sl_ruleset_attr *", (handled_fs, handled_net, scoped))
    if size is None:
        size = 24 if scoped else (16 if handled_net else 8)
    return _check(lib.sl_landlock_create_ruleset(attr, size, 0))


def landlock_abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    ret = lib.sl_landlock_create_ruleset(ffi.NULL, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    return ret if ret > 0 else 0


def landlock_add_path_rule(ruleset_fd: int, allowed: int, parent_fd: int) -> None:
    _check(lib.sl_landlock_add_path_rule(ruleset_fd, allowed, parent_fd))


def landlock_add_net_rule(ruleset_fd: int, allowed: int, port: int) -> None:
    _check(lib.sl_landlock_add_net_rule(ruleset_fd, allowed, port))


def landlock_restrict_self(ruleset_fd: int, flags: int = 0) -> None:
    _check(lib.sl_landlock_restrict_self(ruleset_fd, flags))


def seccomp_set_filter(program: bytes, flags: int = 0) -> int:
    """Install a BPF program (``program`` = packed ``struct sock_filter`` array); returns the listener fd or 0."""
    if len(program) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")
    return _check(lib.sl_seccomp_set_filter(program, len(program) // 8, flags))


def seccomp_action_avail(action: int) -> bool:
    buf = ffi.new("uint32_t *", action)
    return lib.sl_seccomp(SECCOMP_GET_ACTION_AVAIL, 0, buf) == 0


def notif_sizes() -> tuple[int, int, int]:
    """(sizeof seccomp_notif, seccomp_notif_resp, seccomp_data) as the running kernel reports them."""
    out = ffi.new("uint16_t[3]")
    _check(lib.sl_notif_sizes(out))
    return out[0], out[1], out[2]


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(lib.sl_prctl(option, a2, a3, a4, a5))


def pidfd_open(pid: int, flags: int = 0) -> int:
    return _check(lib.sl_pidfd_open(pid, flags))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    return _check(lib.sl_pidfd_getfd(pidfd, fd, 0))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(lib.sl_pidfd_send_signal(pidfd, sig))


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    _check(lib.sl_close_range(first, last, flags))


def process_vm_readv(pid: int, addr: int, size: int) -> bytes:
    """Read ``size`` bytes of ``pid``'s memory at ``addr`` (short reads are returned as they are)."""
    buf = ffi.new("char[]", size)
    n = _check(lib.sl_process_vm_readv(pid, buf, size, addr))
    return ffi.buffer(buf, n)[:]


def process_vm_writev(pid: int, addr: int, data: bytes) -> int:
    return _check(lib.sl_process_vm_writev(pid, data, len(data), addr))


def raw_syscall(nr: int, *args: int) -> int:
    a = list(args) + [0] * (6 - len(args))
    return _check(lib.sl_raw_syscall6(nr, *a))


def send_fd(sock: int, fd: int) -> None:
    _check(lib.sl_send_fd(sock, fd))


def recv_msg_fd(sock: int, cap: int = 64) -> tuple[bytes, int]:
    """Receive one message and at most one passed fd (-1 if none)."""
    buf = ffi.new("char[]", cap)
    fd = ffi.new("int *")
    n = _check(lib.sl_recv_msg_fd(sock, buf, cap, fd))
    return ffi.buffer(buf, n)[:], fd[0]


RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64 (new syscalls share the generic table)


def openat2(dirfd: int, path, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): like os.open(path, flags, mode, dir_fd=dirfd) with RESOLVE_* restrictions."""
    how = ffi.new("uint64_t[3]", (flags, mode, resolve))
    p = ffi.new("char[]", os.fsencode(path))
    return _check(lib.sl_raw_syscall6(_SYS_OPENAT2, dirfd, int(ffi.cast("intptr_t", p)),
                                      int(ffi.cast("intptr_t", how)), 24, 0, 0))


POLL_MAX_MS = 0x7FFFFFFF  # poll(2) and epoll_wait(2) take an int


def poll_ms(seconds: float) -> int:
    """``seconds`` as a poll(2) timeout: milliseconds rounded up (never a busy loop before a deadline), at least
    0, at most what an int holds (``--timeout`` of weeks would otherwise raise OverflowError)."""
    return min(POLL_MAX_MS, max(0, int(seconds * 1000) + 1))
