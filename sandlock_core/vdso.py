"""Patch a sandboxed process's vDSO so its clock reads follow the sandbox clock without the supervisor.

The vDSO is the kernel's code page mapped into every process; libc calls ``clock_gettime``, ``gettimeofday``,
``time`` (and, from glibc 2.41, ``getrandom``) there without entering the kernel. Those reads never reach
seccomp, so the supervisor rewrites the code of the process's own copy through ``/proc/PID/mem`` (a
FOLL_FORCE write: the page becomes a private copy, the parent's and other processes' vDSOs are untouched;
a forked child inherits the patched copy; an ``execve`` maps a fresh one, so it is patched again).

x86_64 layout of the patch (everything lives in the slack after the image's last used byte, in the vDSO
mapping itself, so calls stay as fast as the kernel's own code: no syscall, no supervisor)::

    __vdso_clock_gettime:  jmp cgt_hook        (5 bytes over the original prologue)
    __vdso_gettimeofday:   jmp gtod_hook
    __vdso_time:           jmp time_hook
    __vdso_getrandom:      mov rax, -ENOSYS; ret     (random_seed only: libc falls back to getrandom(2))

    cgt_hook:   call orig_cgt (the displaced prologue, then a jump back into the original code);
                on success for CLOCK_REALTIME / CLOCK_REALTIME_COARSE: ts += offset  (shift mode)
                                                                         ts  = start   (freeze mode)
    gtod_hook:  cgt_hook(CLOCK_REALTIME) -> timeval; *tz = {0, 0}
    time_hook:  cgt_hook(CLOCK_REALTIME_COARSE) -> seconds
    orig_cgt:   <the original first instructions, RIP-relative displacements fixed>; jmp back

Only a handful of prologue instructions are understood (push, mov rbp/rsp, sub/and rsp, endbr64,
lea reg,[rip+x]); an unknown prologue raises ``VdsoError`` and the process keeps the kernel's clock (the
caller records it). Monotonic and CPU clocks are not touched.
"""
from __future__ import annotations

import os
import struct

ENOSYS = 38
CLOCK_REALTIME = 0
CLOCK_REALTIME_COARSE = 5


class VdsoError(Exception):
    pass


def vdso_range(pid: int) -> tuple[int, int] | None:
    """(start, end) of ``pid``'s ``[vdso]`` mapping, or None."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            if line.endswith(b"[vdso]\n"):
                lo, hi = line.split(None, 1)[0].split(b"-")
                return int(lo, 16), int(hi, 16)
    return None


def parse_symbols(image: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """({name: (offset, size)} of the dynamic symbols, first free offset after everything the file uses)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise VdsoError("the vDSO is not a 64-bit ELF image")
    (e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum,
     _shstrndx) = struct.unpack_from("<QQIHHHHHH", image, 0x20)
    used = e_shoff + e_shnum * e_shentsize
    sections = []
    for i in range(e_shnum):
        (_name, sh_type, _f, _addr, off, size, link, _info, _align,
         entsize) = struct.unpack_from("<IIQQQQIIQQ", image, e_shoff + i * e_shentsize)
        sections.append((sh_type, off, size, link, entsize))
        if sh_type != 8:  # NOBITS takes no room in the image
            used = max(used, off + size)
    for i in range(e_phnum):
        _t, _f, off, _va, _pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", image, e_phoff + i * e_phentsize)
        used = max(used, off + max(filesz, memsz))
    syms: dict[str, tuple[int, int]] = {}
    for sh_type, off, size, link, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        str_off = sections[link][1]
        for j in range(size // (entsize or 24)):
            st_name, _info, _other, shndx, value, sz = struct.unpack_from("<IBBHQQ", image, off + j * 24)
            if not st_name or not shndx:
                continue
            end = image.index(b"\0", str_off + st_name)
            syms[image[str_off + st_name:end].decode()] = (value, sz)
    return syms, used


class _Asm:
    """A tiny x86_64 assembler: raw bytes plus rel8/rel32 references to labels, placed at ``base``."""

    def __init__(self, base: int):
        self.base = base
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fix: list[tuple[int, str, int]] = []  # (position, label, width)

    def b(self, *chunks: bytes) -> "_Asm":
        for c in chunks:
            self.buf += c
        return self

    def label(self, name: str) -> None:
        self.labels[name] = self.base + len(self.buf)

    def rel(self, opcode: bytes, target: str | int, width: int = 4) -> None:
        self.buf += opcode
        self.fix.append((len(self.buf), target, width))
        self.buf += b"\0" * width

    def link(self) -> bytes:
        for pos, target, width in self.fix:
            dest = self.labels[target] if isinstance(target, str) else target
            disp = dest - (self.base + pos + width)
            if width == 1:
                if not -128 <= disp < 128:
                    raise VdsoError("internal: short jump out of range")
                self.buf[pos] = disp & 0xFF
            else:
                struct.pack_into("<i", self.buf, pos, disp)
        return bytes(self.buf)


def _i32(v: int) -> bytes:
    return struct.pack("<i", v)


def _u64(v: int) -> bytes:
    return struct.pack("<q", v)


def _displace(image: bytes, entry: int, new_at: int) -> tuple[bytes, int]:
    """Copy whole instructions from ``entry`` (at least 5 bytes) so they run at ``new_at``; (code, length)."""
    out = bytearray()
    i = entry
    while i - entry < 5:
        c = image[i:i + 8]
        if c[0] in (0x50, 0x51, 0x52, 0x53, 0x55, 0x56, 0x57):           # push r64
            n = 1
        elif c[0] == 0x41 and 0x50 <= c[1] <= 0x57:                     # push r8..r15
            n = 2
        elif c[:3] in (b"\x48\x89\xe5",):                              # mov rbp, rsp
            n = 3
        elif c[:4] == b"\xf3\x0f\x1e\xfa":                              # endbr64
            n = 4
        elif c[:3] in (b"\x48\x83\xec", b"\x48\x83\xe4"):              # sub/and rsp, imm8
            n = 4
        elif c[0] in (0x48, 0x4C) and c[1] == 0x8D and (c[2] & 0xC7) == 0x05:  # lea r64, [rip+disp32]
            disp = struct.unpack_from("<i", c, 3)[0]
            target = i + 7 + disp
            here = new_at + len(out) + 7
            out += c[:3] + _i32(target - here)
            i += 7
            continue
        else:
            raise VdsoError(f"unknown instruction {c[:4].hex()} in the vDSO clock_gettime prologue")
        out += c[:n]
        i += n
    return bytes(out), i - entry


def build_patch(image: bytes, *, offset_ns: int | None = None, freeze_ns: int | None = None,
                disable_getrandom: bool = False) -> list[tuple[int, bytes]]:
    """The (offset, bytes) writes that virtualize this vDSO image (x86_64)."""
    syms, used = parse_symbols(image)
    writes: list[tuple[int, bytes]] = []
    cgt = syms.get("__vdso_clock_gettime") or syms.get("clock_gettime")
    if cgt is not None and image[cgt[0]] == 0xE9:
        return []  # already patched (a forked child inherits its parent's patched copy)
    if disable_getrandom:
        for name in ("__vdso_getrandom", "getrandom"):
            if name in syms:
                writes.append((syms[name][0], b"\x48\xc7\xc0" + _i32(-ENOSYS) + b"\xc3"))
                break
    if offset_ns is None and freeze_ns is None:
        return writes
    gtod = syms.get("__vdso_gettimeofday") or syms.get("gettimeofday")
    tm = syms.get("__vdso_time") or syms.get("time")
    if cgt is None:
        raise VdsoError("the vDSO has no clock_gettime")
    base = (used + 63) & ~63
    a = _Asm(base)
    # cgt_hook: the original clock_gettime, then the sandbox clock for the realtime clocks
    a.label("cgt_hook")
    a.b(b"\x57", b"\x56", b"\x48\x83\xec\x08")          # push rdi; push rsi; sub rsp, 8
    a.rel(b"\xe8", "orig_cgt")                          # call orig_cgt
    a.b(b"\x48\x83\xc4\x08", b"\x5e", b"\x5f")          # add rsp, 8; pop rsi; pop rdi
    a.b(b"\x85\xc0")                                    # test eax, eax
    a.rel(b"\x75", "ret", 1)                            # jnz ret
    a.b(b"\x83\xff" + bytes([CLOCK_REALTIME]))          # cmp edi, 0
    a.rel(b"\x74", "shift", 1)                          # je shift
    a.b(b"\x83\xff" + bytes([CLOCK_REALTIME_COARSE]))   # cmp edi, 5
    a.rel(b"\x74", "shift", 1)                          # je shift
    a.label("ret")
    a.b(b"\xc3")
    a.label("shift")
    if freeze_ns is not None:
        sec, nsec = divmod(freeze_ns, 10**9)
        a.b(b"\x48\xb9" + _u64(sec), b"\x48\x89\x0e")                   # mov rcx, sec; mov [rsi], rcx
        a.b(b"\x48\xc7\x46\x08" + _i32(nsec))                           # mov qword [rsi+8], nsec
    else:
        sec, nsec = divmod(offset_ns, 10**9)
        a.b(b"\x48\xb9" + _u64(sec), b"\x48\x01\x0e")                   # mov rcx, sec; add [rsi], rcx
        a.b(b"\x48\x8b\x4e\x08", b"\x48\x81\xc1" + _i32(nsec))          # mov rcx, [rsi+8]; add rcx, nsec
        a.b(b"\x48\x81\xf9" + _i32(10**9))                              # cmp rcx, 1e9
        a.rel(b"\x7c", "nocarry", 1)                                    # jl nocarry
        a.b(b"\x48\x81\xe9" + _i32(10**9), b"\x48\xff\x06")            # sub rcx, 1e9; inc qword [rsi]
        a.label("nocarry")
        a.b(b"\x48\x89\x4e\x08")                                        # mov [rsi+8], rcx
    a.b(b"\x31\xc0", b"\xc3")                                           # xor eax, eax; ret
    # gtod_hook(tv, tz)
    a.label("gtod_hook")
    a.b(b"\x57", b"\x56", b"\x48\x83\xec\x18")          # push rdi; push rsi; sub rsp, 24
    a.b(b"\xbf" + _i32(CLOCK_REALTIME), b"\x48\x89\xe6")  # mov edi, 0; mov rsi, rsp
    a.rel(b"\xe8", "cgt_hook")
    a.b(b"\x48\x8b\x04\x24", b"\x48\x8b\x4c\x24\x08")   # mov rax, [rsp]; mov rcx, [rsp+8]
    a.b(b"\x48\x83\xc4\x18", b"\x5e", b"\x5f")          # add rsp, 24; pop rsi; pop rdi
    a.b(b"\x48\x85\xff")                                # test rdi, rdi
    a.rel(b"\x74", "tz", 1)
    a.b(b"\x48\x89\x07", b"\x48\x89\xc8", b"\x31\xd2")  # mov [rdi], rax; mov rax, rcx; xor edx, edx
    a.b(b"\xb9" + _i32(1000), b"\x48\xf7\xf1")          # mov ecx, 1000; div rcx
    a.b(b"\x48\x89\x47\x08")                            # mov [rdi+8], rax
    a.label("tz")
    a.b(b"\x48\x85\xf6")                                # test rsi, rsi
    a.rel(b"\x74", "tzdone", 1)
    a.b(b"\x48\xc7\x06\x00\x00\x00\x00")                # mov qword [rsi], 0
    a.label("tzdone")
    a.b(b"\x31\xc0", b"\xc3")
    # time_hook(tloc)
    a.label("time_hook")
    a.b(b"\x57", b"\x48\x83\xec\x10")                   # push rdi; sub rsp, 16
    a.b(b"\xbf" + _i32(CLOCK_REALTIME_COARSE), b"\x48\x89\xe6")
    a.rel(b"\xe8", "cgt_hook")
    a.b(b"\x48\x8b\x04\x24", b"\x48\x83\xc4\x10", b"\x5f")  # mov rax, [rsp]; add rsp, 16; pop rdi
    a.b(b"\x48\x85\xff")
    a.rel(b"\x74", "tret", 1)
    a.b(b"\x48\x89\x07")                                # mov [rdi], rax
    a.label("tret")
    a.b(b"\xc3")
    # orig_cgt: displaced prologue, then back into the original clock_gettime
    a.label("orig_cgt")
    code, n = _displace(image, cgt[0], a.labels["orig_cgt"])
    a.b(code)
    a.rel(b"\xe9", cgt[0] + n)
    block = a.link()
    if base + len(block) > len(image):
        raise VdsoError(f"no room for the clock hooks in the vDSO ({len(image) - base} bytes free, "
                        f"{len(block)} needed)")
    writes.append((base, block))
    for sym, hook in ((cgt, "cgt_hook"), (gtod, "gtod_hook"), (tm, "time_hook")):
        if sym is None:
            continue
        jmp = _Asm(sym[0])
        jmp.rel(b"\xe9", a.labels[hook])
        writes.append((sym[0], jmp.link()))
    return writes


def patch_pid(pid: int, *, offset_ns: int | None = None, freeze_ns: int | None = None,
              disable_getrandom: bool = False) -> bool:
    """Patch ``pid``'s vDSO; False if it was already patched (or has none). Raises VdsoError/OSError."""
    rng = vdso_range(pid)
    if rng is None:
        return False
    lo, hi = rng
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        image = os.pread(fd, hi - lo, lo)
        if image[:4] != b"\x7fELF":
            raise VdsoError("cannot read the vDSO")
        writes = build_patch(image, offset_ns=offset_ns, freeze_ns=freeze_ns,
                             disable_getrandom=disable_getrandom)
        if not writes:
            return False
        # already patched? (the entry points carry our jumps; the hook block is in place)
        if all(image[off:off + len(data)] == data for off, data in writes):
            return False
        # the block first, the jumps into it last
        for off, data in sorted(writes, key=lambda w: -w[0]):
            if os.pwrite(fd, data, lo + off) != len(data):
                raise VdsoError("short write to the vDSO")
        return True
    finally:
        os.close(fd)


def is_patched(pid: int, entry_name: str = "__vdso_clock_gettime") -> bool:
    rng = vdso_range(pid)
    if rng is None:
        return False
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(rng[0])
        image = f.read(rng[1] - rng[0])
    syms, _ = parse_symbols(image)
    off = syms.get(entry_name, (None,))[0]
    return off is not None and image[off] == 0xE9
