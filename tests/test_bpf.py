"""The classic-BPF assembler: encoding, labels, far jumps (trampolines), limits; a far-jump program in the kernel."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from sandlock_core import _sys, bpf, syscalls
from sandlock_core.bpf import BPFError, Program

ALLOW, EPERM_RET, KILL = 0x7FFF0000, 0x00050001, 0x80000000


def _data(nr: int, arch: int = syscalls.AUDIT_ARCH_X86_64, *args: int) -> bytes:
    a = list(args) + [0] * (6 - len(args))
    return struct.pack("=iIQ6Q", nr, arch, 0, *a)


def test_encoding_is_struct_sock_filter():
    p = Program()
    p.ld_abs(4)
    p.jeq(0xC000003E, jt="ok", jf="bad")
    p.label("ok")
    p.ret(ALLOW)
    p.label("bad")
    p.ret(KILL)
    blob = p.assemble()
    assert len(blob) == 4 * 8
    assert bpf.disassemble(blob) == [(0x20, 0, 0, 4), (0x15, 0, 1, 0xC000003E), (0x06, 0, 0, ALLOW),
                                     (0x06, 0, 0, KILL)]
    assert blob[:8] == struct.pack("=HBBI", 0x20, 0, 0, 4)


def test_every_constructor():
    p = Program()
    p.ld_abs(0)
    p.alu_and(0xF)
    p.jgt(5, jt="big")
    p.jge(5, jt="five")
    p.jset(1, jt="odd", jf="even")
    for name, val in (("big", 1), ("five", 2), ("odd", 3), ("even", 4)):
        p.label(name)
        p.ret(val)
    blob = p.assemble()
    codes = [c for c, *_ in bpf.disassemble(blob)]
    assert codes[:5] == [0x20, 0x54, 0x25, 0x35, 0x45]
    run = lambda nr: bpf.run(blob, _data(nr))  # noqa: E731
    assert [run(9), run(0x15), run(5), run(3), run(2)] == [1, 2, 2, 3, 4]  # 0x15 & 0xf == 5


def test_ja_and_none_targets_fall_through():
    p = Program()
    p.ld_abs(0)
    p.jeq(1)            # both branches: next instruction
    p.ja("end")
    p.ret(1)
    p.label("end")
    p.ret(2)
    assert bpf.disassemble(p.assemble())[1:3] == [(0x15, 0, 0, 1), (0x05, 0, 0, 1)]
    assert bpf.run(p.assemble(), _data(0)) == 2


@pytest.mark.parametrize("build,match", [
    (lambda p: (p.label("x"), p.ld_abs(0), p.jeq(1, jt="x"), p.ret(0)), "backward"),
    (lambda p: (p.jeq(1, jt="nowhere"), p.ret(0)), "undefined label"),
    (lambda p: (p.ld_abs(0),), "end with ret"),
    (lambda p: (p.jeq(1, jt="end"), p.ret(0), p.label("end")), "past the last"),
    (lambda p: (p.label("a"), p.label("a")), "twice"),
    (lambda p: (p.ret(1 << 33),), "32 bits"),
])
def test_errors(build, match):
    p = Program()
    with pytest.raises(BPFError, match=match):
        build(p)
        p.assemble()


def test_max_instructions():
    p = Program()
    for _ in range(bpf.MAX_INSNS):
        p.ret(ALLOW)
    assert len(p.assemble()) == bpf.MAX_INSNS * 8
    p.ret(ALLOW)
    with pytest.raises(BPFError, match="4096"):
        p.assemble()


def _far_program(n: int, *, shared_ret: bool = True) -> Program:
    """n syscall numbers each jumping to ONE shared return at the end: most jumps are > 255 away."""
    p = Program()
    p.ld_abs(4)
    p.jeq(syscalls.AUDIT_ARCH_X86_64 if syscalls.native_arch() == "x86_64" else syscalls.AUDIT_ARCH_AARCH64,
          jf="kill")
    p.ld_abs(0)
    for i in range(n):
        p.jeq(1000 + i, jt="deny" if shared_ret else "far_ja")
    p.ret(ALLOW)
    if not shared_ret:
        p.label("far_ja")
        p.ja("deny")
        for _ in range(300):
            p.ret(KILL)  # padding the ja must jump over
    p.label("deny")
    p.ret(EPERM_RET)
    p.label("kill")
    p.ret(KILL)
    return p


@pytest.mark.parametrize("shared_ret", [True, False])
def test_far_conditional_jumps_get_trampolines(shared_ret):
    n = 400
    blob = _far_program(n, shared_ret=shared_ret).assemble()
    insns = bpf.disassemble(blob)
    assert all(jt <= 255 and jf <= 255 for _, jt, jf, _ in insns)
    arch = syscalls.AUDIT_ARCH[syscalls.native_arch()]
    for i in (0, 1, 100, 254, 255, 256, 300, n - 1):
        assert bpf.run(blob, _data(1000 + i, arch)) == EPERM_RET, i
    assert bpf.run(blob, _data(999, arch)) == ALLOW
    assert bpf.run(blob, _data(1000 + n, arch)) == ALLOW
    assert bpf.run(blob, _data(1000, syscalls.AUDIT_ARCH_I386)) == KILL  # the arch jump is far too
    if shared_ret:  # a far ret target is copied in place: no extra hop
        assert (0x06, 0, 0, EPERM_RET) in insns[:300]


def test_near_jumps_are_not_rewritten():
    p = Program()
    p.ld_abs(0)
    for i in range(200):
        p.jeq(i, jt="hit")
    p.ret(ALLOW)
    p.label("hit")
    p.ret(EPERM_RET)
    assert len(p.assemble()) == 203 * 8


def _child_status(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_far_jump_program_runs_in_the_kernel():
    """A filter whose deny list is 400 entries long (jumps > 255) denies the last entries, in the kernel."""
    getpid, getppid = syscalls.number("getpid"), syscalls.number("getppid")
    arch = syscalls.AUDIT_ARCH[syscalls.native_arch()]
    p = Program()
    p.ld_abs(4)
    p.jeq(arch, jf="kill")
    p.ld_abs(0)
    for i in range(400):
        p.jeq(5000 + i, jt="deny")
    p.jeq(getppid, jt="deny")  # > 255 after the first jumps of the list
    p.ret(ALLOW)
    for _ in range(300):
        p.ret(KILL)  # dead code, only to push "deny" further away from the list
    p.label("deny")
    p.ret(EPERM_RET)
    p.label("kill")
    p.ret(KILL)
    blob = p.assemble()
    assert len(blob) // 8 > 700

    def child():
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        _sys.seccomp_set_filter(blob, 0)
        try:
            _sys.raw_syscall(getppid)
            return 1
        except OSError as e:
            if e.errno != errno.EPERM:
                return 2
        try:
            _sys.raw_syscall(5000)  # not a syscall: the filter answers before the kernel says ENOSYS
            return 3
        except OSError as e:
            if e.errno != errno.EPERM:
                return 4
        return 0 if _sys.raw_syscall(getpid) == os.getpid() else 5

    status = _child_status(child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# ---- the precomputed programs (_filters.py, tools/gen_filters.py) ------------------------------------------

def test_every_precomputed_program_is_what_the_assembler_makes():
    """A stored program is used instead of assembling: it must be byte for byte the assembler's, for the spec
    its key spells out (a stale table would enforce an older filter)."""
    from sandlock_core import seccomp
    from sandlock_core._filters import FILTERS
    assert FILTERS
    for key, program in FILTERS.items():
        fields = {name: frozenset(v) if name in ("notify", "deny", "allow_only") and v is not None else v
                  for name, v in key}
        spec = seccomp.FilterSpec(**fields)
        assert seccomp.spec_key(spec) == key
        assert seccomp.assemble(spec) == program, f"stale: run tools/gen_filters.py ({fields['arch']})"


def test_the_precomputed_table_is_up_to_date():
    """The policies it is made for still give the specs it holds (else they would be assembled at each run)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "gen_filters.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fields", [{}, {"fs_readable": ["/usr", "/lib"]},
                                    {"fs_readable": ["/usr"], "fs_writable": ["/tmp"]}])
def test_common_policies_take_a_precomputed_program(fields, monkeypatch):
    from sandlock_core import Policy, seccomp
    from sandlock_core.plan import Plan
    from sandlock_core.policy_spec import LeanPolicy

    def refuse(spec):
        raise AssertionError("assembled, not taken from _filters.py")
    for policy in (Policy(**fields), LeanPolicy(**fields)):
        seccomp.build_filter.cache_clear()
        monkeypatch.setattr(seccomp, "assemble", refuse)
        plan = Plan(policy)
        monkeypatch.undo()
        assert plan.filter == seccomp.assemble(plan.spec)
        plan.close()


def test_other_specs_are_assembled():
    from sandlock_core import seccomp
    spec = seccomp.deny_only_spec(deny=["ptrace"])
    from sandlock_core._filters import FILTERS
    assert seccomp.spec_key(spec) not in FILTERS
    assert seccomp.build_filter(spec) == seccomp.assemble(spec)
