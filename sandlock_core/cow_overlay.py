"""fs_isolation=OVERLAYFS: the kernel's OverlayFS over the workdir, in the sandbox's user + mount namespace.

Per run, a ``cow_branch.Branch`` is made in ``fs_storage`` before the spawn; its ``upper`` directory is the
overlay's upperdir (the overlay's own workdir sits next to it). The C child mounts
``overlay lowerdir=<workdir>,upperdir=<upper>,workdir=<work>,userxattr`` on the workdir itself
(``namespaces.py``), so the sandbox reads and writes its tree at kernel speed with no supervisor involved.

After the run the upper is translated from the overlay's format into the branch's model
(:func:`adopt_upper`): a whiteout (a ``0:0`` character device) becomes a deletion, a directory marked opaque
(``user.overlay.opaque=y``; ``trusted.`` outside a user namespace) replaces its lower directory. From then on
the seccomp COW's engine does the rest: ``on_exit``/``on_error`` (commit under the per-workdir lock, abort,
keep) and ``dry_run``'s change list, content compared.

Landlock: rules are on inodes, and a path walk in the overlay climbs from the overlay's root to its mount
point, the workdir's own inode. So a rule on the workdir or an ancestor covers the whole merged tree (the
workdir is granted writable here: writes land in the upper), while a rule on a path *inside* the workdir (a
lower inode) does not reach the overlay's inodes. The overlay does its own reads and writes of the layers with
the credentials of the child at mount time, before Landlock: the upper in ``fs_storage`` needs no rule.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading

from .errors import BranchError, PolicyError

OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
_BAD_OPTION_CHARS = (",", ":", "\\", "\n")


class Overlay:
    """The overlay part of one plan: a branch per run, handed from the spawn to the finish hook."""

    def __init__(self, policy):
        self.policy = policy
        self.workdir = os.path.realpath(policy.workdir)
        self._local = threading.local()   # .queue: branches of the runs this thread spawned, oldest first
        self._pending: list = []          # every unfinished run's branch, oldest first
        self._lock = threading.Lock()

    def prepare_run(self) -> tuple[str, str]:
        """Make this run's branch; (mount target, overlay options) for the child."""
        from .cow_branch import Branch, check_storage, storage_base
        storage = storage_base(self.policy.fs_storage)
        check_storage(self.workdir, storage)
        b = Branch(self.workdir, storage)
        work = os.path.join(b.root, "ovl-work")
        os.mkdir(work, 0o700)
        for path, field in ((self.workdir, "workdir"), (b.upper, "fs_storage"), (work, "fs_storage")):
            if any(c in path for c in _BAD_OPTION_CHARS):
                b.discard()
                raise PolicyError(f"{field}: {path!r} contains one of , : \\ which an overlay mount option "
                                  f"cannot hold")
        q = getattr(self._local, "queue", None)
        if q is None:
            q = self._local.queue = []
        q.append(b)
        with self._lock:
            self._pending.append(b)
        return self.workdir, f"lowerdir={self.workdir},upperdir={b.upper},workdir={work},userxattr"

    def take_branch(self):
        """The oldest unfinished run this thread spawned (runs and pipeline stages conclude in spawn order),
        else the oldest of any thread (a popen finished elsewhere)."""
        q = getattr(self._local, "queue", None)
        with self._lock:
            while q:
                b = q.pop(0)
                if b in self._pending:  # not already taken by another thread's fallback
                    break
            else:
                b = self._pending[0] if self._pending else None
            if b is not None:
                self._pending.remove(b)
        return b

    def finish(self, sup, result) -> None:
        """Commit, discard or keep the run's upper (or list its changes in a dry run), as cow.Cow does."""
        b = self.take_branch()
        while b is not None and result.exit_code == 0 and not _was_mounted(b):
            # A run that exited 0 mounted its overlay: this branch is a spawn that failed after its
            # preparation (fork refused), left first in the queue. Nothing was written there.
            b.discard()
            b = self.take_branch()
        if b is None:
            return
        _clear_ovl_work(os.path.join(b.root, "ovl-work"))
        try:
            adopt_upper(b)
        except OSError as exc:
            b.keep()
            raise BranchError(f"the overlay upper {b.upper!r} could not be read back ({exc}); it is kept") from exc
        from .cow import conclude
        conclude(b, self.policy, result)


def adopt_upper(b) -> None:
    """Translate an overlay upper into the branch's model: whiteouts -> ``deleted``, opaque -> ``opaque``.

    The whiteout devices and opaque marks are removed from the upper, so a kept upper holds only content."""
    for dirpath, dirnames, filenames in os.walk(b.upper):
        reldir = os.path.relpath(dirpath, b.upper)
        reldir = "" if reldir == "." else reldir
        for name in dirnames:
            rel = reldir + "/" + name if reldir else name
            if _take_opaque(os.path.join(dirpath, name)):
                b.opaque.add(rel)
            b.present.add(rel)
        for name in filenames:
            rel = reldir + "/" + name if reldir else name
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(full)
                b.deleted.add(rel)
            else:
                b.present.add(rel)


def _take_opaque(path: str) -> bool:
    opaque = False
    for attr in OPAQUE_XATTRS:
        try:
            value = os.getxattr(path, attr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EPERM, errno.ENOTSUP, errno.EACCES):
                continue
            raise
        opaque = opaque or value == b"y"
        with contextlib.suppress(OSError):
            os.removexattr(path, attr, follow_symlinks=False)
    return opaque


def _was_mounted(b) -> bool:
    """The overlay makes ``work/`` in its workdir at mount time."""
    try:
        return bool(os.listdir(os.path.join(b.root, "ovl-work")))
    except OSError:
        return False


def _clear_ovl_work(work: str) -> None:
    """The overlay leaves mode-000 directories in its workdir; make them removable by the owner."""
    for dirpath, dirnames, _ in os.walk(work, topdown=True, onerror=None):
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), 0o700)
    with contextlib.suppress(OSError):
        os.chmod(work, 0o700)


def install(builder) -> None:
    """Called by cow.install for fs_isolation=overlayfs (a workdir is set)."""
    from . import namespaces
    policy = builder.policy
    if policy.max_disk is not None:
        raise PolicyError(f"max_disk: {policy.max_disk!r} is not enforced with fs_isolation=overlayfs (the kernel "
                          f"overlay has no quota); use the default seccomp copy-on-write for a disk quota")
    if not os.path.isdir(policy.workdir):
        raise PolicyError(f"workdir: {policy.workdir!r} is not a directory")
    ns = namespaces.setup(builder)
    ns.overlay = Overlay(policy)
    builder.on_finish(ns.overlay.finish)


def run_ruleset(policy):
    """This run's own Landlock ruleset (the plan's, rebuilt) and the rights the child adds on the overlay's root.

    The child adds a rule for an inode that exists only in its mount namespace; on the plan's shared ruleset
    such rules would pile up run after run. Built by the plan's own code, so the two cannot drift apart;
    ``best_effort=True`` yields exactly what the plan built (it either succeeded without skipping anything, or
    skipped the same things)."""
    import types
    from . import landlock
    from .plan import Plan
    info = Plan._build_landlock(types.SimpleNamespace(best_effort=True, missing=[]), policy)
    if info is None or info.fd < 0 or not info.handled_fs:
        return info, 0
    return info, landlock.rights_for(landlock.write_rights(info.abi) & info.handled_fs, True)
