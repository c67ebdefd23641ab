"""Compile a Policy once into a Plan: the Landlock ruleset, the BPF program, the supervisor's handler table
and the child's process settings. A Sandbox reuses its plan for every run.

Mechanisms that need the supervisor live in their own modules and are imported only when the policy uses
them (CLI start-up stays lean). Each exposes ``install(builder)`` and registers handlers by syscall name;
only syscalls that some handler registered are notified.
"""
from __future__ import annotations

import errno
import os
import sys
from _collections_abc import Callable  # = collections.abc.Callable, without importing collections (CLI start-up)

from . import _sys, seccomp, syscalls
from .errors import PolicyError
from .policy_spec import FsIsolation  # not .policy: the CLI's LeanPolicy must not import dataclasses

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only
    from .policy import Policy

# (predicate, module) for every supervisor mechanism; the module's install(builder) registers handlers.
MECHANISMS: list[tuple[Callable[[Policy], bool], str]] = [
    # First: refusals of sensitive and foreign /proc names come before anything serves or opens them.
    (lambda p: p.isolate_pids or p.num_cpus is not None or p.max_memory is not None, "procfs"),
    (lambda p: p.net_allow_hosts is not None or p.port_remap, "network"),
    (lambda p: (p.time_start is not None or p.random_seed is not None or p.deterministic_dirs
                or p.hostname is not None), "deterministic"),
    # max_processes only when set to a non-default value or with other limits (resources.processes_enforced)
    (lambda p: (p.max_memory is not None or p.max_cpu is not None or p.max_processes != 64), "resources"),
    # Copy-on-write of the workdir: before fsdeny, which then judges the paths that stay outside the workdir.
    (lambda p: p.workdir is not None or p.fs_isolation is not FsIsolation.NONE or p.max_disk is not None,
     "cow"),
    # Landlock has no right for chmod/chown/utimes/xattrs: done on behalf, only under fs_writable (in a mount
    # namespace the kernel's read-only view does it instead: namespaces.py).
    (lambda p: bool(p.fs_readable or p.fs_writable) and not _namespaces(p), "metadata"),
    (lambda p: bool(p.fs_denied), "fsdeny"),
    (lambda p: _namespaces(p), "namespaces"),  # chroot, privileged, overlayfs: set up by the C child
]

# Fields this build cannot enforce yet: refused with a clear error, never silently ignored. Each feature
# removes its entry when it lands.
UNSUPPORTED: list[tuple[str, Callable[[Policy], bool]]] = [
]


def _mechanism(module: str):
    """The mechanism module ``module`` of this package, imported on first use (``importlib.import_module``
    without the importlib package, whose import pulls in ``warnings``: CLI start-up)."""
    name = f"{__package__}.{module}"
    __import__(name)
    return sys.modules[name]


def _preload(p: Policy) -> tuple[str, ...]:
    """(the seeded getrandom library,) when the policy's programs preload it (seedrand.py), else ().
    ``_build_landlock`` makes it readable: ld.so must be able to load it, or it prints an error."""
    if p.random_seed is None:
        return ()
    from . import seedrand
    lib = seedrand.library(p)
    return (lib,) if lib else ()


def preload_rule(p: Policy) -> tuple[str, ...]:
    """What the Landlock ruleset grants for the preload: the library, when the filesystem is confined at all
    (an unconfined one reads it anyway). The denial mirror (denials.py) grants the same."""
    return _preload(p) if p.fs_readable or p.fs_writable else ()


def _namespaces(p: Policy) -> bool:
    return p.chroot is not None or p.privileged or p.fs_isolation is FsIsolation.OVERLAYFS

#: isolate_pids by a pid namespace where the kernel allows it (procfs.py); tests set this (or the environment
#: variable SANDLOCK_PIDS_SUPERVISED=1) to run the supervised implementation, the fallback, where it would work.
FORCE_SUPERVISED_PIDS = False
_pidns_ok: list[bool] = []


def pidns_usable() -> bool:
    """Whether this process can start a pid-namespace sandbox (probed once: a throw-away child makes the
    namespaces and mounts a /proc, native.c sl_pidns_probe)."""
    if not _pidns_ok:
        from ._native import lib
        _pidns_ok.append(lib.sl_pidns_probe() == 0)
    return _pidns_ok[0]


def pid_namespace_mode(p: Policy, *, supervised: bool, policy_fn=None) -> bool:
    """isolate_pids by a user + mount + pid namespace (the kernel hides every other process; no stat, listing
    or pid-taking syscall is notified for it), or False for the supervised implementation. The supervised one
    stays where the kernel refuses the namespaces, under confine() (no new process), and where another
    mechanism opens, resolves or connects names on the child's behalf in the supervisor's view, which would
    then see the caller's /proc instead of the sandbox's: fs_denied, the COW workdir, network, policy_fn; and
    with chroot/privileged/overlayfs, whose namespaces are made by the child itself (not combined yet)."""
    if not p.isolate_pids or not supervised or FORCE_SUPERVISED_PIDS:
        return False
    if os.environ.get("SANDLOCK_PIDS_SUPERVISED") == "1":
        return False
    if (_namespaces(p) or p.fs_denied or p.workdir is not None or p.fs_isolation is not FsIsolation.NONE
            or p.max_disk is not None or p.net_allow_hosts is not None or p.port_remap or policy_fn is not None):
        return False
    if p.allow_syscalls is not None:
        # an allowlist replaces the deny list, and with it the refused mount syscalls: a program holding
        # capabilities in its namespace could then umount the fresh /proc and see the caller's
        return False
    return pidns_usable()


# Kept from the caller's environment under clean_env (the seed README's promise).
CLEAN_ENV_KEEP = (b"PATH", b"HOME", b"USER", b"LOGNAME", b"TERM", b"LANG")
DEFAULT_PATH = b"/usr/local/bin:/usr/bin:/bin"

# Syscalls whose handlers take a path: a failing handler answers EACCES there, EPERM elsewhere.
PATH_SYSCALLS = ("open", "openat", "openat2", "execve", "execveat", "creat", "truncate", "unlink", "unlinkat",
                 "rmdir", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat", "symlink",
                 "symlinkat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
                 "readlink", "readlinkat", "chdir", "mknod", "mknodat", "chmod", "fchmodat", "chown", "lchown",
                 "fchownat", "utimensat", "getdents64")


def _refuse_and_record(sup, n):
    from .notif import Errno
    name = sup.names.get(n.data.nr, str(n.data.nr))
    sup.record(name, n.pid, errno.EPERM, f"{name}() is in the syscall blocklist",
               f"deny_syscalls without {name!r} (or allow it explicitly) if the test needs it")
    return Errno(errno.EPERM)


def check_supported(policy: Policy) -> None:
    for field, active in UNSUPPORTED:
        if active(policy):
            raise PolicyError(f"{field}: {getattr(policy, field)!r} is not supported by this build yet; "
                              f"remove it from the policy (sandlock never ignores a protection silently)")


class PlanBuilder:
    """What mechanisms see while the plan is being compiled."""

    def __init__(self, policy: Policy, arch: str):
        self.policy = policy
        self.arch = arch
        self.handlers: dict[int, list] = {}
        self.names: dict[int, str] = {}
        self.extra_deny: dict[int, int] = {}
        self.errno_actions: dict[int, int] = {}  # nr -> errno answered by the filter (before notify/deny)
        self.conditions: list[tuple[int, object, tuple[int, int]]] = []  # (nr, handler, (arg, mask)), notify()
        self.fileattr_ioctl = None  # chattr's ioctls (seccomp.FILEATTR_SET_IOCTLS): "deny", or a handler
        self.prepare: list[Callable] = []  # called with a new Supervisor before the fork (no listener, no pids)
        self.setup: list[Callable] = []   # called with the Supervisor before the child is released
        self.finish: list[Callable] = []  # called with (supervisor, result) once the sandbox is over
        self.ruleset_fd = -1              # the sandbox's Landlock ruleset, for threads acting on its behalf
        self.supervised = True            # False under confine(): no supervisor will serve notifications
        self.pidns = False                # isolate_pids by a pid namespace (pid_namespace_mode)
        self.cfg_hooks: list[Callable] = []  # fn(cfg, keep) per spawn, after the plan's own fields

    def on_cfg(self, fn: Callable) -> None:
        """``fn(cfg, keep)`` fills more of ``struct sl_cfg`` before each spawn (namespaces.py)."""
        self.cfg_hooks.append(fn)

    def notify(self, name: str, handler, when: tuple | None = None) -> bool:
        """Route syscall ``name`` to ``handler``; False when this architecture has no such syscall. With
        ``when=(arg, mask)`` the handler only needs the calls where ``args[arg] & mask`` is non-zero (it would
        let the others through), with ``(arg, mask, value)`` those where ``(u32)args[arg] & mask == value``, with
        a tuple of such conditions those where any holds: if every handler of the syscall says so, the filter
        allows the calls that none of them needs."""
        nr = syscalls.number(name, self.arch)
        if nr is None:
            return False
        if when is not None:
            for cond in ((when,) if isinstance(when[0], int) else when):
                self.conditions.append((nr, handler, tuple(cond)))
        self.handlers.setdefault(nr, []).append(handler)
        self.names[nr] = name
        return True

    def answer_errno(self, name: str, err: int) -> None:
        """The filter answers syscall ``name`` with ``err`` (ENOSYS: "this kernel has no such call", so
        programs fall back to an older call that a mechanism supervises)."""
        nr = syscalls.number(name, self.arch)
        if nr is not None:
            self.errno_actions[nr] = err

    def on_prepare(self, fn: Callable) -> None:
        """``fn(sup)`` runs once per run on a new Supervisor before the reaper is forked: it has no listener and
        no pids yet. Work that needs neither belongs here: after the fork every page the caller writes is
        copied first (the reaper holds a copy-on-write image of it), which makes Python work about 3x slower."""
        self.prepare.append(fn)

    def on_supervisor(self, fn: Callable) -> None:
        """``fn(sup)`` runs once per run, after the listener arrived and before the child is released
        (``sup.root_pid`` is the confined root process, still waiting; patch or inspect it here)."""
        self.setup.append(fn)

    def on_finish(self, fn: Callable) -> None:
        """``fn(sup, result)`` runs once per run after every process of the sandbox is gone (commit a COW
        layer, add figures to the result). It may modify ``result``."""
        self.finish.append(fn)


class Plan:
    def __init__(self, policy: Policy, *, best_effort: bool | None = None, record_denials: bool = False,
                 handlers: dict | None = None, policy_fn=None, policy_fn_timeout: float = 5.0,
                 supervised: bool = True, pid_namespace: bool | None = None):
        check_supported(policy)
        self.policy = policy
        self.record_denials = record_denials
        self.arch = syscalls.native_arch()
        self.best_effort = policy.best_effort if best_effort is None else best_effort
        self.missing: list[str] = []
        self.ruleset = self._build_landlock(policy)
        builder = PlanBuilder(policy, self.arch)
        builder.supervised = supervised
        # None: wherever it works; False: the supervised isolate_pids (Sandbox.run_function's fork plan)
        self.pidns = builder.pidns = pid_namespace is not False and pid_namespace_mode(
            policy, supervised=supervised, policy_fn=policy_fn)
        builder.ruleset_fd = self.ruleset.fd if self.ruleset is not None else -1
        for applies, module in MECHANISMS:
            if applies(policy):
                _mechanism(module).install(builder)
        if policy_fn is not None:
            # After every built-in mechanism: it wraps their chains for the held syscalls, so the callback sees
            # each event once the enforcers decided (event.denied) and can only tighten their answer.
            builder.policy_fn, builder.policy_fn_timeout = policy_fn, policy_fn_timeout
            _mechanism("policy_fn").install(builder)
        for name, handler in (handlers or {}).items():  # user handlers run after the built-in ones
            if not builder.notify(name, handler):
                raise PolicyError(f"handlers: no syscall {name!r} on {self.arch}")
        if record_denials:  # last: it only records, after every enforcing handler had its say
            _mechanism("denials").install(builder)
        self.prepare = builder.prepare
        self.setup = builder.setup
        self.finish = builder.finish
        self.cfg_hooks = builder.cfg_hooks
        self.names = builder.names
        deny = self._deny_set(policy) | frozenset(builder.extra_deny)
        fileattr_action, fileattr_arg_only = self._fileattr(builder, policy, deny)
        for nr in list(builder.handlers):
            if nr in deny:  # denied outright: the supervisor never sees it
                del builder.handlers[nr]
        if record_denials and policy.allow_syscalls is None:
            # Refused either way, but through the supervisor so the refusal reaches the denial report (a
            # dead supervisor still refuses: notified syscalls then fail with ENOSYS).
            for nr in deny:
                builder.handlers[nr] = [_refuse_and_record]
                builder.names.setdefault(nr, syscalls.name_of(nr, self.arch) or str(nr))
            deny = frozenset()
        for nr in builder.errno_actions:
            builder.handlers.pop(nr, None)  # the filter answers these itself
        self.handlers = {nr: tuple(chain) for nr, chain in builder.handlers.items()}
        self.path_syscalls = frozenset(n for n in (syscalls.number(s, self.arch) for s in PATH_SYSCALLS)
                                       if n is not None)
        notify = frozenset(self.handlers) - fileattr_arg_only
        allow_only = None
        if policy.allow_syscalls is not None:
            allow_only = seccomp.allowlist_numbers(policy.allow_syscalls, self.arch)
            deny = frozenset()
        self.spec = seccomp.FilterSpec(
            arch=self.arch, notify=notify, deny=frozenset(deny), allow_only=allow_only,
            no_raw_sockets=policy.no_raw_sockets, no_udp=policy.no_udp,
            deny_fastopen=policy.net_connect is not None,
            errno_actions=tuple(sorted(builder.errno_actions.items())),
            fileattr_ioctl=fileattr_action, notify_if_arg=self._notify_if_arg(builder, notify))
        self.filter = seccomp.build_filter(self.spec)
        self.want_listener = bool(self.handlers)
        sendmsg = syscalls.number("sendmsg", self.arch)
        self.handoff_scm = sendmsg not in notify
        if not self.handoff_scm and syscalls.number("write", self.arch) in notify:
            # The child hands the listener over with sendmsg, or with write when sendmsg is supervised;
            # before the hand-off nobody can answer either, so one of them must stay unsupervised.
            raise PolicyError("handlers: write and sendmsg cannot both be supervised (the child hands the "
                              "seccomp listener over with one of them before any supervisor exists)")
        self.cwd = policy.cwd
        self._env = self._build_env(policy)
        self.envp_cache = None  # the C envp array, built at the first spawn
        self._cpu_mask = self._build_cpu_mask(policy.cpu_cores)

    # ---- compilation steps ----
    def _notify_if_arg(self, builder: PlanBuilder, notify) -> tuple:
        """(nr, arg, mask[, value]) for the notified syscalls whose every handler gave conditions: the filter
        notifies a call when any handler's condition holds (each handler lets the calls it did not ask for
        through)."""
        out = []
        for nr in sorted(notify):
            conds = [(h, c) for n, h, c in builder.conditions if n == nr]
            chain = self.handlers[nr]
            if conds and all(any(h is ch for h, _c in conds) for ch in chain):
                out.extend((nr, *c) for c in dict.fromkeys(c for _h, c in conds))
        return tuple(out)

    def _fileattr(self, builder: PlanBuilder, policy: Policy, deny) -> tuple[int | None, frozenset[int]]:
        """The filter's action for chattr's ioctls, and {ioctl} when only they reach the supervisor."""
        how = builder.fileattr_ioctl
        nr = syscalls.number("ioctl", self.arch)
        if how is None or nr is None or nr in deny or nr in builder.errno_actions or (
                policy.allow_syscalls is not None
                and nr not in seccomp.allowlist_numbers(policy.allow_syscalls, self.arch)):
            return None, frozenset()  # no rule asked for, or every ioctl is refused anyway
        if how == "deny":
            return seccomp.SECCOMP_RET_ERRNO | errno.EPERM, frozenset()
        if nr in builder.handlers:
            chain = builder.handlers[nr]
            chain.insert(0, how)
            if all(any(h is ch for n, h, _c in builder.conditions if n == nr) for ch in chain[1:]):
                # only some commands are notified (argument filter): chattr's join them from the filter's
                # ioctl block, which also refuses the others of its list
                builder.conditions.extend((nr, how, (1, 0xFFFFFFFF, cmd)) for cmd in seccomp.FILEATTR_SET_IOCTLS)
                return seccomp.SECCOMP_RET_USER_NOTIF, frozenset()
            return None, frozenset()  # every ioctl is notified already: the handler sorts them out
        # Only these commands are notified, through an argument filter: a notified ioctl would make every
        # tcgetattr pay a round trip.
        builder.handlers[nr] = [how]
        builder.names[nr] = "ioctl"
        return seccomp.SECCOMP_RET_USER_NOTIF, frozenset({nr})

    def _deny_set(self, policy: Policy) -> frozenset[int]:
        names = policy.deny_syscalls if policy.deny_syscalls is not None else syscalls.DEFAULT_BLOCKLIST
        if policy.deny_syscalls is not None:
            return frozenset(syscalls.resolve_names(names, "deny_syscalls", self.arch))
        return frozenset(n for n in (syscalls.number(s, self.arch) for s in names) if n is not None)

    def _build_landlock(self, policy: Policy):
        wants = (policy.fs_readable or policy.fs_writable or policy.net_bind or policy.net_connect
                 or policy.isolate_ipc or policy.isolate_signals)
        from . import landlock
        if not wants:
            # Still enter a Landlock domain: it is what keeps the child from ptrace-class access (writing
            # /proc/<pid>/mem) to processes outside it, the supervisor and the caller included. The ruleset
            # handles only a right no sandbox needs (making block devices), so nothing else changes.
            if landlock.abi_version() < 1:
                self.missing.append("a Landlock domain (this kernel has no Landlock): the child can reach "
                                    "processes of the same user through /proc/<pid>/mem")
                return None
            rs = landlock.Ruleset(landlock.MAKE_BLOCK, 0, 0)
            return rs.finish([])
        info = landlock.build_ruleset(
            readable=tuple(policy.fs_readable) + ((policy.workdir,) if policy.workdir else ())  # COW lower
            + preload_rule(policy),
            writable=policy.fs_writable,
            bind_ports=policy.net_bind, connect_ports=policy.net_connect,
            isolate_ipc=policy.isolate_ipc, isolate_signals=policy.isolate_signals,
            best_effort=self.best_effort, carve=policy.fs_denied)
        self.missing.extend(info.missing)
        return info

    @staticmethod
    def _build_env(policy: Policy) -> dict[bytes, bytes]:
        if policy.clean_env:
            env = {k: v for k, v in os.environb.items() if k in CLEAN_ENV_KEEP}
            env.setdefault(b"PATH", DEFAULT_PATH)
        else:
            env = dict(os.environb)
        for k, v in policy.env.items():
            env[os.fsencode(k)] = os.fsencode(v)
        lib = _preload(policy)
        if lib:
            from . import seedrand
            seedrand.add_to(env, lib[0])
        return env

    @staticmethod
    def _build_cpu_mask(cores) -> bytes | None:
        if not cores:
            return None
        mask = bytearray(128)
        for c in cores:
            if c >= len(mask) * 8:
                raise PolicyError(f"cpu_cores: {c} is beyond the {len(mask) * 8} CPUs sandlock supports")
            mask[c // 8] |= 1 << (c % 8)
        return bytes(mask)

    # ---- used by spawn ----
    def environ(self) -> dict[bytes, bytes]:
        return self._env

    def fill_cfg(self, cfg, keep: list) -> None:
        from ._native import ffi
        p = self.policy
        cfg.new_pgrp = 1
        cfg.pdeathsig = 9
        cfg.reset_signals = 1
        cfg.personality_flags = _sys.ADDR_NO_RANDOMIZE if p.no_randomize_memory else 0
        if self._cpu_mask:
            m = ffi.new("unsigned char[]", self._cpu_mask)
            keep.append(m)
            cfg.cpu_mask, cfg.cpu_mask_len = m, len(self._cpu_mask)
        cfg.thp_disable = int(p.no_huge_pages)
        cfg.no_coredump = int(p.no_coredump)
        cfg.nofile = p.max_open_files if p.max_open_files is not None else -1
        cfg.close_fds = int(p.close_fds)
        cfg.landlock_fd = self.ruleset.fd if self.ruleset is not None else -1
        prog = ffi.from_buffer(self.filter)
        keep.append(prog)
        cfg.filter, cfg.filter_len = prog, len(self.filter) // 8
        flags = 0
        if self.want_listener:
            flags = _sys.SECCOMP_FILTER_FLAG_NEW_LISTENER | _sys.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        cfg.seccomp_flags = flags
        cfg.handoff_scm = int(self.handoff_scm)
        cfg.ns_pid = int(self.pidns)
        for fn in self.cfg_hooks:
            fn(cfg, keep)

    def prepare_supervisor(self):
        """A Supervisor for the next run, made before its fork (see ``PlanBuilder.on_prepare``)."""
        from .notif import Supervisor
        sup = Supervisor(-1, self.handlers, path_syscalls=self.path_syscalls, names=self.names)
        for fn in self.prepare:
            fn(sup)
        return sup

    def make_supervisor(self, listener: int, root_pid: int = 0, sup=None, reaper_pid: int = 0):
        """The run's Supervisor serving ``listener``: ``sup`` from ``prepare_supervisor``, or a new one."""
        if sup is None:
            sup = self.prepare_supervisor()
        sup.attach(listener)
        sup.root_pid = root_pid
        sup.reaper_pid = reaper_pid
        for fn in self.setup:
            fn(sup)
        return sup

    def close(self) -> None:
        if self.ruleset is not None:
            self.ruleset.close()
            self.ruleset = None
