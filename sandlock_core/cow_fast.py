"""The seccomp COW's read path in C (native.c, ``sl_cow_wait_recv``): read-only calls whose answer the upper layer
cannot change are answered CONTINUE in the receive loop, without waking Python.

Before the first write every read-only call qualifies (decided on the registers). After it, the C code reads the
name and needs to know which workdir-relative names the branch touched; this module keeps that in a hash table
the C code consults, with marks per name (native.h):

* ``WALK``: a walk through this name differs from the kernel's walk of the lower: an upper entry that is not a
  plain copy of a lower directory (a new file or directory, a symlink, an opaque directory), or a whiteout;
* ``LEAF``: the name has an upper copy (also a plain directory copy: its own metadata comes from the upper);
* ``LIST``: the directory's merged listing differs (something was added or removed in it).

The branch's sets (``present``, ``deleted``, ``opaque``, ``dirty``) become ``TrackedSet``s: every add or discard
recomputes that name's marks and puts them in the table at once, on the supervisor thread, so before the loop
receives the next notification (whichever handler changed the branch). Marks can be stale only towards "touched":
a name's own marks are recomputed whenever its membership changes, and what depends on its ancestors (hidden
under a whiteout or opaque directory) is caught by the C code's check of every ancestor.

Off (every call to Python) while a virtual cwd exists (the kernel's cwd is not the child's), under namespaces
(the child's ``/`` may differ), when another mechanism's C loop owns the receive loop, and per syscall when a
handler other than COW's is chained on it.
"""
from __future__ import annotations

import errno
import os
import stat

from ._native import ffi, lib

KINDS = {"stat": 1, "lstat": 2, "newfstatat": 3, "statx": 4, "access": 5, "faccessat": 6, "faccessat2": 7,
         "readlink": 8, "readlinkat": 9, "open": 10, "openat": 11, "chdir": 12, "fchdir": 13, "getdents64": 14,
         "getcwd": 15}
IF_CLEAN = 16  # CONTINUE while nothing was written (cow.READ_ONLY's rule), else Python
WALK, LEAF, LIST = 1, 2, 4
FIRST_TABLE = 1024


class TrackedSet(set):
    """A set that reports every element added or removed to ``changed(x)`` (only add/discard/remove are used on
    the branch's sets; the others are refused rather than left untracked)."""

    __slots__ = ("changed",)

    def __init__(self, changed):
        super().__init__()
        self.changed = changed

    def add(self, x):
        set.add(self, x)
        self.changed(x)

    def discard(self, x):
        set.discard(self, x)
        self.changed(x)

    def remove(self, x):
        set.remove(self, x)
        self.changed(x)

    def _untracked(self, *a, **k):
        raise TypeError("TrackedSet: use add/discard/remove (the COW fast path must see every change)")

    update = clear = pop = difference_update = intersection_update = symmetric_difference_update = _untracked
    __ior__ = __isub__ = __iand__ = __ixor__ = _untracked


class CowFast:
    """The C context of one run, and the table of touched names. Every change to the branch's sets updates the
    table at once (whichever handler made it: COW's, or deterministic's ``set_times``), so the C code never
    decides on a stale table: the loop that consults it runs on the thread that makes the changes."""

    def __init__(self, cow, nrs: dict[int, int], audit_arch: int):
        self.cow = cow
        b = self.branch = cow.branch
        self.broken = False
        self.marks: dict[str, int] = {}                # name -> its marks (non-zero only)
        self.by_key: dict[int, set[str]] = {}          # hash -> the names with marks that have it
        self.ctx = ctx = ffi.new("struct sl_cow_fast *")
        for i, (nr, kind) in enumerate(nrs.items()):
            ctx.nr[i], ctx.kind[i] = nr, kind
        ctx.n = len(nrs)
        ctx.arch = audit_arch
        wd, up = os.fsencode(cow.workdir), os.fsencode(b.upper)
        ctx.workdir[0:len(wd)], ctx.wd_len = wd, len(wd)
        ctx.upper[0:len(up)], ctx.up_len = up, len(up)
        ctx.wd_fd = self.wd_fd = os.open(cow.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._table(FIRST_TABLE)
        for name in ("present", "deleted", "opaque", "dirty"):
            if getattr(b, name):
                raise RuntimeError("the COW fast path starts with an empty branch")
            setattr(b, name, TrackedSet(self._changed))
        ctx.clean = 1
        self.vcwd_changed()

    def close(self) -> None:
        self.ctx.on = 0
        if self.wd_fd >= 0:
            os.close(self.wd_fd)
            self.wd_fd = self.ctx.wd_fd = -1

    @property
    def served(self) -> int:
        return self.ctx.served

    def vcwd_changed(self) -> None:
        """Off while some process has a virtual cwd (the kernel's cwd is not the one it sees)."""
        vcwd = self.cow.vcwd
        self.ctx.on = int(not self.broken and (not vcwd or not any(vcwd.values())))

    def _changed(self, rel: str) -> None:
        b = self.branch
        self.ctx.clean = int(not b.present and not b.deleted)
        try:
            self._mark(rel, self._marks_of(rel))
        except BaseException:
            self._give_up()  # the table may now miss a touched name: never consult it again
            raise

    def _give_up(self) -> None:
        """Fail safe: every notification to Python from now on."""
        self.broken = True
        self.ctx.on = 0

    def _marks_of(self, rel: str) -> int:
        b = self.branch
        m = 0
        if rel in b.present:
            # LEAF alone only for an upper directory that is a plain copy of a lower one: the kernel's walk of
            # the lower then finds what we would. A file or link in the upper over a lower directory (rm -rf d;
            # touch d) must stop walks through it, or the lower d/x would show again.
            m |= LEAF if self._upper_is_dir(rel) and self.cow._transparent(rel) else LEAF | WALK
        if rel in b.deleted or rel in b.opaque:
            m |= WALK
        if rel in b.dirty:
            m |= LIST
        return m

    def _upper_is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.branch.upper_path(rel)).st_mode)
        except OSError:
            return False  # not (yet) there: mark it as changing walks, the safe side

    def _mark(self, rel: str, m: int) -> None:
        if self.marks.get(rel, 0) == m:
            return
        enc = os.fsencode(rel)
        key = lib.sl_cow_hash(enc, len(enc))
        names = self.by_key.setdefault(key, set())
        if m:
            self.marks[rel] = m
            names.add(rel)
        else:
            self.marks.pop(rel, None)
            names.discard(rel)
            if not names:
                del self.by_key[key]
        if lib.sl_cow_put(self.ctx, key, self._combined(names)) == -errno.ENOSPC:
            self._rebuild()

    def _combined(self, names) -> int:
        """Names that share a hash share a slot: it carries all their marks."""
        m = 0
        for name in names:
            m |= self.marks[name]
        return m

    def _table(self, size: int) -> None:
        self.table = ffi.new("struct sl_cow_ent[]", size)  # kept alive here while the C context points at it
        self.ctx.table, self.ctx.mask, self.ctx.used = self.table, size - 1, 0

    def _rebuild(self) -> None:
        """A bigger table (or one without deleted slots), filled from ``by_key``."""
        size = FIRST_TABLE
        while size < 4 * len(self.by_key):
            size *= 2
        self._table(size)
        for key, names in self.by_key.items():
            if lib.sl_cow_put(self.ctx, key, self._combined(names)) != 0:  # pragma: no cover - sized above
                self._give_up()
                return


CLEAN_ONLY = ("execve", "execveat", "getxattr", "lgetxattr", "listxattr", "llistxattr")


def setup(cow, sup, handlers: dict, policy, arch: str) -> CowFast | None:
    """Hand the receive loop to the C fast path for the syscalls whose whole chain is COW's handler."""
    from . import syscalls
    if policy.chroot is not None or policy.privileged or sup.recv_fast is not None:
        return None  # the child's / may differ from ours; or another mechanism's C loop receives
    if cow.workdir == "/":
        return None
    nrs = {}
    for name, kind in [*KINDS.items(), *((n, IF_CLEAN) for n in CLEAN_ONLY)]:
        nr = syscalls.number(name, arch)
        if nr is not None and name in handlers and sup.handlers.get(nr) == (handlers[name],):
            nrs[nr] = kind
    if not nrs:
        return None
    fast = CowFast(cow, nrs, syscalls.AUDIT_ARCH[arch])
    sup.recv_fast = (lib.sl_cow_wait_recv, fast.ctx)
    return fast
