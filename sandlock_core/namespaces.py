"""User + mount namespaces: ``chroot``, ``privileged`` and the OverlayFS copy-on-write (``cow_overlay.py``).

The C child (``csrc/native.c``, section "namespaces") does the work before Landlock and seccomp, because both
forbid mounts afterwards: ``unshare(CLONE_NEWUSER|CLONE_NEWNS)``, a one-line uid/gid map of the caller (to
itself, or to 0 with ``privileged``), mounts made private, the overlay on the workdir, then a read-only view:
every mount read-only except the overlay and the ``fs_writable`` trees, and finally ``chroot``.

Semantics (what users see):

* **Paths in a policy are host paths**, chroot or not: ``fs_readable``/``fs_writable``, ``workdir``,
  ``fs_storage`` and ``chroot`` itself name the caller's files. Landlock rules are on inodes, so
  ``fs_readable=["/srv/root/usr"]`` with ``chroot="/srv/root"`` is what the sandbox sees as ``/usr``. Only
  ``cwd`` is a path inside the new root (default ``/``).
* **The read-only view replaces the metadata supervisor.** Landlock has no right for chmod/chown/utimes/xattrs;
  without namespaces ``metadata.py`` does them on behalf. Here the kernel refuses them outside the writable trees
  (``EROFS``), so no syscall is notified for them. Made only when Landlock confines the filesystem (some
  ``fs_readable``/``fs_writable`` path or a workdir), so it never refuses what Landlock allows.
* **Refused combinations** (on-behalf opens by the supervisor resolve names in the caller's mount namespace,
  not the sandbox's): ``fs_denied``, seccomp copy-on-write (a workdir without ``fs_isolation=overlayfs``) with
  ``chroot``, and ``policy_fn``. ``max_disk`` is not enforced by the kernel overlay and is refused too.
* **Mount syscalls stay closed.** Landlock forbids mount topology changes; the filter adds ``chroot``,
  ``mount_setattr``, ``open_tree``, ``move_mount`` and the ``fs*`` mount API to the refused set (a ``privileged``
  sandbox holds capabilities inside its namespace: it must not undo the read-only view or leave the chroot).
* **isolate_pids** makes its own user + mount + pid namespace (``plan.pid_namespace_mode``, native.c "pid
  namespace", described in ``procfs.py``): made by the reaper's clone, not by the child's unshare, with the same
  refused mount syscalls. It is not combined with the namespaces of this module: with ``chroot``,
  ``privileged`` or ``fs_isolation=overlayfs``, ``isolate_pids`` is the supervised one.
* **Where the kernel refuses** (user namespaces disabled, a container profile, an outer sandbox's seccomp
  filter), the child stops at that step and the run fails with ``sandlock: namespaces: <step>: <error>`` plus
  the likely reason (:func:`hint`). Nothing falls back silently.
"""
from __future__ import annotations

import errno
import os
import threading

from .errors import ConfinementError, PolicyError
from .policy import FsIsolation

#: Mount-changing syscalls refused in the filter for every namespace sandbox (EPERM).
MOUNT_SYSCALLS = ("chroot", "mount_setattr", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
                  "fspick", "mount", "umount2", "pivot_root", "unshare", "setns")
MAX_WRITABLE = 64  # SL_NS_MAX_WRITABLE in native.c


class NsSetup:
    """What one plan asks of the C child; ``overlay`` (cow_overlay) adds the per-run overlay mount."""

    def __init__(self, policy):
        self.policy = policy
        # Made only under a filesystem policy, and not when "/" itself is writable (nothing would stay read-only;
        # and a mount moved onto "/" would not be seen: a walk from the root does not cross mounts on it).
        self.readonly = (bool(policy.fs_readable or policy.fs_writable or policy.workdir)
                         and "/" not in (os.path.realpath(w) for w in policy.fs_writable))
        self.overlay = None   # cow_overlay.Overlay when fs_isolation=overlayfs
        self.policy_fn_check = None

    def fill(self, cfg, keep: list) -> None:
        from ._native import ffi

        def cstr(s: str):
            c = ffi.new("char[]", os.fsencode(s))
            keep.append(c)
            return c
        if self.policy_fn_check is not None:
            self.policy_fn_check()
        p = self.policy
        cfg.ns_enable = 1
        cfg.ns_privileged = int(p.privileged)
        cfg.ns_readonly = int(self.readonly)
        if self.readonly and p.fs_writable:
            # resolved: move_mount does not follow a symlink in its last component (Landlock's rule does)
            arr = ffi.new("char *[]", [cstr(os.path.realpath(w)) for w in p.fs_writable])
            keep.append(arr)
            cfg.ns_writable, cfg.n_ns_writable = arr, len(p.fs_writable)
        if p.chroot is not None:
            cfg.ns_chroot = cstr(p.chroot)
        if self.overlay is not None:
            from .cow_overlay import run_ruleset
            if cfg.landlock_fd >= 0:
                info, rights = run_ruleset(p)
                if info is not None and info.fd >= 0:  # else the plan's ruleset stays (fail closed)
                    keep.append(info)  # closed when the spawn is done with cfg (the child has its copy)
                    cfg.landlock_fd, cfg.ov_landlock_rights = info.fd, rights
            target, options = self.overlay.prepare_run()
            cfg.ov_target, cfg.ov_options = cstr(target), cstr(options)


def setup(builder) -> NsSetup:
    """The plan's namespace setup (made once, whichever of cow_overlay/namespaces installs first)."""
    ns = getattr(builder, "namespaces", None)
    if ns is not None:
        return ns
    policy = builder.policy
    if not builder.supervised:
        # confine() applies Landlock and seccomp to the caller in place; it never sees sl_cfg.
        raise PolicyError("confine(): chroot/privileged/fs_isolation=overlayfs need a new process (the namespaces "
                          "are set up between fork and exec); use Sandbox(policy).run()")
    _validate(policy)
    check_kernel()
    ns = builder.namespaces = NsSetup(policy)
    from . import syscalls
    for name in MOUNT_SYSCALLS:
        nr = syscalls.number(name, builder.arch)
        if nr is not None:
            builder.extra_deny[nr] = errno.EPERM

    def refuse_policy_fn():
        # Plan sets builder.policy_fn after every mechanism installed; checked before each spawn.
        if getattr(builder, "policy_fn", None) is not None:
            raise PolicyError("policy_fn cannot be combined with chroot/privileged/fs_isolation=overlayfs: its "
                              "on-behalf opens would resolve paths outside the sandbox's mount namespace")
    ns.policy_fn_check = refuse_policy_fn
    builder.on_cfg(ns.fill)
    return ns


def install(builder) -> None:
    setup(builder)


def _validate(policy) -> None:
    combos = " (chroot, privileged and fs_isolation=overlayfs run in a user + mount namespace, where the " \
             "supervisor's on-behalf opens would resolve paths in the caller's view)"
    if policy.fs_denied:
        raise PolicyError(f"fs_denied: {list(policy.fs_denied)!r} cannot be combined with namespaces" + combos)
    if policy.chroot is not None:
        if not os.path.isdir(policy.chroot):
            raise PolicyError(f"chroot: {policy.chroot!r} is not a directory")
        if policy.workdir is not None and policy.fs_isolation is not FsIsolation.OVERLAYFS:
            raise PolicyError(f"chroot: {policy.chroot!r} with a workdir needs fs_isolation='overlayfs' (the "
                              f"seccomp copy-on-write resolves paths in the caller's root)")
    if len(policy.fs_writable) > MAX_WRITABLE:
        raise PolicyError(f"fs_writable: {len(policy.fs_writable)} trees; at most {MAX_WRITABLE} with namespaces")


_kernel_checked: list = []
_kernel_lock = threading.Lock()


def check_kernel() -> None:
    """Refuse early where the kernel switches unprivileged user namespaces off (the child would fail anyway)."""
    if _kernel_checked:
        return
    with _kernel_lock:
        reasons = []
        if _read_int("/proc/sys/user/max_user_namespaces") == 0:
            reasons.append("user.max_user_namespaces is 0")
        if os.geteuid() != 0 and _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
            reasons.append("kernel.unprivileged_userns_clone is 0")
        if not os.path.exists("/proc/self/ns/user"):
            reasons.append("this kernel has no user namespaces (CONFIG_USER_NS)")
        if reasons:
            raise ConfinementError("chroot/privileged/fs_isolation=overlayfs need an unprivileged user namespace, "
                                   "which this kernel refuses: " + "; ".join(reasons))
        _kernel_checked.append(True)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def hint(step: str, err: int) -> str:
    """Why a namespace step of the child failed, as far as the errno tells (spawn.ChildSetupError)."""
    if "unshare" in step:
        if err == errno.EPERM:
            return (" (user namespaces are refused here: this process already runs inside a sandbox whose "
                    "seccomp filter forbids unshare, a container profile forbids it, or the kernel restricts "
                    "unprivileged user namespaces)")
        if err == errno.EINVAL:
            return " (the kernel has no user or mount namespaces)"
        if err == errno.ENOSPC or err == errno.EUSERS:
            return " (the nesting or count limit of user namespaces is reached: user.max_user_namespaces)"
    if "uid_map" in step:
        return (" (the kernel refused the uid/gid map of the new user namespace: this process runs inside a "
                "Landlock sandbox that may not write /proc, or AppArmor's apparmor_restrict_unprivileged_userns "
                "forbids it)")
    if "private" in step and err == errno.EPERM:
        return (" (mounts are refused: this process runs inside a Landlock sandbox, which forbids mount changes, "
                "or AppArmor's apparmor_restrict_unprivileged_userns left the new namespace without capabilities)")
    if "overlay" in step:
        return (" (the kernel refused an OverlayFS mount in a user namespace: it needs Linux 5.11+, and the upper "
                "directory (fs_storage) must be on a filesystem that supports user xattrs, e.g. not another "
                "overlay; the workdir must not be inside fs_storage)")
    if "open_tree" in step or "mount_setattr" in step or "move_mount" in step:
        return (" (the read-only view needs the new mount API, Linux 5.12+; an fs_writable tree that "
                "cannot be cloned is named by the errno)")
    if "chroot" in step:
        return " (the new root must exist and be a directory reachable in the sandbox's view)"
    return ""
