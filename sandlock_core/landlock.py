"""Landlock: ABI probe, rights per ABI, and the ruleset built from a policy (in the parent; the child only
calls landlock_restrict_self on it).

Rights: readable paths get EXECUTE|READ_FILE|READ_DIR; writable paths get every right the ABI handles. A
regular file keeps only the rights that apply to files (the kernel refuses directory rights on a file).
TCP port rules (ABI 4) are handled only for the lists the policy gives; scopes (ABI 6) only when asked.
"""
from __future__ import annotations

import functools
import os
import stat

from . import _sys
from .errors import LandlockUnavailableError, PolicyError

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13       # ABI 2
TRUNCATE = 1 << 14    # ABI 3
IOCTL_DEV = 1 << 15   # ABI 5
NET_BIND_TCP = 1 << 0      # ABI 4
NET_CONNECT_TCP = 1 << 1   # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6
RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1  # ABI 7
RESTRICT_SELF_LOG_NEW_EXEC_ON = 2
RESTRICT_SELF_LOG_SUBDOMAINS_OFF = 4

READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV


@functools.lru_cache(maxsize=None)
def abi_version() -> int:
    return _sys.landlock_abi_version()


def handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def write_rights(abi: int) -> int:
    return handled_fs(abi)


class RulesetInfo:
    def __init__(self, fd: int, abi: int, missing: list[str]):
        self.fd, self.abi, self.missing = fd, abi, missing

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def _require(what: str, need: int, abi: int, best_effort: bool, missing: list[str]) -> bool:
    if abi >= need:
        return True
    if best_effort:
        missing.append(f"{what} (needs Landlock ABI {need}, this kernel has {abi})")
        return False
    raise LandlockUnavailableError(f"{what} needs Landlock ABI {need}; this kernel has "
                                   f"{'ABI ' + str(abi) if abi else 'no Landlock'} (use best_effort to run "
                                   f"without it)")


def build_ruleset(*, readable=(), writable=(), bind_ports=(), connect_ports=(), isolate_ipc=False,
                  isolate_signals=False, best_effort=False, abi=None) -> RulesetInfo | None:
    """Create the ruleset; returns None when best effort leaves nothing to enforce."""
    kabi = abi_version()
    abi = kabi if abi is None else min(abi, kabi)
    missing: list[str] = []
    want_fs = bool(readable or writable)
    if want_fs and not _require("filesystem rules", 1, abi, best_effort, missing):
        want_fs = False
    net = 0
    if bind_ports and _require("net_bind (TCP port rules, Linux 6.7)", 4, abi, best_effort, missing):
        net |= NET_BIND_TCP
    if connect_ports and _require("net_connect (TCP port rules, Linux 6.7)", 4, abi, best_effort, missing):
        net |= NET_CONNECT_TCP
    scoped = 0
    if isolate_ipc and _require("isolate_ipc (abstract UNIX socket scope, Linux 6.12)", 6, abi, best_effort,
                                missing):
        scoped |= SCOPE_ABSTRACT_UNIX_SOCKET
    if isolate_signals and _require("isolate_signals (signal scope, Linux 6.12)", 6, abi, best_effort, missing):
        scoped |= SCOPE_SIGNAL
    fs_rights = handled_fs(abi) if want_fs else 0
    if not (fs_rights or net or scoped):
        return RulesetInfo(-1, abi, missing) if missing else None
    size = 24 if scoped else (16 if net else 8)
    fd = _sys.landlock_create_ruleset(fs_rights, net, scoped, size=size)
    info = RulesetInfo(fd, abi, missing)
    try:
        if want_fs:
            rights: dict[str, int] = {}
            for p in readable:
                rights[p] = rights.get(p, 0) | READ_RIGHTS
            for p in writable:
                rights[p] = rights.get(p, 0) | write_rights(abi)
            for path, allowed in rights.items():
                field = "fs_writable" if path in writable else "fs_readable"
                _add_path(fd, path, allowed & fs_rights, field)
        for port in bind_ports if net & NET_BIND_TCP else ():
            _sys.landlock_add_net_rule(fd, NET_BIND_TCP, port)
        for port in connect_ports if net & NET_CONNECT_TCP else ():
            _sys.landlock_add_net_rule(fd, NET_CONNECT_TCP, port)
    except BaseException:
        info.close()
        raise
    return info


def _add_path(ruleset_fd: int, path: str, allowed: int, field: str) -> None:
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PolicyError(f"{field}: {path!r} does not exist") from None
    except OSError as exc:
        raise PolicyError(f"{field}: {path!r} cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(pfd).st_mode):
            allowed &= FILE_RIGHTS
        _sys.landlock_add_path_rule(ruleset_fd, allowed, pfd)
    finally:
        os.close(pfd)


def confine_self(info: RulesetInfo) -> None:
    """NO_NEW_PRIVS, then restrict the calling thread (Landlock applies per thread)."""
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    _sys.landlock_restrict_self(info.fd)


def describe_features(abi: int) -> list[tuple[str, bool, str]]:
    return [
        ("Landlock fs rules", abi >= 1, "fs_readable / fs_writable"),
        ("Landlock REFER", abi >= 2, "rename/link across directories"),
        ("Landlock TRUNCATE", abi >= 3, "truncate is a write right"),
        ("Landlock TCP ports", abi >= 4, "net_bind / net_connect"),
        ("Landlock IOCTL_DEV", abi >= 5, "device ioctls need a write grant"),
        ("Landlock scopes", abi >= 6, "isolate_ipc / isolate_signals"),
        ("Landlock audit flags", abi >= 7, "kernel audit of denials (needs audit enabled)"),
    ]
