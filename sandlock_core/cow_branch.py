"""The copy-on-write branch: an upper directory over the workdir (the lower), whiteouts, commit, changes.

Model. ``present`` holds every relative path that exists in the upper (files, symlinks, directories, including
directories made only to hold a copied-up child). ``deleted`` holds whiteouts: a lower path hidden with all it
contains. ``opaque`` holds upper directories that replace a lower one entirely (a directory re-created after
its deletion, or renamed over). Only the supervisor changes the upper (the child gets fds on upper *files*,
never a way to add entries), so these sets are the truth and most look-ups cost no system call.

Every operation in the upper goes through ``parent_fd(rel)``: a walk from the upper's root with
``O_NOFOLLOW`` at each component, so a symlink planted in the upper (if the policy let the child write the
storage directory) cannot redirect the unconfined supervisor. Lower files are opened and then checked with
``/proc/self/fd`` to be the expected path (a symlink swapped in meanwhile is noticed).

Commit runs after every process of the sandbox is gone: deletions first, then the upper merged into the
workdir one file at a time (a temporary name, then ``rename`` over the target), under a per-workdir lock,
journaled so that a commit killed half way is rolled forward by the next lock holder (``cow_commit``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid

from .cow_commit import TMP_PREFIX, commit_lock  # noqa: F401  (re-exported: tests, tools)
from .errors import BranchError, PolicyError

O_PATH = os.O_PATH
DIRFLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def storage_base(fs_storage: str | None) -> str:
    """Where branches live: ``fs_storage``, else ``$XDG_RUNTIME_DIR/sandlock-cow``, else a private 0700
    ``$TMPDIR/sandlock-cow-<uid>`` (refused if another user owns it or it is group/world accessible)."""
    uid = os.geteuid()
    if fs_storage:
        os.makedirs(fs_storage, mode=0o700, exist_ok=True)
        return os.path.realpath(fs_storage)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == uid:
        base = os.path.join(xdg, "sandlock-cow")
    else:
        base = os.path.join(tempfile.gettempdir(), f"sandlock-cow-{uid}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise BranchError(f"copy-on-write storage {base!r} is not a private directory of uid {uid} "
                          f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid}); set fs_storage")
    return os.path.realpath(base)


class Branch:
    def __init__(self, workdir: str, storage: str, quota: int | None = None, *, lazy: bool = False):
        """``lazy``: make the directories on the first write (a run that writes nothing costs no mkdir/rmtree)."""
        self.workdir = os.path.realpath(workdir)
        self.root = os.path.join(storage, "branch-" + uuid.uuid4().hex[:16])
        self.upper = os.path.join(self.root, "upper")
        self._upper_fd = -1
        if not lazy:
            self.ensure()
        self.present: set[str] = set()
        self.deleted: set[str] = set()
        self.opaque: set[str] = set()
        self.dirty: set[str] = set()       # directories whose listing differs from the lower's
        self.quota = quota
        self.sizes: dict[str, int] = {}     # bytes counted against the quota, per upper file
        self.open_rw: set[str] = set()      # upper files handed out writable: their size may have grown
        self.closed = False
        self.deny = None                    # fsdeny.DenySet of the policy's fs_denied (set by the COW layer)

    def ensure(self) -> None:
        """Make the branch's directories (once)."""
        if self._upper_fd < 0:
            os.mkdir(self.root, 0o700)
            os.mkdir(self.upper, 0o755)
            self._upper_fd = os.open(self.upper, DIRFLAGS)

    @property
    def upper_fd(self) -> int:
        self.ensure()
        return self._upper_fd

    # ---- path classification ----
    def rel_of(self, path: str) -> str | None:
        w = self.workdir
        if path == w:
            return ""
        if path.startswith(w) and path[len(w)] == "/":
            return path[len(w) + 1:]
        return None

    def virtual_of(self, real: str) -> tuple[str, bool]:
        """Map a kernel path (readlink of a cwd or fd) to the child's view: upper paths become workdir paths."""
        u = self.upper
        if real == u:
            return self.workdir, True
        if real.startswith(u) and real[len(u):len(u) + 1] == "/":
            return self.workdir + real[len(u):], True
        return real, False

    @property
    def clean(self) -> bool:
        return not self.present and not self.deleted

    def hidden(self, rel: str) -> bool:
        """Is the lower entry at rel hidden by a whiteout or an opaque ancestor?"""
        if not self.deleted and not self.opaque:
            return False
        if rel in self.deleted:
            return True
        i = rel.rfind("/")
        while i > 0:
            anc = rel[:i]
            if anc in self.deleted or anc in self.opaque:
                return True
            i = rel.rfind("/", 0, i)
        return False

    def lower_path(self, rel: str) -> str:
        return self.workdir + "/" + rel if rel else self.workdir

    def upper_path(self, rel: str) -> str:
        return self.upper + "/" + rel if rel else self.upper

    def lower_lstat(self, rel: str):
        if self.hidden(rel):
            return None
        try:
            return os.lstat(self.lower_path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def lookup(self, rel: str):
        """('U'|'L', stat) for the merged entry at rel, or None."""
        if rel == "":
            return "L", os.lstat(self.workdir)
        if rel in self.present:
            return "U", os.lstat(self.upper_path(rel))
        st = self.lower_lstat(rel)
        return None if st is None else ("L", st)

    def touched(self, rel: str) -> bool:
        return rel in self.present or self.hidden(rel)

    # ---- fds in the upper, symlink-proof ----
    def parent_fd(self, rel: str, create: bool = True) -> tuple[int, str]:
        """An O_PATH fd on the upper directory holding rel (copied up on the way when ``create``), and the
        leaf name. The caller closes the fd."""
        parts = rel.split("/")
        fd = os.dup(self.upper_fd)
        try:
            done = ""
            for comp in parts[:-1]:
                done = comp if not done else done + "/" + comp
                if create and done not in self.present:
                    self.copy_up_dir(done, fd, comp)
                nfd = os.open(comp, DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def copy_up_dir(self, rel: str, pfd: int, name: str) -> None:
        st = self.lower_lstat(rel)
        self.refuse_denied(rel, st)
        mode = stat.S_IMODE(st.st_mode) if st is not None and stat.S_ISDIR(st.st_mode) else 0o755
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, rel)
        if st is None:
            raise OSError(errno.ENOENT, rel)
        self._mkdir_at(pfd, name, mode, st)
        self.present.add(rel)
        self._mark_dirty(rel)

    @staticmethod
    def _mkdir_at(pfd: int, name: str, mode: int, st=None) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.fchmod(fd, mode)
            if st is not None:
                with contextlib.suppress(OSError):
                    os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)

    def _mark_dirty(self, rel: str) -> None:
        i = rel.rfind("/")
        self.dirty.add(rel[:i] if i >= 0 else "")

    def open_lower(self, rel: str, flags: int) -> int:
        """Open the lower file at rel and check that it is that path (no symlink swapped in)."""
        path = self.lower_path(rel)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != path:
                raise OSError(errno.EACCES, f"{path} moved while being opened")
            if self.deny is not None:
                self.refuse_denied(rel, os.fstat(fd), fd)  # judged on the very file opened
        except BaseException:
            os.close(fd)
            raise
        return fd

    def refuse_denied(self, rel: str, st=None, fd: int = -1) -> None:
        """EACCES when the lower entry at rel (by path, by inode, by its directories' inodes) is in fs_denied:
        the child gets no copy, fd, new name or whiteout of it (fsdeny.py never sees what COW answers)."""
        if self.deny is not None and self.deny.denied(self.lower_path(rel), st, fd):
            raise OSError(errno.EACCES, f"{self.lower_path(rel)} is in fs_denied")

    # ---- quota ----
    def usage(self) -> int:
        for rel in list(self.open_rw):
            try:
                self.sizes[rel] = os.lstat(self.upper_path(rel)).st_size
            except OSError:
                self.sizes.pop(rel, None)
                self.open_rw.discard(rel)
        return sum(self.sizes.values())

    def charge(self, rel: str, size: int) -> None:
        if self.quota is None:
            return
        if self.usage() - self.sizes.get(rel, 0) + size > self.quota:
            raise OSError(errno.ENOSPC, "max_disk reached")
        self.sizes[rel] = size

    # ---- copy-up ----
    def copy_up(self, rel: str, truncate: bool = False) -> None:
        """Make rel exist in the upper (a copy of the lower entry; directories without their content)."""
        if rel in self.present or rel == "":
            return
        st = self.lower_lstat(rel)
        if st is None:
            raise OSError(errno.ENOENT, rel)
        self.refuse_denied(rel, st)
        pfd, leaf = self.parent_fd(rel)
        try:
            if stat.S_ISDIR(st.st_mode):
                self._mkdir_at(pfd, leaf, stat.S_IMODE(st.st_mode), st)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(self.lower_path(rel)), leaf, dir_fd=pfd)
            elif stat.S_ISREG(st.st_mode):
                self.charge(rel, 0 if truncate else st.st_size)
                self._copy_file(rel, pfd, leaf, st, truncate)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(leaf, stat.S_IMODE(st.st_mode), dir_fd=pfd)
            else:
                raise OSError(errno.EPERM, f"cannot copy up {rel} (device or socket)")
            if not stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    os.chown(leaf, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)
        self.present.add(rel)
        self._mark_dirty(rel)

    def _copy_file(self, rel, pfd, leaf, st, truncate) -> None:
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            if not truncate and st.st_size:
                src = self.open_lower(rel, os.O_RDONLY)
                try:
                    _copy_fd(src, out, st.st_size)
                finally:
                    os.close(src)
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            if not truncate:
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)

    def copy_up_tree(self, rel: str) -> None:
        """Copy rel and everything visible beneath it into the upper (before renaming a directory)."""
        self.copy_up(rel)
        look = self.lookup(rel)
        if look is None or not stat.S_ISDIR(look[1].st_mode):
            return
        for name in self.list_names(rel):
            self.copy_up_tree(rel + "/" + name if rel else name)

    def list_names(self, rel: str) -> list[str]:
        """Names in the merged directory rel (no . and ..)."""
        names: dict[str, None] = {}
        if rel == "" or (rel in self.present):
            try:
                with os.scandir(self.upper_path(rel)) as it:
                    for e in it:
                        names[e.name] = None
            except (FileNotFoundError, NotADirectoryError):
                pass
        if not (rel in self.opaque or self.hidden(rel)):
            try:
                fd = self.open_lower(rel, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                fd = -1
            if fd >= 0:
                try:
                    for name in os.listdir(fd):
                        child = rel + "/" + name if rel else name
                        if child not in self.deleted:
                            names[name] = None
                finally:
                    os.close(fd)
        return list(names)

    def merged_entries(self, rel: str) -> list[tuple[str, int, int]]:
        """(name, inode, d_type) of the merged directory rel, '.' and '..' first."""
        out: dict[str, tuple[int, int]] = {}
        if not (rel in self.opaque or self.hidden(rel)):
            try:
                fd = self.open_lower(rel, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                fd = -1
            if fd >= 0:
                try:
                    with os.scandir(fd) as it:
                        for e in it:
                            child = rel + "/" + e.name if rel else e.name
                            if child not in self.deleted:
                                out[e.name] = (e.inode(), _dtype(e))
                finally:
                    os.close(fd)
        if rel == "" or rel in self.present:
            try:
                with os.scandir(self.upper_path(rel)) as it:
                    for e in it:
                        out[e.name] = (e.inode(), _dtype(e))
            except (FileNotFoundError, NotADirectoryError):
                pass
        me = self.lookup(rel)
        ino = me[1].st_ino if me else 1
        res = [(".", ino, 4), ("..", ino, 4)]
        res.extend((k, v[0], v[1]) for k, v in sorted(out.items()))
        return res

    # ---- recording what the supervisor did ----
    def placed(self, rel: str, is_dir: bool, replaces_dir: bool = False) -> None:
        """rel now exists in the upper."""
        if rel in self.deleted:
            self.deleted.discard(rel)
            if is_dir:
                self.opaque.add(rel)
        elif is_dir and replaces_dir:
            self.opaque.add(rel)
        self.present.add(rel)
        self._mark_dirty(rel)

    def removed(self, rel: str, lower_existed: bool) -> None:
        """rel is gone from the merged view (and from the upper)."""
        prefix = rel + "/"
        for s in (self.present, self.opaque, self.deleted, self.open_rw):
            for p in [p for p in s if p == rel or p.startswith(prefix)]:
                s.discard(p)
        for p in [p for p in self.sizes if p == rel or p.startswith(prefix)]:
            del self.sizes[p]
        if lower_existed:
            self.deleted.add(rel)
        self._mark_dirty(rel)

    def lower_exists_raw(self, rel: str) -> bool:
        return os.path.lexists(self.lower_path(rel))

    # ---- outcome ----
    def changes(self) -> list[tuple[str, str]]:
        """(kind, rel) for what a commit would change: A added, M modified, D deleted (content compared)."""
        out: dict[str, str] = {}
        upper_seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.upper):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.upper)
                upper_seen.add(rel)
                ust = os.lstat(full)
                try:
                    lst = os.lstat(self.lower_path(rel))
                except (FileNotFoundError, NotADirectoryError):
                    lst = None
                if lst is None:
                    out[rel] = "A"
                elif not _same(full, ust, self.lower_path(rel), lst):
                    out[rel] = "M"
        gone: set[str] = set()
        for d in list(self.deleted) + list(self.opaque):
            base = self.lower_path(d)
            if not os.path.lexists(base):
                continue
            if d in self.deleted:
                gone.add(d)
            if os.path.isdir(base) and not os.path.islink(base):
                for dirpath, dirnames, filenames in os.walk(base):
                    for name in dirnames + filenames:
                        gone.add(os.path.relpath(os.path.join(dirpath, name), self.workdir))
        for rel in gone:
            if rel not in upper_seen:
                out[rel] = "D"
        return sorted(((k, p) for p, k in out.items()), key=lambda c: c[1])

    def write_manifest(self) -> None:
        from .cow_commit import write_manifest
        write_manifest(self.root, self.deleted, self.opaque)

    def commit(self) -> None:
        """Apply the branch to the workdir (journaled: a killed commit is rolled forward later; see cow_commit)."""
        from .cow_commit import commit
        commit(self)

    def keep(self) -> None:
        self.ensure()
        self.write_manifest()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._upper_fd >= 0:
                os.close(self._upper_fd)

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _dtype(e: os.DirEntry) -> int:
    try:
        if e.is_symlink():
            return 10
        if e.is_dir(follow_symlinks=False):
            return 4
        if e.is_file(follow_symlinks=False):
            return 8
        m = e.stat(follow_symlinks=False).st_mode
    except OSError:
        return 0
    return {stat.S_IFIFO: 1, stat.S_IFCHR: 2, stat.S_IFBLK: 6, stat.S_IFSOCK: 12}.get(stat.S_IFMT(m), 0)


def _copy_fd(src: int, dst: int, size: int) -> None:
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(src, dst, left)
            if n == 0:
                break
            left -= n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            break
        os.write(dst, chunk)


def _same(a: str, ast, b: str, bst) -> bool:
    if stat.S_IFMT(ast.st_mode) != stat.S_IFMT(bst.st_mode):
        return False
    if stat.S_IMODE(ast.st_mode) != stat.S_IMODE(bst.st_mode) and not stat.S_ISLNK(ast.st_mode):
        return False
    if stat.S_ISLNK(ast.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(ast.st_mode):
        if ast.st_size != bst.st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(1 << 16), fb.read(1 << 16)
                if x != y:
                    return False
                if not x:
                    return True
    return True


def check_storage(workdir: str, storage: str) -> None:
    w = os.path.realpath(workdir)
    s = os.path.realpath(storage)
    if s == w or s.startswith(w + "/") or w.startswith(s + "/"):
        raise PolicyError(f"fs_storage {storage!r} must not overlap the workdir {workdir!r}")
