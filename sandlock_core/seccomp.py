"""The seccomp-bpf program: a ``FilterSpec`` (numbers and switches, no names) compiled to classic BPF.

Program layout (``build_filter``)::

    A = arch;  A != AUDIT_ARCH(spec.arch)           -> KILL_PROCESS   (i386 int 0x80 / sysenter, AArch32)
    A = nr
    x86_64:  A >= X32_SYSCALL_BIT and A != -1       -> KILL_PROCESS   (the x32 ABI)
    a binary search over the numbers that have a rule (about log2(n) + LEAF jumps; any other number gets
    the default at the end of the search), leading to that number's block, which runs in this order:
        its argument filter (returns, or falls through to the rest of the block):
        clone   arg0 & CLONE_NEW*                    -> ERRNO(EPERM)
        clone3                                       -> ERRNO(ENOSYS)  (flags are in memory; libc falls back
                                                                        to clone(2), which the line above checks)
        ioctl   (u32)arg1 in {TIOCSTI, TIOCLINUX}    -> ERRNO(EPERM)
                (u32)arg1 in FILEATTR_SET_IOCTLS     -> spec.fileattr_ioctl (when set: ERRNO or USER_NOTIF)
                (u32)arg1 in FILEATTR_REFUSED_IOCTLS -> ERRNO(EPERM)           (when fileattr_ioctl is set)
        socket  arg0 in {AF_INET, AF_INET6} and (arg1 & 0xf) in {SOCK_RAW[, SOCK_DGRAM]} -> ERRNO(EPERM)
        prctl   arg0 == PR_SET_DUMPABLE              -> ERRNO(EPERM)
        sendto/sendmsg/sendmmsg flags & MSG_FASTOPEN -> ERRNO(EOPNOTSUPP)   (deny_fastopen: net_connect in force)
        errno_actions                                -> ERRNO(e)
        notify_if_arg: no condition holds            -> ALLOW          (only some calls need the supervisor;
                       a condition is arg & mask != 0, or (u32)arg & mask == value)
        notify set                                   -> USER_NOTIF
        deny set                                     -> ERRNO(EPERM)
        allowlist mode: allow_only set               -> ALLOW
    default: ALLOW, or ERRNO(EPERM) in allowlist mode
    (numbers whose block is a single return share one)

The search, not a list, because the kernel runs the program for every syscall number when it attaches it (to
cache the always-allowed ones): with a 340-instruction list that took ~0.3 ms of each sandbox start-up.

Consequences the callers rely on:

* Argument filters run before the notify set, so a notified ``clone``/``socket``/``ioctl``/``prctl`` reaches
  the supervisor only when its arguments passed. ``clone3`` (with ``clone3_enosys``) never reaches it, nor
  any list: not even an allowlist or a notify entry can let it through.
* A syscall both notified and denied (or notified and in ``errno_actions``) is a ``ValueError``: the
  supervisor could CONTINUE what the policy denies.
* In allowlist mode a notified syscall is allowed through the supervisor; ``deny`` still beats ``allow_only``.
* Only the low 32 bits of an argument are compared (what the kernel uses for int/unsigned int arguments).
* ``personality`` and ``prctl(PR_SET_DUMPABLE)`` are denied by default: the child must call personality()
  before installing the filter, and may not make itself non-dumpable (an unprivileged supervisor could no
  longer read its memory or take its fds).
"""
from __future__ import annotations

import errno
import sys
from ._records import dataclass  # dataclasses costs ~10 ms of CLI start-up
from _collections_abc import Iterable  # = collections.abc.Iterable, without importing collections (CLI start-up)

from . import syscalls
from ._cache import memoize

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: bpf is imported when a program must be assembled (CLI start-up)
    from . import bpf

# seccomp return actions (linux/seccomp.h); the low 16 bits carry data (errno for ERRNO).
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF
# Short names.
RET_KILL_PROCESS, RET_TRAP, RET_ERRNO = SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_TRAP, SECCOMP_RET_ERRNO
RET_USER_NOTIF, RET_ALLOW = SECCOMP_RET_USER_NOTIF, SECCOMP_RET_ALLOW

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4
OFF_IP = 8
OFF_ARGS = 16


def arg_lo(i: int) -> int:
    """Offset of the low 32 bits of argument ``i`` (args are native-endian u64)."""
    return OFF_ARGS + 8 * i + (4 if sys.byteorder == "big" else 0)


def arg_hi(i: int) -> int:
    """Offset of the high 32 bits of argument ``i``."""
    return OFF_ARGS + 8 * i + (0 if sys.byteorder == "big" else 4)


CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                         | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_INET = 2
AF_INET6 = 10
SOCK_DGRAM = 2
SOCK_RAW = 3
SOCK_TYPE_MASK = 0xF
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
PR_SET_DUMPABLE = 4
MSG_FASTOPEN = 0x20000000
# chattr's ioctls (linux/fs.h): _IOW('f', 2, long), _IOW('f', 2, int), _IOW('X', 32, struct fsxattr). The
# kernel asks only for inode ownership, not for write access: Landlock, which has no right for them, lets a
# process that may read a file set its immutable/append-only flags.
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_FSSETXATTR = 0x401C5820
FS_IOC_SETVERSION = 0x40087602      # the inode generation (and ctime)
FS_IOC32_SETVERSION = 0x40047602
FILEATTR_SET_IOCTLS = (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR, FS_IOC_SETVERSION, FS_IOC32_SETVERSION)
# Refused outright wherever the rule above applies: enabling fs-verity makes a file immutable for good (it
# asks for write permission on the inode, which Landlock does not mediate), and a filesystem label belongs
# to the host.
FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_SETFSLABEL = 0x41009432
FILEATTR_REFUSED_IOCTLS = (FS_IOC_ENABLE_VERITY, FS_IOC_SETFSLABEL)

# What sandlock's own C child does between seccomp() and execve() (csrc/native.c, sl_confine + exec):
# read/write on the hand-off socket (and write for the error report), sendmsg for the listener (SCM_RIGHTS),
# getpid for the pid in the hand-off message, close/close_range for fds, setrlimit (glibc: prlimit64) for
# RLIMIT_NOFILE, execve (execveat for fexecve-style callers), exit/exit_group on failure, rt_sigreturn
# should a signal handler run meanwhile. Nothing the *program* needs after execve is here: allowlist users
# list that themselves. ``allowlist_numbers`` adds these; ``build_filter`` does not.
ALLOWLIST_BASELINE: tuple[str, ...] = (
    "read", "write", "close", "close_range", "sendmsg", "getpid", "execve", "execveat",
    "exit", "exit_group", "prlimit64", "setrlimit", "rt_sigreturn",
)


@dataclass(frozen=True)
class FilterSpec:
    """What the filter decides, in syscall numbers of ``arch``. Hashable: ``build_filter`` caches on it."""
    arch: str
    notify: frozenset[int] = frozenset()
    deny: frozenset[int] = frozenset()               # -> EPERM
    allow_only: frozenset[int] | None = None         # allowlist mode when not None
    deny_clone_namespaces: bool = True
    clone3_enosys: bool = True
    deny_tty_inject: bool = True
    no_raw_sockets: bool = True
    no_udp: bool = False
    deny_set_dumpable: bool = True
    deny_fastopen: bool = False                      # send*(..., MSG_FASTOPEN) -> EOPNOTSUPP
    errno_actions: tuple[tuple[int, int], ...] = ()  # (nr, errno), checked before notify/deny
    fileattr_ioctl: int | None = None                # action for ioctl(FILEATTR_SET_IOCTLS); None: no rule
    # (nr, arg, mask): a notified nr reaches the supervisor only when args[arg] & mask != 0 (both halves of
    # the 64-bit argument are tested); (nr, arg, mask, value): when (u32)args[arg] & mask == value. Several
    # entries of one nr: when any of them holds. Otherwise it is allowed, which is what its handlers would answer.
    notify_if_arg: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        # Accept any iterable of ints for the sets (callers pass sets); keep the object hashable.
        for field in ("notify", "deny"):
            v = getattr(self, field)
            if not isinstance(v, frozenset):
                object.__setattr__(self, field, frozenset(v))
        if self.allow_only is not None and not isinstance(self.allow_only, frozenset):
            object.__setattr__(self, "allow_only", frozenset(self.allow_only))
        if not isinstance(self.errno_actions, tuple):
            object.__setattr__(self, "errno_actions", tuple(tuple(p) for p in self.errno_actions))
        if not isinstance(self.notify_if_arg, tuple):
            object.__setattr__(self, "notify_if_arg", tuple(tuple(p) for p in self.notify_if_arg))


def allowlist_numbers(names: Iterable[str], arch: str | None = None) -> frozenset[int]:
    """The user's allowlist (``PolicyError`` for unknown names) plus ``ALLOWLIST_BASELINE``."""
    arch = arch or syscalls.native_arch()
    return frozenset(syscalls.resolve_names(names, "allow_syscalls", arch)) | syscalls.numbers(
        ALLOWLIST_BASELINE, arch)


def deny_only_spec(*, arch: str | None = None, deny: Iterable[int | str] | None = None, **options) -> FilterSpec:
    """A spec for ``confine()``-style use, without a supervisor: ``deny`` (numbers or names; default
    ``DEFAULT_BLOCKLIST``) plus the argument filters; ``options`` are the other ``FilterSpec`` fields."""
    arch = arch or syscalls.native_arch()
    if "notify" in options:
        raise TypeError("deny_only_spec() has no notify set (there is no supervisor)")
    if deny is None:
        nrs = syscalls.numbers(syscalls.DEFAULT_BLOCKLIST, arch)
    else:
        deny = list(deny)
        names = [d for d in deny if isinstance(d, str)]
        nrs = frozenset(d for d in deny if not isinstance(d, str)) | syscalls.resolve_names(
            names, "deny_syscalls", arch)
    return FilterSpec(arch=arch, deny=frozenset(nrs), **options)


def _errno(e: int) -> int:
    if not 0 < e <= SECCOMP_RET_DATA:
        raise ValueError(f"errno {e} out of range")
    return SECCOMP_RET_ERRNO | e


def _describe(nrs, arch: str) -> str:
    return ", ".join(sorted(syscalls.name_of(n, arch) or str(n) for n in nrs))


# Leaves of the binary search over syscall numbers test up to this many numbers one by one.
LEAF = 4


def _search(p: bpf.Program, nrs: list[int], target, default: int) -> None:
    """A binary search over the sorted ``nrs`` (A == nr): jump to ``target(nr)`` for a member, return
    ``default`` otherwise. About log2(len(nrs)) + LEAF instructions on any path."""
    if len(nrs) <= LEAF:
        for nr in nrs:
            p.jeq(nr, jt=target(nr))
        p.ret(default)
        return
    mid = len(nrs) // 2
    upper = p.new_label("upper")
    p.jge(nrs[mid], jt=upper)
    _search(p, nrs[:mid], target, default)
    p.label(upper)
    _search(p, nrs[mid:], target, default)


def _check_spec(spec: FilterSpec) -> None:
    if spec.arch not in syscalls.AUDIT_ARCH:
        raise ValueError(f"no seccomp filter for architecture {spec.arch!r} "
                         f"(supported: {', '.join(syscalls.AUDIT_ARCH)})")
    for field in ("notify", "deny", "allow_only"):
        for nr in getattr(spec, field) or ():
            if not isinstance(nr, int) or not 0 <= nr < syscalls.X32_SYSCALL_BIT:
                raise ValueError(f"FilterSpec.{field}: {nr!r} is not a syscall number")
    both = spec.notify & spec.deny
    if both:
        raise ValueError(f"syscalls both notified and denied: {_describe(both, spec.arch)} "
                         "(drop the handlers of denied syscalls)")
    seen: dict[int, int] = {}
    for nr, e in spec.errno_actions:
        # unsigned in the filter: a negative number would sort first in the binary search and never be reached
        if not isinstance(nr, int) or not 0 <= nr < syscalls.X32_SYSCALL_BIT:
            raise ValueError(f"FilterSpec.errno_actions: {nr!r} is not a syscall number")
        _errno(e)
        if seen.setdefault(nr, e) != e:
            raise ValueError(f"errno_actions: syscall {_describe([nr], spec.arch)} given two errnos")
    both = spec.notify & set(seen)
    if both:
        raise ValueError(f"syscalls both notified and in errno_actions: {_describe(both, spec.arch)}")
    for nr, arg, mask, *value in spec.notify_if_arg:
        if (nr not in spec.notify or not 0 <= arg < 6 or not 0 < mask < 1 << (32 if value else 64)
                or len(value) > 1 or (value and value[0] & ~mask)):
            raise ValueError(f"notify_if_arg: ({nr}, {arg}, {mask:#x}, {value}) needs a notified syscall, an "
                             "argument index 0-5, a non-zero 64-bit mask (32-bit with a value) and a value "
                             "within the mask")


def spec_key(spec: FilterSpec) -> tuple:
    """Every field of ``spec`` by name, sets sorted: the key of ``_filters.FILTERS``, the same in any process."""
    def canon(v):
        return tuple(sorted(v)) if isinstance(v, frozenset) else v
    return tuple((name, canon(getattr(spec, name))) for name in FilterSpec.__match_args__)


@memoize
def build_filter(spec: FilterSpec) -> bytes:
    """The assembled program (``struct sock_filter[]`` bytes) for ``spec``; see the module docstring.

    The specs of the most common ``sandlock run`` policies come assembled already (``_filters.py``, written
    by tools/gen_filters.py from ``assemble``; a test checks each against it): assembling costs ~1 ms of
    the CLI's start-up with the import of ``bpf``. Any other spec is assembled here."""
    _check_spec(spec)
    from ._filters import FILTERS
    program = FILTERS.get(spec_key(spec))
    return program if program is not None else assemble(spec)


def assemble(spec: FilterSpec) -> bytes:
    """``build_filter`` without the precomputed programs (``spec`` checked already)."""
    from . import bpf
    arch = spec.arch
    nr_of = syscalls.table(arch).get
    eperm = _errno(errno.EPERM)
    p = bpf.Program()
    kill = "kill"

    p.ld_abs(OFF_ARCH)
    p.jeq(syscalls.AUDIT_ARCH[arch], jf=kill)
    p.ld_abs(OFF_NR)
    if arch == "x86_64":
        # x32 numbers carry bit 30; let nr == -1 through (the kernel answers ENOSYS; tracers use it).
        native = p.new_label("native")
        p.jge(syscalls.X32_SYSCALL_BIT, jf=native)
        p.jeq(0xFFFFFFFF, jf=kill)
        p.label(native)

    # What each syscall number with a rule runs, in this order: its argument filter (returns or falls
    # through), its errno action, its argument conditions (notify_if_arg), then notify / deny / allow.
    # Entries are (emit, returns): ``returns`` when the code always returns (nothing after it is reached).
    blocks: dict[int, list[tuple]] = {}

    def arg_block(name: str, body, returns: bool = False) -> None:
        """if nr == name: body (which returns or falls through to the number's other rules)."""
        nr = nr_of(name)
        if nr is not None:
            blocks.setdefault(nr, []).append((body, returns))
    if spec.deny_clone_namespaces:
        def clone_ns():
            ok = p.new_label("clone_ok")
            p.ld_abs(arg_lo(0))
            p.jset(CLONE_NAMESPACE_FLAGS, jf=ok)
            p.ret(eperm)
            p.label(ok)
        arg_block("clone", clone_ns)

    if spec.clone3_enosys:
        arg_block("clone3", lambda: p.ret(_errno(errno.ENOSYS)), returns=True)

    if spec.deny_tty_inject or spec.fileattr_ioctl is not None:
        def ioctl_cmds():
            deny, ok = p.new_label("ioctl_deny"), p.new_label("ioctl_ok")
            p.ld_abs(arg_lo(1))  # cmd is an unsigned int: the high half is ignored by the kernel
            if spec.fileattr_ioctl is not None:
                attr = p.new_label("ioctl_fileattr")
                for cmd in FILEATTR_SET_IOCTLS:
                    p.jeq(cmd, jt=attr)
                for cmd in FILEATTR_REFUSED_IOCTLS:
                    p.jeq(cmd, jt=deny)
            if spec.deny_tty_inject:
                p.jeq(TIOCSTI, jt=deny)
                p.jeq(TIOCLINUX, jt=deny)
            p.ja(ok)
            if spec.fileattr_ioctl is not None:
                p.label(attr)
                p.ret(spec.fileattr_ioctl)
            p.label(deny)
            p.ret(eperm)
            p.label(ok)
        arg_block("ioctl", ioctl_cmds)

    if spec.no_raw_sockets or spec.no_udp:
        def inet_types():
            inet, deny, ok = p.new_label("inet"), p.new_label("sock_deny"), p.new_label("sock_ok")
            p.ld_abs(arg_lo(0))
            p.jeq(AF_INET, jt=inet)
            p.jeq(AF_INET6, jf=ok)
            p.label(inet)
            p.ld_abs(arg_lo(1))
            p.alu_and(SOCK_TYPE_MASK)   # strip SOCK_NONBLOCK / SOCK_CLOEXEC
            if spec.no_raw_sockets:
                p.jeq(SOCK_RAW, jt=deny)
            if spec.no_udp:
                p.jeq(SOCK_DGRAM, jt=deny)
            if spec.no_raw_sockets:
                # ICMP echo through unprivileged ping sockets (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) is raw
                # network access too: allowed only when raw sockets are (--net-allow icmp).
                p.jeq(SOCK_DGRAM, jf=ok)
                p.ld_abs(arg_lo(2))
                p.jeq(IPPROTO_ICMP, jt=deny)
                p.jeq(IPPROTO_ICMPV6, jt=deny)
            p.ja(ok)
            p.label(deny)
            p.ret(eperm)
            p.label(ok)
        arg_block("socket", inet_types)

    if spec.deny_fastopen:
        # TCP Fast Open connects inside sendto/sendmsg, where Landlock's connect hook never runs: with
        # net_connect ports in force the flag would reach any port. EOPNOTSUPP is what a kernel with TFO
        # off answers; programs then connect() first. The flags are a register: no race.
        for name, flags_arg in (("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)):
            def fastopen(flags_arg=flags_arg, name=name):
                ok = p.new_label(f"{name}_no_tfo")
                p.ld_abs(arg_lo(flags_arg))
                p.jset(MSG_FASTOPEN, jf=ok)
                p.ret(_errno(errno.EOPNOTSUPP))
                p.label(ok)
            arg_block(name, fastopen)

    if spec.deny_set_dumpable:
        def dumpable():
            ok = p.new_label("prctl_ok")
            p.ld_abs(arg_lo(0))
            p.jeq(PR_SET_DUMPABLE, jf=ok)
            p.ret(eperm)
            p.label(ok)
        arg_block("prctl", dumpable)

    for nr, e in dict(spec.errno_actions).items():
        blocks.setdefault(nr, []).append((lambda e=e: p.ret(_errno(e)), True))

    conds: dict[int, list[tuple[int, ...]]] = {}
    for nr, *cond in spec.notify_if_arg:
        conds.setdefault(nr, []).append(tuple(cond))
    for nr, cond_list in conds.items():  # e.g. resources: only requests that can grow memory are notified
        def notify_if(cond_list=cond_list):
            hit = p.new_label("cond_notify")
            for arg, mask, *value in cond_list:
                if value:  # (u32)arg & mask == value
                    p.ld_abs(arg_lo(arg))
                    if mask != 0xFFFFFFFF:
                        p.alu_and(mask)
                    p.jeq(value[0], jt=hit)
                    continue
                for off, half in ((arg_lo(arg), mask & 0xFFFFFFFF), (arg_hi(arg), mask >> 32)):
                    if half:
                        p.ld_abs(off)
                        p.jset(half, jt=hit)
            p.ret(SECCOMP_RET_ALLOW)
            p.label(hit)
            p.ret(SECCOMP_RET_USER_NOTIF)
        blocks.setdefault(nr, []).append((notify_if, True))

    # The last word on a number: notify, then deny (deny beats allow in allowlist mode), then allow.
    default = SECCOMP_RET_ALLOW if spec.allow_only is None else eperm
    final: dict[int, int] = {}
    if spec.allow_only is not None:
        final.update((nr, SECCOMP_RET_ALLOW) for nr in spec.allow_only - spec.deny)
    final.update((nr, eperm) for nr in spec.deny)
    final.update((nr, SECCOMP_RET_USER_NOTIF) for nr in spec.notify)

    # A binary search over the numbers with a rule, not a list: at attach the kernel runs the program once per
    # syscall number to cache the ones always allowed (a 340-instruction list made seccomp() take ~0.4 ms of
    # every sandbox start-up), and each filtered syscall runs it too. Numbers whose only rule is a return
    # share that return.
    own = {nr: p.new_label(f"nr_{nr}") for nr in blocks}
    special = sorted(set(blocks) | {nr for nr, action in final.items() if action != default})
    shared = {action: p.new_label("ret") for action in sorted({final[nr] for nr in special if nr not in own})}
    _search(p, special, lambda nr: own[nr] if nr in own else shared[final[nr]], default)
    for nr in sorted(blocks):
        p.label(own[nr])
        for emit, _returns in blocks[nr]:
            emit()
        if not blocks[nr][-1][1]:
            p.ret(final.get(nr, default))
    for action, label in shared.items():
        p.label(label)
        p.ret(action)

    p.label(kill)
    p.ret(SECCOMP_RET_KILL_PROCESS)
    return p.assemble()
