"""The seccomp COW's read path in C (cow_fast.py, native.c sl_cow_wait_recv): after copy-up, whiteouts, a
directory rename and new directories, every read-only call (stat, lstat, access, readlink, open, listing, chdir)
gives the same answer as a bare run of the same program, whether the C loop or the Python handlers answer it;
by absolute name, relative to a changed cwd and through a dirfd; also through symlinks."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sandlock_core import Policy, Sandbox, cow_fast
from sandlock_core.cow_fast import TrackedSet
from support import run_as_nobody

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# The program: changes the tree, then probes it every way; prints the answers (kind, size, content, errno
# names, sorted listings: nothing that differs between two copies of a tree).
PROBE = textwrap.dedent(r"""
    import errno, json, os, shutil, stat, sys
    root = os.getcwd()
    out = []

    def probe(label, fn):
        try:
            out.append([label, fn()])
        except OSError as e:
            out.append([label, errno.errorcode[e.errno]])

    def st(p, **kw):
        s = os.stat(p, **kw)
        return [stat.S_IFMT(s.st_mode), s.st_size if not stat.S_ISDIR(s.st_mode) else 0]

    def read(p, **kw):
        fd = os.open(p, os.O_RDONLY, **kw)
        try:
            return os.read(fd, 100).decode()
        finally:
            os.close(fd)

    def probes(tag, names, **kw):
        for p in names:
            name = p.replace(root, "<root>")
            probe(f"{tag} stat {name}", lambda: st(p, **kw))
            probe(f"{tag} lstat {name}", lambda: st(p, follow_symlinks=False, **kw))
            probe(f"{tag} access {name}", lambda: os.access(p, os.R_OK, **kw))
            probe(f"{tag} read {name}", lambda: read(p, **kw))
            probe(f"{tag} readlink {name}", lambda: os.readlink(p, **kw))
            if not kw:
                probe(f"{tag} list {name}", lambda: sorted(os.listdir(p)))

    for step in sys.argv[1].split(","):
        if step == "copyup":
            with open("mod.txt", "a") as f:
                f.write(" and more")
            with open("sub/deep/d.txt", "w") as f:
                f.write("rewritten")
        elif step == "delete":
            os.unlink("gone.txt")
            shutil.rmtree("tree")
        elif step == "rename":
            os.rename("dir1", "dir2")
        elif step == "replace":  # a lower directory replaced by a file, another by a symlink
            shutil.rmtree("tree")
            with open("tree", "w") as f:
                f.write("a file now")
            shutil.rmtree("sub/deep")
            os.symlink("../dir1", "sub/deep")
        elif step == "new":
            os.mkdir("new")
            with open("new/n.txt", "w") as f:
                f.write("n")
            with open("sub/added.txt", "w") as f:
                f.write("added")

    top = ["mod.txt", "gone.txt", "keep.txt", "tree", "tree/t.txt", "dir1", "dir1/f.txt", "dir1/sub/g.txt",
           "dir2", "dir2/f.txt", "dir2/sub/g.txt", "new", "new/n.txt", "sub", "sub/s.txt", "sub/added.txt",
           "sub/deep/d.txt", "sub/deep/f.txt", "link_mod", "link_gone", "link_dir1", "link_dir1/f.txt", "link_dir1/", "link_dir1/.", "abslink", "missing",
           "mod.txt/x", "./sub//s.txt", "sub/../mod.txt", "."]
    probes("abs", [os.path.join(root, p) for p in top])
    probes("rel", top)
    os.chdir("sub")
    probes("cwd", ["s.txt", "added.txt", "deep/d.txt", "../mod.txt", "../gone.txt", "link_up", "."])
    os.chdir(root)
    def opendir(label, d):
        try:
            return os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            out.append([f"{label} {d}", errno.errorcode[e.errno]])
            return None

    for d in ("sub", "dir2", "new"):
        fd = opendir("fchdir", d)
        if fd is None:
            continue
        os.fchdir(fd)
        os.close(fd)
        probe(f"fchdir {d} getcwd", os.getcwd)
        probes(f"fchdir {d}", ["s.txt", "added.txt", "f.txt", "n.txt", "sub/g.txt", "."])
        os.chdir(root)
    for d in ("sub", "dir2", "."):
        fd = opendir("dirfd", d)
        if fd is None:
            continue
        probes(f"dirfd {d}", ["s.txt", "added.txt", "deep/d.txt", "f.txt", "mod.txt", "gone.txt", "link_up",
                              "tree/t.txt"], dir_fd=fd)
        os.close(fd)
    print(json.dumps(out).replace(root, "<root>"))
""")


def make_tree(root) -> None:
    os.makedirs(root / "dir1" / "sub")
    os.makedirs(root / "tree")
    os.makedirs(root / "sub" / "deep")
    for rel, text in (("mod.txt", "lower"), ("gone.txt", "gone"), ("keep.txt", "keep"), ("tree/t.txt", "t"),
                      ("dir1/f.txt", "f"), ("dir1/sub/g.txt", "g"), ("sub/s.txt", "s"), ("sub/deep/d.txt", "d")):
        (root / rel).write_text(text)
    os.symlink("mod.txt", root / "link_mod")
    os.symlink("gone.txt", root / "link_gone")
    os.symlink("dir1", root / "link_dir1")
    os.symlink(str(root / "mod.txt"), root / "abslink")
    os.symlink("../mod.txt", root / "sub" / "link_up")


def bare_answers(tmp_path, steps: str) -> list:
    root = tmp_path / "bare"
    make_tree(root)
    r = subprocess.run([PY, "-c", PROBE, steps], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cow_answers(tmp_path, steps: str, fast: bool, monkeypatch) -> tuple[list, object]:
    root = tmp_path / ("fast" if fast else "slow")
    make_tree(root)
    seen = []
    real_setup = cow_fast.setup

    def setup(*a):
        f = real_setup(*a) if fast else None
        seen.append(f)
        return f
    monkeypatch.setattr(cow_fast, "setup", setup)
    r = Sandbox(Policy(workdir=str(root), cwd=str(root))).dry_run([PY, "-c", PROBE, steps])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout), seen[0]


@pytest.mark.parametrize("steps", ["none", "copyup", "delete", "rename", "new", "copyup,delete,rename,new", "replace"])
def test_reads_match_a_bare_run(tmp_path, monkeypatch, steps):
    want = bare_answers(tmp_path, steps)
    got_fast, fast = cow_answers(tmp_path, steps, True, monkeypatch)
    got_slow, _ = cow_answers(tmp_path, steps, False, monkeypatch)
    assert fast is not None and fast.served > 0, "the C read path must be in use"
    mismatches = [(w, g) for w, g in zip(want, got_fast) if w != g]
    assert not mismatches and len(want) == len(got_fast), mismatches[:10]
    assert got_slow == want


def test_reads_match_a_bare_run_as_an_unprivileged_user():
    """The same comparison with the supervisor and the sandbox as uid 65534 (the promise is unprivileged)."""
    code = "import json, os, subprocess, sys, tempfile\nfrom pathlib import Path\n" + \
        "from sandlock_core import Policy, Sandbox, cow_fast\n" + inspect.getsource(make_tree) + f"""
PROBE, PY = sys.argv[1], {PY!r}
served = []
real_setup = cow_fast.setup
def setup(*a):
    f = real_setup(*a)
    served.append(f)
    return f
cow_fast.setup = setup
with tempfile.TemporaryDirectory() as d:
    for steps in ("copyup,delete,rename,new", "replace"):
        bare, cow = Path(d) / ("b-" + steps), Path(d) / ("c-" + steps)  # same length: symlink sizes
        make_tree(bare)
        make_tree(cow)
        want = subprocess.run([PY, "-c", PROBE, steps], cwd=bare, capture_output=True, text=True).stdout
        r = Sandbox(Policy(workdir=str(cow), cwd=str(cow))).dry_run([PY, "-c", PROBE, steps])
        got = r.stdout.decode()
        w, g = json.loads(want), json.loads(got)
        assert w == g, (steps, [(a, b) for a, b in zip(w, g) if a != b][:5], len(w), len(g))
print("same", os.getuid(), all(f is not None and f.served > 0 for f in served))
"""
    r = run_as_nobody(code, PROBE, timeout=120)
    assert r.stdout.split() == ["same", "65534", "True"], r.stdout + r.stderr


def test_touched_names_reach_python(tmp_path, monkeypatch):
    """After a write, a stat of the copied-up file goes to the Python handler (exact size of the upper copy),
    while stats of untouched files are answered in C (no Python handler call)."""
    root = tmp_path / "w"
    make_tree(root)
    calls = []
    from sandlock_core import cow
    orig = cow.Cow.h_newfstatat

    def spy(self, sup, n):
        calls.append(n.data.nr)
        return orig(self, sup, n)
    monkeypatch.setattr(cow.Cow, "h_newfstatat", spy)
    code = ("import os\nopen('mod.txt', 'a').write('12345')\n"
            "print(os.stat('mod.txt').st_size)\n"
            "for _ in range(50): os.stat('keep.txt'); os.stat('sub/s.txt')\n")
    r = Sandbox(Policy(workdir=str(root), cwd=str(root))).dry_run([PY, "-c", code])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == [b"10"]
    assert 1 <= len(calls) < 10, calls  # the 100 stats of untouched files never reached Python


def test_tracked_set_refuses_untracked_changes():
    seen = []
    s = TrackedSet(seen.append)
    s.add("a")
    s.discard("a")
    s.discard("b")
    assert seen == ["a", "a", "b"] and not s
    with pytest.raises(TypeError):
        s.update({"c"})
    with pytest.raises(TypeError):
        s |= {"c"}


def test_a_failure_while_marking_turns_the_fast_path_off(tmp_path, monkeypatch):
    """If the table cannot be updated (here: the lower entry's kind cannot be read), the C path is switched off
    for the rest of the run rather than left deciding on a table that misses a touched name."""
    root = tmp_path / "w"
    make_tree(root)
    seen = []
    real_setup = cow_fast.setup

    def setup(*a):
        f = real_setup(*a)
        seen.append(f)
        return f
    monkeypatch.setattr(cow_fast, "setup", setup)

    def broken(self, rel):
        raise OSError(5, "EIO")
    monkeypatch.setattr(cow_fast.CowFast, "_marks_of", broken)
    code = ("import os\ntry:\n    open('mod.txt', 'a').write('12345')\nexcept OSError as e:\n    print(e.errno)\n"
            "print(os.stat('mod.txt').st_size)\n")
    r = Sandbox(Policy(workdir=str(root), cwd=str(root))).dry_run([PY, "-c", code])
    assert r.exit_code == 0, r.stderr
    assert seen[0].broken and seen[0].ctx.on == 0
    # the open failed closed (EIO) after its copy-up; the stat then went to Python, which sees the upper copy
    assert r.stdout.split() == [b"5", b"5"]
