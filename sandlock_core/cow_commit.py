"""Committing a copy-on-write branch into the workdir, so that a SIGKILL at any point leaves it recoverable.

A commit runs under the per-workdir lock (``commit_lock``). Before it touches the workdir it writes a journal:
the whiteout manifest (``deleted.txt``) and ``commit.json`` (workdir, upper) in the branch's private root, and
a pointer to that root in the branch storage (``<storage>/journal-<key>``), each fsync'ed. Then it applies the
branch: deletions first, then every upper entry through a temporary name (``.sandlock-commit-<hex>-<name>``,
in the target's own directory so that ``rename`` is atomic) renamed over the target; so each file is wholly
old or wholly new at every instant. The pointer is removed last, then the branch.

If the committing process dies (SIGKILL, power loss), the lock is released with it (flock) and the pointer
stays. The next process that takes the lock for that workdir (the next commit, or the start of the next
copy-on-write run) finds the pointer and *rolls the commit forward*: applying a branch is idempotent
(deletions of what is gone are no-ops, every upper entry is written again), so running it once more leaves
the workdir exactly as a completed commit would have; then it removes the temporaries the dead process left
in the directories it was writing to, and the branch. A pointer is trusted only when this user owns it and
the branch root it names, which must be a ``branch-<hex>`` directory of the same storage (private 0700, this
user's, naming this workdir); anything else is left alone. Its whiteouts must be relative names without
``..`` (and deletions never follow a symlink out of the workdir): a roll forward only ever changes the
workdir. The storage is never writable by a sandbox whose workdir is not (cow.install), so a child cannot
plant a journal there; the lock directory (``-w /tmp`` may reach it) holds only lock files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid

from .errors import BranchConflictError, BranchError

log = logging.getLogger("sandlock.cow")

TMP_PREFIX = ".sandlock-commit-"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{8}-")
_ROOT_RE = re.compile(r"branch-[0-9a-f]{16}")  # cow_branch.Branch's root names
JOURNAL = "commit.json"
MANIFEST = "deleted.txt"


# ---------------------------------------------------------------- the lock and the journal pointer
def _lock_dir() -> str:
    """The commit locks of this user: one private 0700 directory per uid (``$XDG_RUNTIME_DIR/sandlock-commit``
    or ``$TMPDIR/sandlock-commit-locks-<uid>``). Per user, so that no umask, no other user's directory and no
    directory another user made first can stop a commit; the same for every run of this user, so that two
    sandboxes of one user on one workdir take the same lock whatever their fs_storage."""
    uid = os.geteuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == uid:
        d = os.path.join(xdg, "sandlock-commit")
    else:
        d = os.path.join(tempfile.gettempdir(), f"sandlock-commit-locks-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise BranchError(f"commit lock directory {d!r} is not a private directory of uid {uid} "
                          f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid})")
    return d


def _key(workdir: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(workdir))).hexdigest()[:32]


def pointer_path(workdir: str, storage: str) -> str:
    """The journal pointer lives in the branch storage (the very directory whose branches it may name), never
    in the lock directory: a sandbox that may write the lock directory (``-w /tmp``) must not be able to plant
    one. cow.install refuses a policy whose Landlock rules let the child write the storage but not the
    workdir, and a pointer is trusted only to name a branch of that storage (``_trusted_root``)."""
    return os.path.join(storage, f"journal-{_key(workdir)}")


@contextlib.contextmanager
def commit_lock(workdir: str, *, wait: bool = False):
    """The per-workdir commit lock; BranchConflictError if another sandbox holds it (unless ``wait``)."""
    fd = os.open(os.path.join(_lock_dir(), _key(workdir) + ".lock"),
                 os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise BranchConflictError(f"another sandbox is committing to {workdir!r}") from None
        yield
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(root: str, deleted, opaque) -> None:
    lines = [f"D {d}\n" for d in sorted(deleted)] + [f"O {d}\n" for d in sorted(opaque)]
    _write_synced(os.path.join(root, MANIFEST), "".join(lines).encode())


def read_manifest(root: str) -> tuple[set[str], set[str]]:
    """The whiteouts of a journal; ValueError for anything but relative names that stay in the workdir."""
    deleted, opaque = set(), set()
    with open(os.path.join(root, MANIFEST), encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            kind, _, rel = line.rstrip("\n").partition(" ")
            if kind not in ("D", "O") or not _safe_rel(rel):
                raise ValueError(f"bad manifest entry {line!r}")
            (deleted if kind == "D" else opaque).add(rel)
    return deleted, opaque


def _safe_rel(rel: str) -> bool:
    """A name relative to the workdir that cannot leave it: not absolute, no NUL, no '', '.' or '..' part."""
    return bool(rel) and not rel.startswith("/") and "\0" not in rel and all(
        c not in ("", ".", "..") for c in rel.split("/"))


def _parent_is_real(w: str, rel: str) -> bool:
    """Is every directory between the workdir and rel a real directory (no symlink to follow out of it)?"""
    cur = w
    for comp in rel.split("/")[:-1]:
        cur = os.path.join(cur, comp)
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return False
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- commit and roll-forward
def commit(branch) -> None:
    """Apply ``branch`` (a cow_branch.Branch) to its workdir; on failure keep it and say where."""
    w = branch.workdir
    if branch.clean:  # nothing written, nothing deleted: nothing to apply
        branch.discard()
        return
    branch.ensure()
    with commit_lock(w):
        storage = os.path.dirname(branch.root)
        _roll_forward_stale(w, storage)
        pointer = pointer_path(w, storage)
        try:
            write_manifest(branch.root, branch.deleted, branch.opaque)
            _write_synced(os.path.join(branch.root, JOURNAL),
                          json.dumps({"workdir": w, "upper": branch.upper}).encode())
            _write_synced(pointer, os.fsencode(branch.root))
            apply_tree(w, branch.upper, branch.deleted, branch.opaque)
            remove_temporaries(w, branch.upper)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(pointer)
            branch.keep()
            raise BranchError(f"commit to {w!r} failed ({exc}); the changes are kept in {branch.upper!r} "
                              f"(whiteouts in {branch.root}/{MANIFEST})") from exc
        os.unlink(pointer)
    branch.discard()


def recover(workdir: str, storage: str) -> bool:
    """Finish a commit to ``workdir`` from branch storage ``storage`` that a killed process left half done
    (if any and if no other commit holds the lock now). True when one was rolled forward."""
    if not os.path.lexists(pointer_path(os.path.realpath(workdir), os.path.realpath(storage))):
        return False  # no journal: nothing to finish (the common case; every COW run starts here, no lock needed)
    try:
        with commit_lock(workdir):
            return _roll_forward_stale(os.path.realpath(workdir), os.path.realpath(storage))
    except BranchConflictError:
        return False
    except OSError as exc:  # e.g. the lock directory is not ours to use: the run itself still works
        log.warning("sandlock: could not check %r for a half-done commit: %s", workdir, exc)
        return False


def _trusted_root(pointer: str, workdir: str, storage: str) -> str | None:
    uid = os.geteuid()
    try:
        pst = os.lstat(pointer)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(pst.st_mode) or pst.st_uid != uid:
        return None  # another user's (or a planted) pointer: not ours to act on
    with open(pointer, "rb") as f:
        root = os.fsdecode(f.read())
    if os.path.dirname(root) != storage or not _ROOT_RE.fullmatch(os.path.basename(root)):
        log.warning("sandlock: commit journal %s names %r, not a branch of %r; ignored", pointer, root, storage)
        return None
    try:
        rst = os.lstat(root)
        with open(os.path.join(root, JOURNAL), "rb") as f:
            journal = json.loads(f.read())
    except (OSError, ValueError):
        log.warning("sandlock: stale commit journal %s names %r, which is gone; removed", pointer, root)
        os.unlink(pointer)
        return None
    if (not stat.S_ISDIR(rst.st_mode) or rst.st_uid != uid or rst.st_mode & 0o077
            or journal.get("workdir") != workdir or journal.get("upper") != os.path.join(root, "upper")):
        return None
    return root


def _roll_forward_stale(workdir: str, storage: str) -> bool:
    """Under the lock: roll forward the commit a dead process left (see the module docstring)."""
    pointer = pointer_path(workdir, storage)
    root = _trusted_root(pointer, workdir, storage)
    if root is None:
        return False
    upper = os.path.join(root, "upper")
    try:
        if not stat.S_ISDIR(os.lstat(upper).st_mode):
            raise ValueError("its upper is not a directory")
        deleted, opaque = read_manifest(root)
    except (OSError, ValueError) as exc:
        log.warning("sandlock: commit journal %s (%s) is not usable (%s); left alone, pointer removed",
                    pointer, root, exc)
        os.unlink(pointer)
        return False
    log.warning("sandlock: finishing the commit to %r that a killed process left half done (%s)", workdir, root)
    apply_tree(workdir, upper, deleted, opaque)
    remove_temporaries(workdir, upper)
    os.unlink(pointer)
    shutil.rmtree(root, ignore_errors=True)
    return True


def remove_temporaries(workdir: str, upper: str) -> None:
    """Remove commit temporaries from every workdir directory the branch writes to (the only places a commit
    creates them)."""
    for dirpath, _dirnames, _files in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        target = workdir if rel == "." else os.path.join(workdir, rel)
        try:
            names = os.listdir(target)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if _TMP_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    _remove(os.path.join(target, name))


# ---------------------------------------------------------------- applying a branch (idempotent)
def apply_tree(w: str, upper: str, deleted, opaque) -> None:
    """Deletions first, then every upper entry renamed over its target through a temporary name."""
    for rel in sorted(deleted, key=lambda r: -r.count("/")):
        if _safe_rel(rel) and _parent_is_real(w, rel):  # else there is nothing of the workdir's to delete
            _remove(os.path.join(w, rel))
    dir_modes: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(upper):
        reldir = os.path.relpath(dirpath, upper)
        reldir = "" if reldir == "." else reldir
        for name in sorted(dirnames):
            rel = reldir + "/" + name if reldir else name
            src, dst = os.path.join(dirpath, name), os.path.join(w, rel)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                _replace_symlink(src, dst)
                continue
            if rel in opaque and os.path.lexists(dst):
                _remove(dst)
            if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.path.islink(dst)):
                _remove(dst)
            if not os.path.lexists(dst):
                os.mkdir(dst, 0o700)
            dir_modes.append((dst, st))
        links: dict[int, str] = {}
        for name in sorted(filenames):
            rel = reldir + "/" + name if reldir else name
            src, dst = os.path.join(dirpath, name), os.path.join(w, rel)
            st = os.lstat(src)
            if os.path.isdir(dst) and not os.path.islink(dst):
                _remove(dst)
            if stat.S_ISLNK(st.st_mode):
                _replace_symlink(src, dst)
            elif st.st_nlink > 1 and st.st_ino in links:
                tmp = _tmpname(dst)
                os.link(links[st.st_ino], tmp)
                _rename_or_drop(tmp, dst)
            else:
                _replace_file(src, dst, st)
                links[st.st_ino] = dst
    for dst, st in reversed(dir_modes):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(OSError):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tmpname(dst: str) -> str:
    d, name = os.path.split(dst)
    return os.path.join(d, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"[:250])


def _rename_or_drop(tmp: str, dst: str) -> None:
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _replace_symlink(src: str, dst: str) -> None:
    if os.path.isdir(dst) and not os.path.islink(dst):
        _remove(dst)
    tmp = _tmpname(dst)
    os.symlink(os.readlink(src), tmp)
    _rename_or_drop(tmp, dst)


def _replace_file(src: str, dst: str, st) -> None:
    from .cow_branch import _copy_fd
    tmp = _tmpname(dst)
    if stat.S_ISFIFO(st.st_mode):
        os.mkfifo(tmp, stat.S_IMODE(st.st_mode))
    else:
        fi = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fo = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_fd(fi, fo, st.st_size)
                os.fchmod(fo, stat.S_IMODE(st.st_mode))
                with contextlib.suppress(OSError):
                    os.fchown(fo, st.st_uid, st.st_gid)
                os.fsync(fo)
                os.utime(fo, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fo)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fi)
    _rename_or_drop(tmp, dst)


__all__ = ["commit", "recover", "commit_lock", "apply_tree", "remove_temporaries", "TMP_PREFIX"]
