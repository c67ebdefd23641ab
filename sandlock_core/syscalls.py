"""Syscall names and numbers per architecture, and the default blocklist.

The numbers live in ``_syscall_table.py``, generated from libseccomp by ``tools/gen_syscalls.py`` (never
edited by hand). Supported architectures: ``"x86_64"`` and ``"aarch64"``. Every function taking ``arch``
uses the running machine's architecture when it is ``None``.
"""
from __future__ import annotations

import os
from _collections_abc import Iterable  # = collections.abc.Iterable, without importing collections (CLI start-up)

from ._cache import memoize
from ._syscall_table import TABLES

# linux/audit.h: what seccomp_data.arch holds for each calling convention.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_I386 = 0x40000003          # int 0x80 / sysenter on an x86_64 kernel
AUDIT_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}

# x32 ABI syscalls enter with this bit set in the number (and arch == AUDIT_ARCH_X86_64).
X32_SYSCALL_BIT = 0x40000000

ARCHES = tuple(TABLES)

# Denied by default (upstream Sandlock's 35 names): kernel-wide state, other processes' memory, namespaces,
# kernel attack surface. Names an architecture lacks (ioperm/iopl on aarch64, ...) are skipped there.
# ``personality`` is here, so a child that wants ADDR_NO_RANDOMIZE must call personality() *before* it
# installs the filter (the C child sequence does).
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "mount", "umount2", "pivot_root", "swapon", "swapoff", "reboot", "sethostname", "setdomainname",
    "kexec_load", "init_module", "finit_module", "delete_module", "unshare", "setns", "perf_event_open",
    "bpf", "userfaultfd", "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv",
    "process_vm_writev", "open_by_handle_at", "name_to_handle_at", "ioperm", "iopl", "quotactl", "acct",
    "lookup_dcookie", "nfsservctl", "io_uring_setup", "io_uring_enter", "io_uring_register", "personality",
)

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


@memoize
def native_arch() -> str:
    """``"x86_64"`` or ``"aarch64"`` (from ``uname -m``); other machines are returned as named."""
    m = os.uname().machine.lower()
    return _MACHINE_ALIASES.get(m, m)


def table(arch: str | None = None) -> dict[str, int]:
    """name -> number for ``arch``. Treat it as read-only (it is the module's own dict)."""
    arch = arch or native_arch()
    try:
        return TABLES[arch]
    except KeyError:
        raise OSError(f"sandlock has no syscall table for the {arch!r} architecture "
                      f"(supported: {', '.join(ARCHES)})") from None


@memoize
def _numbers_to_names(arch: str) -> dict[int, str]:
    return {nr: name for name, nr in table(arch).items()}


def number(name: str, arch: str | None = None) -> int | None:
    """The syscall number of ``name`` on ``arch``, or None when that architecture has no such syscall."""
    return table(arch).get(name)


def name_of(nr: int, arch: str | None = None) -> str | None:
    """The name of syscall ``nr`` on ``arch``, or None when unknown."""
    return _numbers_to_names(arch or native_arch()).get(nr)


def numbers(names: Iterable[str], arch: str | None = None) -> frozenset[int]:
    """Numbers of the names ``arch`` has; names it lacks are skipped silently (for built-in lists)."""
    t = table(arch)
    return frozenset(t[n] for n in names if n in t)


def known_anywhere(name: str) -> bool:
    return any(name in t for t in TABLES.values())


def resolve_names(names: Iterable[str], field: str, arch: str | None = None) -> set[int]:
    """Numbers for syscall names a user wrote in policy field ``field``.

    A name that is not a syscall at all is a ``PolicyError`` naming the field, the name and the closest
    known name. A real syscall that only this architecture lacks (``ioperm`` on aarch64) is skipped: a
    policy written on one machine stays valid on the other.
    """
    from .errors import PolicyError
    arch = arch or native_arch()
    t = table(arch)
    out: set[int] = set()
    for name in names:
        if not isinstance(name, str):
            raise PolicyError(f"{field}: syscall names are strings, got {name!r}")
        nr = t.get(name)
        if nr is not None:
            out.add(nr)
            continue
        if known_anywhere(name):
            continue
        everything = sorted(set().union(*TABLES.values()))
        import difflib  # only on the error path: CLI start-up pays for every import
        near = difflib.get_close_matches(name, everything, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise PolicyError(f"{field}: unknown syscall {name!r}{hint}")
    return out
