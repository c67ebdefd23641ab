"""A small classic-BPF assembler for seccomp programs: instruction constructors, labels, ``assemble()``.

Usage::

    p = Program()
    p.ld_abs(4)                              # A = seccomp_data.arch
    p.jeq(0xC000003E, jf="kill")             # jt/jf: a label name, or None for the next instruction
    ...
    p.label("kill")
    p.ret(0x80000000)
    blob = p.assemble()                      # packed struct sock_filter[] for seccomp(2)

Classic BPF jumps only forward. A conditional jump holds its offsets in a u8 (at most 255 instructions);
``ja`` holds a 32-bit offset. ``assemble`` therefore rewrites any conditional jump whose target is too far:
it places a trampoline right after the jump and points the far branch at it. The trampoline is a copy of
the target when the target is a ``ret`` (one instruction either way, and one hop fewer), otherwise a ``ja``
to it. Programs longer than ``MAX_INSNS`` (the kernel's BPF_MAXINSNS) are refused with ``BPFError``.
"""
from __future__ import annotations

import struct
from ._records import dataclass  # dataclasses costs ~10 ms of CLI start-up

# Instruction classes and fields (linux/bpf_common.h).
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_AND = 0x50
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40

LD_W_ABS = BPF_LD | BPF_W | BPF_ABS      # 0x20
ALU_AND_K = BPF_ALU | BPF_AND | BPF_K    # 0x54
JMP_JA = BPF_JMP | BPF_JA                # 0x05
JMP_JEQ_K = BPF_JMP | BPF_JEQ | BPF_K    # 0x15
JMP_JGT_K = BPF_JMP | BPF_JGT | BPF_K    # 0x25
JMP_JGE_K = BPF_JMP | BPF_JGE | BPF_K    # 0x35
JMP_JSET_K = BPF_JMP | BPF_JSET | BPF_K  # 0x45
RET_K = BPF_RET | BPF_K                  # 0x06

MAX_INSNS = 4096
MAX_COND_OFFSET = 255
INSN = struct.Struct("=HBBI")            # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }


class BPFError(ValueError):
    """The program cannot be assembled (bad label, backward jump, too long, no final ret)."""


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: str | None = None   # label names (conditional jumps; ja uses jt); None = next instruction
    jf: str | None = None

    @property
    def is_cond(self) -> bool:
        return self.code & 0x07 == BPF_JMP and self.code != JMP_JA

    @property
    def is_ret(self) -> bool:
        return self.code & 0x07 == BPF_RET


def _u32(k: int) -> int:
    if not -(1 << 31) <= k < (1 << 32):
        raise BPFError(f"constant {k:#x} does not fit in 32 bits")
    return k & 0xFFFFFFFF


class Program:
    """A list of instructions with symbolic forward jump targets."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}   # label -> index (into _insns) of the instruction it names
        self._fresh = 0

    def __len__(self) -> int:
        return len(self._insns)

    # ---- labels ----
    def label(self, name: str) -> str:
        """Name the next instruction appended."""
        if name in self._labels:
            raise BPFError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)
        return name

    def new_label(self, hint: str = "L") -> str:
        """A label name unique in this program (not yet placed: pass it to ``label`` later)."""
        self._fresh += 1
        return f".{hint}{self._fresh}"

    # ---- instructions ----
    def _add(self, insn: _Insn) -> None:
        self._insns.append(insn)

    def ld_abs(self, offset: int) -> None:
        """A = 32-bit word at ``offset`` of the input (struct seccomp_data)."""
        self._add(_Insn(LD_W_ABS, _u32(offset)))

    def alu_and(self, k: int) -> None:
        """A &= k."""
        self._add(_Insn(ALU_AND_K, _u32(k)))

    def _cond(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        self._add(_Insn(code, _u32(k), jt, jf))

    def jeq(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        """A == k ? jt : jf."""
        self._cond(JMP_JEQ_K, k, jt, jf)

    def jgt(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        """A > k (unsigned) ? jt : jf."""
        self._cond(JMP_JGT_K, k, jt, jf)

    def jge(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        """A >= k (unsigned) ? jt : jf."""
        self._cond(JMP_JGE_K, k, jt, jf)

    def jset(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        """A & k != 0 ? jt : jf."""
        self._cond(JMP_JSET_K, k, jt, jf)

    def ja(self, target: str) -> None:
        """Unconditional jump (32-bit offset)."""
        if target is None:
            raise BPFError("ja needs a target label")
        self._add(_Insn(JMP_JA, 0, target))

    def ret(self, k: int) -> None:
        """Return ``k`` (a SECCOMP_RET_* action, possibly with data)."""
        self._add(_Insn(RET_K, _u32(k)))

    # ---- assembly ----
    def _target(self, name: str) -> int:
        try:
            return self._labels[name]
        except KeyError:
            raise BPFError(f"undefined label {name!r}") from None

    def assemble(self) -> bytes:
        insns = self._insns
        n = len(insns)
        if n == 0 or not insns[-1].is_ret:
            raise BPFError("a seccomp program must end with ret")
        for i, ins in enumerate(insns):
            for t in (ins.jt, ins.jf):
                if t is not None:
                    ti = self._target(t)
                    if ti <= i:
                        raise BPFError(f"jump at {i} to {t!r} goes backward (BPF jumps only forward)")
                    if ti >= n:
                        raise BPFError(f"label {t!r} is past the last instruction")

        # far[i] lists which branches ("jt"/"jf") of conditional jump i go through a trampoline. Inserting
        # trampolines only lengthens distances, so iterate until no new jump needs one (at most 2 per jump).
        far: dict[int, list[str]] = {}
        while True:
            pos, p = [0] * (n + 1), 0
            for i in range(n):
                pos[i] = p
                p += 1 + len(far.get(i, ()))
            pos[n] = p
            changed = False
            for i, ins in enumerate(insns):
                if not ins.is_cond:
                    continue
                done = far.get(i, ())
                for branch in ("jt", "jf"):
                    t = getattr(ins, branch)
                    if t is None or branch in done:
                        continue
                    if pos[self._labels[t]] - pos[i] - 1 > MAX_COND_OFFSET:
                        far.setdefault(i, []).append(branch)
                        changed = True
                        break  # positions moved: recompute before judging the other branch
            if not changed:
                break
        total = pos[n]
        if total > MAX_INSNS:
            raise BPFError(f"the BPF program has {total} instructions; the kernel accepts at most {MAX_INSNS}")

        out = bytearray()
        for i, ins in enumerate(insns):
            here = pos[i]
            if ins.code == JMP_JA:
                out += INSN.pack(ins.code, 0, 0, pos[self._labels[ins.jt]] - here - 1)
            elif ins.is_cond:
                tramps = sorted(far.get(i, ()), key=("jt", "jf").index)  # emitted in this order
                offs = {}
                for branch in ("jt", "jf"):
                    t = getattr(ins, branch)
                    if branch in tramps:
                        offs[branch] = tramps.index(branch)
                    elif t is None:
                        offs[branch] = len(tramps)  # fall through past the trampolines
                    else:
                        offs[branch] = pos[self._labels[t]] - here - 1
                out += INSN.pack(ins.code, offs["jt"], offs["jf"], ins.k)
                for j, branch in enumerate(tramps):
                    ti = self._labels[getattr(ins, branch)]
                    target = insns[ti]
                    if target.is_ret:
                        out += INSN.pack(target.code, 0, 0, target.k)
                    else:
                        out += INSN.pack(JMP_JA, 0, 0, pos[ti] - (here + 1 + j) - 1)
            else:
                out += INSN.pack(ins.code, 0, 0, ins.k)
        assert len(out) == total * INSN.size
        return bytes(out)


def disassemble(blob: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) for each instruction of an assembled program (for tests and debugging)."""
    if len(blob) % INSN.size:
        raise BPFError("not a whole number of instructions")
    return [INSN.unpack_from(blob, o) for o in range(0, len(blob), INSN.size)]


def run(blob: bytes, data: bytes) -> int:
    """Interpret an assembled program over ``data`` (a packed seccomp_data) the way the kernel does, for
    the subset this assembler emits. Used by tests to check layouts without installing a filter."""
    return execute(blob, data)[0]


def execute(blob: bytes, data: bytes) -> tuple[int, int]:
    """``run``, also returning how many instructions were executed (the path length)."""
    prog = disassemble(blob)
    a, pc, steps = 0, 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        steps += 1
        if code == LD_W_ABS:
            a = struct.unpack_from("=I", data, k)[0]
        elif code == ALU_AND_K:
            a &= k
        elif code == JMP_JA:
            pc += k
        elif code == JMP_JEQ_K:
            pc += jt if a == k else jf
        elif code == JMP_JGT_K:
            pc += jt if a > k else jf
        elif code == JMP_JGE_K:
            pc += jt if a >= k else jf
        elif code == JMP_JSET_K:
            pc += jt if a & k else jf
        elif code == RET_K:
            return k, steps
        else:
            raise BPFError(f"unknown opcode {code:#x} at {pc - 1}")
