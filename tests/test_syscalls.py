"""Syscall tables: numbers agree with the kernel headers; the blocklist resolves; name errors help."""
from __future__ import annotations

import ctypes.util
import os
import re
import subprocess
import sys

import pytest

from sandlock_core import syscalls
from sandlock_core.errors import PolicyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86_HEADER = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"
GENERIC_HEADER = "/usr/include/asm-generic/unistd.h"


def _header_numbers(path: str) -> dict[str, int]:
    with open(path) as f:
        return {m[0]: int(m[1]) for m in re.findall(r"#define __NR_([a-z0-9_]+)\s+(\d+)\s*$", f.read(), re.M)}


@pytest.mark.skipif(not os.path.exists(X86_HEADER), reason="x86_64 uapi header not installed")
def test_x86_64_table_matches_the_uapi_header_for_every_name():
    header = _header_numbers(X86_HEADER)
    assert len(header) > 300
    table = syscalls.table("x86_64")
    assert {n: table.get(n) for n in header} == header


@pytest.mark.skipif(not os.path.exists(GENERIC_HEADER), reason="asm-generic header not installed")
def test_aarch64_numbers_match_asm_generic():
    header = _header_numbers(GENERIC_HEADER)  # only the names defined with a literal number
    t = syscalls.table("aarch64")
    for name in ("openat", "clone", "clone3", "getrandom", "execve", "io_uring_setup", "landlock_create_ruleset",
                 "seccomp", "pidfd_getfd", "process_vm_readv"):
        assert t[name] == header[name], name
    assert (t["openat"], t["clone3"], t["getrandom"], t["read"], t["exit_group"]) == (56, 435, 278, 63, 94)
    # Every literal asm-generic number that aarch64 has agrees.
    assert {n: t[n] for n in header if n in t} == {n: header[n] for n in header if n in t}
    # aarch64 has no legacy calls.
    for legacy in ("open", "fork", "stat", "ioperm", "iopl", "mkdir"):
        assert syscalls.number(legacy, "aarch64") is None


def test_x86_64_spot_numbers_and_newer_syscalls():
    t = syscalls.table("x86_64")
    assert (t["read"], t["getpid"], t["clone"], t["clone3"], t["openat2"], t["close_range"]) == (0, 39, 56, 435, 437, 436)
    assert t["landlock_restrict_self"] == 446 and t["futex_waitv"] == 449
    assert t.get("fchmodat2") == 452  # newer than the 6.1 headers, known to libseccomp 2.5.4


def test_tables_have_no_duplicate_numbers_and_name_of_inverts():
    for arch in ("x86_64", "aarch64"):
        t = syscalls.table(arch)
        assert len(set(t.values())) == len(t)
        for name, nr in t.items():
            assert syscalls.name_of(nr, arch) == name
            assert 0 <= nr < syscalls.X32_SYSCALL_BIT


def test_native_arch_and_defaults():
    assert syscalls.native_arch() in ("x86_64", "aarch64")
    assert syscalls.number("getpid") == syscalls.table()["getpid"]
    assert syscalls.name_of(syscalls.number("getpid")) == "getpid"
    assert syscalls.number("no_such_call") is None and syscalls.name_of(99999) is None
    with pytest.raises(OSError, match="riscv64"):
        syscalls.table("riscv64")


def test_audit_arch_constants():
    assert syscalls.AUDIT_ARCH_X86_64 == 0xC000003E
    assert syscalls.AUDIT_ARCH_AARCH64 == 0xC00000B7
    assert syscalls.AUDIT_ARCH_I386 == 0x40000003
    assert syscalls.X32_SYSCALL_BIT == 0x40000000


def test_default_blocklist_is_upstreams_35_and_resolves_on_both_arches():
    bl = syscalls.DEFAULT_BLOCKLIST
    assert len(bl) == 35 and len(set(bl)) == 35 and "personality" in bl
    x86 = syscalls.resolve_names(bl, "deny_syscalls", "x86_64")
    arm = syscalls.resolve_names(bl, "deny_syscalls", "aarch64")
    assert len(x86) == 35  # every one exists on x86_64 (nfsservctl/lookup_dcookie as ENOSYS stubs)
    missing_arm = {n for n in bl if syscalls.number(n, "aarch64") is None}
    assert missing_arm == {"ioperm", "iopl"}
    assert len(arm) == 35 - len(missing_arm)
    assert syscalls.numbers(bl, "aarch64") == frozenset(arm)


def test_resolve_names_reports_field_name_and_suggestion():
    with pytest.raises(PolicyError) as exc:
        syscalls.resolve_names(["read", "opnat"], "deny_syscalls")
    msg = str(exc.value)
    assert "deny_syscalls" in msg and "'opnat'" in msg and "openat" in msg
    assert isinstance(exc.value, ValueError)
    with pytest.raises(PolicyError, match="allow_syscalls.*'zzzzzzzz'"):
        syscalls.resolve_names(["zzzzzzzz"], "allow_syscalls", "x86_64")
    with pytest.raises(PolicyError, match="allow_syscalls"):
        syscalls.resolve_names([39], "allow_syscalls")


def test_resolve_names_skips_a_real_syscall_this_arch_lacks():
    assert syscalls.resolve_names(["iopl", "read"], "deny_syscalls", "aarch64") == {63}
    assert syscalls.resolve_names(["iopl"], "deny_syscalls", "x86_64") == {172}


@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None, reason="libseccomp is not installed")
@pytest.mark.skipif(not (os.path.exists(X86_HEADER) and os.path.exists(GENERIC_HEADER)),
                    reason="kernel uapi headers not installed")
def test_generated_table_is_up_to_date():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_syscalls", os.path.join(ROOT, "tools", "gen_syscalls.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    _, version = gen.load_libseccomp()
    from sandlock_core import _syscall_table
    if f"libseccomp {version} " not in _syscall_table.__doc__ and f"libseccomp {version}:" not in _syscall_table.__doc__:
        pytest.skip(f"the table was generated with another libseccomp than the installed {version}")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_syscalls.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
