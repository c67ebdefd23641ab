"""A small classic-BPF assembler for seccomp programs, with labels.

Conditional jumps in classic BPF reach at most 255 instructions; programs here keep every conditional
target close (each test jumps to a return placed right after its block) and use ``ja`` (32-bit offset)
for anything far.
"""
from __future__ import annotations

import struct

LD_W_ABS = 0x20
JMP_JA = 0x05
JMP_JEQ_K = 0x15
JMP_JGT_K = 0x25
JMP_JGE_K = 0x35
JMP_JSET_K = 0x45
RET_K = 0x06
ALU_AND_K = 0x54
LD_W_MEM = 0x60
ST = 0x02
MAX_INSNS = 4096
_INSN = struct.Struct("=HBBI")


class Program:
    """Append instructions; jump targets are label names resolved by ``assemble``."""

    def __init__(self):
        self._insns: list[list] = []
        self._labels: dict[str, int] = {}

    def __len__(self):
        return len(self._insns)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self._insns.append([LD_W_ABS, None, None, offset])

    def and_(self, mask: int) -> None:
        self._insns.append([ALU_AND_K, None, None, mask & 0xFFFFFFFF])

    def jump_if(self, op: int, k: int, jt: str | None, jf: str | None) -> None:
        """Conditional jump: to label jt if true, jf if false (None = next instruction)."""
        self._insns.append([op, jt, jf, k & 0xFFFFFFFF])

    def ja(self, target: str) -> None:
        self._insns.append([JMP_JA, target, None, None])

    def ret(self, value: int) -> None:
        self._insns.append([RET_K, None, None, value & 0xFFFFFFFF])

    def _offset(self, at: int, target) -> int:
        if target is None:
            return 0
        if target not in self._labels:
            raise ValueError(f"undefined label {target!r}")
        off = self._labels[target] - at - 1
        if off < 0:
            raise ValueError(f"backward jump to {target!r} (BPF only jumps forward)")
        return off

    def assemble(self) -> bytes:
        if len(self._insns) > MAX_INSNS:
            raise ValueError(f"BPF program of {len(self._insns)} instructions exceeds {MAX_INSNS}")
        out = bytearray()
        for i, (code, a, b, k) in enumerate(self._insns):
            if code == JMP_JA:
                out += _INSN.pack(code, 0, 0, self._offset(i, a))
            elif code & 0x07 == 0x05:  # conditional jump
                jt, jf = self._offset(i, a), self._offset(i, b)
                if jt > 255 or jf > 255:
                    raise ValueError(f"conditional jump at {i} is {max(jt, jf)} instructions long (max 255)")
                out += _INSN.pack(code, jt, jf, k)
            else:
                out += _INSN.pack(code, 0, 0, k)
        return bytes(out)
