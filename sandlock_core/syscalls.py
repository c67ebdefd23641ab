"""Syscall names and numbers per architecture (table generated from libseccomp by tools/gen_syscalls.py)."""
from __future__ import annotations

import functools
import platform

from ._syscall_table import TABLES

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}
X32_SYSCALL_BIT = 0x40000000

# The default blocklist (the seed's 35 names); names an architecture lacks are skipped there.
DEFAULT_BLOCKLIST = (
    "mount", "umount2", "pivot_root", "swapon", "swapoff", "reboot", "sethostname", "setdomainname",
    "kexec_load", "init_module", "finit_module", "delete_module", "unshare", "setns", "perf_event_open", "bpf",
    "userfaultfd", "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv", "process_vm_writev",
    "open_by_handle_at", "name_to_handle_at", "ioperm", "iopl", "quotactl", "acct", "lookup_dcookie",
    "nfsservctl", "io_uring_setup", "io_uring_enter", "io_uring_register", "personality",
)


@functools.lru_cache(maxsize=None)
def native_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def table(arch: str | None = None) -> dict[str, int]:
    arch = arch or native_arch()
    try:
        return TABLES[arch]
    except KeyError:
        raise OSError(f"sandlock does not support the {arch} architecture (x86_64, aarch64)") from None


@functools.lru_cache(maxsize=None)
def _reverse(arch: str) -> dict[int, str]:
    return {nr: name for name, nr in table(arch).items()}


def number(name: str, arch: str | None = None) -> int | None:
    return table(arch).get(name)


def name_of(nr: int, arch: str | None = None) -> str | None:
    return _reverse(arch or native_arch()).get(nr)


def resolve_names(names, field: str, arch: str | None = None) -> set[int]:
    """Numbers for syscall names given by a user; an unknown name is a PolicyError naming it."""
    from .errors import PolicyError
    t = table(arch)
    out = set()
    for name in names:
        nr = t.get(name)
        if nr is None:
            import difflib
            near = difflib.get_close_matches(name, list(t), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PolicyError(f"{field}: {name!r} is not a syscall on {arch or native_arch()}{hint}")
        out.add(nr)
    return out
