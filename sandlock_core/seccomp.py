"""The seccomp-bpf program: a policy's deny/notify/allow decisions compiled to classic BPF.

Layout: arch check (mismatch kills: this is what stops i386 ``int 0x80`` on x86_64), x32 bit check (kills),
argument filters (clone namespace flags, clone3, tty injection ioctls, raw/UDP sockets, PR_SET_DUMPABLE), then
the notify set (USER_NOTIF), the deny set (EPERM) or, in allowlist mode, the allowed set, then the default.
"""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass

from . import bpf, syscalls

RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000

OFF_NR, OFF_ARCH = 0, 4


def OFF_ARG(i: int) -> int:
    return 16 + 8 * i  # low 32 bits (little endian)


CLONE_NS_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                  | 0x00000080)  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET NEWTIME
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
AF_INET, AF_INET6 = 2, 10
SOCK_DGRAM, SOCK_RAW, SOCK_TYPE_MASK = 2, 3, 0xF
PR_SET_DUMPABLE = 4

# What sandlock's own child needs between installing the filter and execve (allowlist mode adds these).
ALLOWLIST_BASELINE = ("read", "write", "close", "close_range", "sendmsg", "getpid", "execve", "execveat",
                      "exit", "exit_group", "prlimit64", "setrlimit", "rt_sigreturn")


@dataclass(frozen=True)
class FilterSpec:
    arch: str
    notify: frozenset = frozenset()
    deny: frozenset = frozenset()
    allow_only: frozenset | None = None
    deny_clone_namespaces: bool = True
    clone3_enosys: bool = True
    deny_tty_inject: bool = True
    no_raw_sockets: bool = True
    no_udp: bool = False
    deny_set_dumpable: bool = True
    errno_actions: tuple = ()


def allowlist_numbers(names, arch: str | None = None) -> frozenset:
    nums = syscalls.resolve_names(names, "allow_syscalls", arch)
    nums |= {n for n in (syscalls.number(s, arch) for s in ALLOWLIST_BASELINE) if n is not None}
    return frozenset(nums)


def deny_only_spec(arch: str | None = None, deny=None, **kw) -> FilterSpec:
    arch = arch or syscalls.native_arch()
    if deny is None:
        deny = frozenset(n for n in (syscalls.number(s, arch) for s in syscalls.DEFAULT_BLOCKLIST) if n is not None)
    return FilterSpec(arch=arch, deny=frozenset(deny), **kw)


def _group(p: bpf.Program, nrs, action: int, tag: str, chunk: int = 200) -> None:
    """jeq nr -> return action, for every nr; chunked so each jump stays under 256."""
    nrs = sorted(nrs)
    for c in range(0, len(nrs), chunk):
        part = nrs[c:c + chunk]
        hit, skip = f"{tag}_hit{c}", f"{tag}_skip{c}"
        for nr in part:
            p.jump_if(bpf.JMP_JEQ_K, nr, hit, None)
        p.ja(skip)
        p.label(hit)
        p.ret(action)
        p.label(skip)


@functools.lru_cache(maxsize=64)
def build_filter(spec: FilterSpec) -> bytes:
    if spec.notify & spec.deny:
        names = sorted(syscalls.name_of(n, spec.arch) or str(n) for n in spec.notify & spec.deny)
        raise ValueError(f"syscalls both notified and denied: {names}")
    nr = functools.partial(syscalls.number, arch=spec.arch)
    p = bpf.Program()
    p.load(OFF_ARCH)
    p.jump_if(bpf.JMP_JEQ_K, syscalls.AUDIT_ARCH[spec.arch], None, "kill")
    p.load(OFF_NR)
    if spec.arch == "x86_64":
        p.jump_if(bpf.JMP_JGE_K, syscalls.X32_SYSCALL_BIT, "kill", None)
    eperm = RET_ERRNO | errno.EPERM

    def arg_block(name: str, body) -> None:
        n = nr(name)
        if n is None:
            return
        end = f"end_{name}"
        p.jump_if(bpf.JMP_JEQ_K, n, None, end)
        body()
        p.load(OFF_NR)
        p.label(end)

    if spec.deny_clone_namespaces:
        def clone_body():
            p.load(OFF_ARG(0))
            p.jump_if(bpf.JMP_JSET_K, CLONE_NS_FLAGS, None, "clone_ok")
            p.ret(eperm)
            p.label("clone_ok")
        arg_block("clone", clone_body)
    if spec.clone3_enosys and nr("clone3") is not None:
        # clone3 keeps its flags in memory BPF cannot read; ENOSYS makes libc fall back to clone(2).
        p.jump_if(bpf.JMP_JEQ_K, nr("clone3"), None, "clone3_end")
        p.ret(RET_ERRNO | errno.ENOSYS)
        p.label("clone3_end")
    if spec.deny_tty_inject:
        def ioctl_body():
            p.load(OFF_ARG(1))
            p.jump_if(bpf.JMP_JEQ_K, TIOCSTI, "ioctl_deny", None)
            p.jump_if(bpf.JMP_JEQ_K, TIOCLINUX, "ioctl_deny", "ioctl_ok")
            p.label("ioctl_deny")
            p.ret(eperm)
            p.label("ioctl_ok")
        arg_block("ioctl", ioctl_body)
    if spec.no_raw_sockets or spec.no_udp:
        def socket_body():
            p.load(OFF_ARG(0))
            p.jump_if(bpf.JMP_JEQ_K, AF_INET, "sock_ip", None)
            p.jump_if(bpf.JMP_JEQ_K, AF_INET6, "sock_ip", "sock_ok")
            p.label("sock_ip")
            p.load(OFF_ARG(1))
            p.and_(SOCK_TYPE_MASK)
            if spec.no_raw_sockets:
                p.jump_if(bpf.JMP_JEQ_K, SOCK_RAW, "sock_deny", None)
            if spec.no_udp:
                p.jump_if(bpf.JMP_JEQ_K, SOCK_DGRAM, "sock_deny", None)
            p.ja("sock_ok")
            p.label("sock_deny")
            p.ret(eperm)
            p.label("sock_ok")
        arg_block("socket", socket_body)
    if spec.deny_set_dumpable:
        def prctl_body():
            p.load(OFF_ARG(0))
            p.jump_if(bpf.JMP_JEQ_K, PR_SET_DUMPABLE, None, "prctl_ok")
            p.ret(eperm)
            p.label("prctl_ok")
        arg_block("prctl", prctl_body)
    for i, (n, err) in enumerate(spec.errno_actions):
        p.jump_if(bpf.JMP_JEQ_K, n, None, f"errno_end{i}")
        p.ret(RET_ERRNO | err)
        p.label(f"errno_end{i}")
    _group(p, spec.notify, RET_USER_NOTIF, "notify")
    if spec.allow_only is not None:
        _group(p, spec.allow_only - spec.notify, RET_ALLOW, "allow")
        p.ret(eperm)
    else:
        _group(p, spec.deny, eperm, "deny")
        p.ret(RET_ALLOW)
    p.label("kill")
    p.ret(RET_KILL_PROCESS)
    return p.assemble()
