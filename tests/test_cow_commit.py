"""A copy-on-write commit killed with SIGKILL: every workdir file wholly old or wholly new, the branch kept,
and the next run on that workdir rolls the commit forward (the tree a bare run leaves, no temporaries)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.cow_commit import TMP_PREFIX, pointer_path, recover

from test_cow import snapshot

N, SIZE = 200, 128 * 1024
PROGRAM = (f"import os, shutil\n"
           f"for i in range({N}):\n    open(f'f{{i}}', 'wb').write(b'N' * {SIZE})\n"
           f"shutil.rmtree('gone'); os.mkdir('newdir'); open('newdir/x', 'w').write('x')\n")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTER = """
import sys
sys.path[:0] = [{root!r}]
from sandlock_core import Policy, Sandbox
r = Sandbox(Policy(workdir={w!r}, fs_storage={s!r}, cwd={w!r})).run([sys.executable, "-I", "-S", "-c", {prog!r}])
print("DONE", r.exit_code, flush=True)
"""


def make_tree(root):
    root.mkdir()
    for i in range(N):
        (root / f"f{i}").write_bytes(b"O" * SIZE)
    (root / "gone").mkdir()
    (root / "gone" / "a").write_text("a")
    return root


def temporaries(root) -> list[str]:
    return [os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs if n.startswith(TMP_PREFIX)]


def _first_name(k: int) -> str:
    return sorted(f"f{i}" for i in range(N))[k]  # the commit walks names in sorted order


def _killed_when(w, point: str):
    """True once the committing process reached ``point``."""
    if point == "temporary":
        return any(n.startswith(TMP_PREFIX) for n in os.listdir(w))
    k = {"first": 0, "half": N // 2}[point]
    with open(w / _first_name(k), "rb") as f:
        return f.read(1) == b"N"


@pytest.mark.parametrize("point", ["temporary", "first", "half"])
def test_commit_killed_is_per_file_atomic_and_rolled_forward(tmp_path, point):
    w, s, bare = make_tree(tmp_path / "w"), tmp_path / "s", tmp_path / "bare"
    shutil.copytree(w, bare)
    subprocess.run([sys.executable, "-I", "-S", "-c", PROGRAM], cwd=bare, check=True)
    proc = subprocess.Popen([sys.executable, "-c", COMMITTER.format(root=ROOT, w=str(w), s=str(s), prog=PROGRAM)],
                            stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not _killed_when(w, point):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
    assert b"DONE" not in out, "the commit finished before it could be killed"
    left = temporaries(w)
    assert left or point != "temporary", "killed while a temporary existed: it must still be there"
    for i in range(N):
        data = (w / f"f{i}").read_bytes()
        assert data in (b"O" * SIZE, b"N" * SIZE), f"f{i}: {len(data)} bytes, {set(data)}"
    assert any((w / f"f{i}").read_bytes()[:1] == b"N" for i in range(N)) or point == "temporary"
    # the branch is kept, with its journal, and the pointer names it
    roots = list(s.glob("branch-*"))
    assert len(roots) == 1 and (roots[0] / "commit.json").exists() and (roots[0] / "deleted.txt").exists()
    assert open(pointer_path(str(w), str(s)), "rb").read() == os.fsencode(roots[0])
    for i in range(N):
        assert (roots[0] / "upper" / f"f{i}").read_bytes() == b"N" * SIZE
    # the next run on that workdir finishes the commit first, then runs against the committed tree
    r = Sandbox(Policy(workdir=str(w), fs_storage=str(s), cwd=str(w))).dry_run(["sh", "-c", "cat newdir/x"])
    assert r.exit_code == 0 and r.stdout == b"x" and r.changes == []
    assert snapshot(w) == snapshot(bare)
    assert temporaries(w) == [] and list(s.glob("branch-*")) == [], left
    assert not os.path.exists(pointer_path(str(w), str(s)))
    assert recover(str(w), str(s)) is False  # nothing left to do


def test_a_pointer_of_another_owner_or_to_a_foreign_root_is_not_trusted(tmp_path):
    w, s = tmp_path / "w", tmp_path / "s"
    w.mkdir()
    s.mkdir(mode=0o700)
    (w / "f").write_text("old")
    pointer = pointer_path(str(w), str(s))

    def plant(root, workdir):
        (root / "upper").mkdir(parents=True, exist_ok=True)
        (root / "upper" / "f").write_text("planted")
        (root / "deleted.txt").write_text("")
        (root / "commit.json").write_text('{"workdir": "%s", "upper": "%s"}' % (workdir, root / "upper"))
        os.chmod(root, 0o700)
        with open(pointer, "wb") as f:
            f.write(os.fsencode(root))

    plant(tmp_path / "fake", w)
    assert recover(str(w), str(s)) is False  # a root outside the storage is no branch of ours
    assert (w / "f").read_text() == "old"
    plant(s / "branch-0123456789abcdef", "/elsewhere")
    assert recover(str(w), str(s)) is False  # the journal names another workdir
    assert (w / "f").read_text() == "old"
    plant(s / "branch-0123456789abcdef", w)
    os.chmod(s / "branch-0123456789abcdef", 0o755)
    assert recover(str(w), str(s)) is False  # a root others can write into is not a branch of ours
    assert (w / "f").read_text() == "old"
    os.chmod(s / "branch-0123456789abcdef", 0o700)
    assert recover(str(w), str(s)) is True
    assert (w / "f").read_text() == "planted" and not (s / "branch-0123456789abcdef").exists()
    assert not os.path.exists(pointer)
