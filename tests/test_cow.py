"""Copy-on-write workdir: real programs run under COW and bare on copies of one tree, compared file by file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from sandlock_core import BranchConflictError, Policy, Sandbox
from sandlock_core.cow_branch import commit_lock

from support import GIT_ENV, expected_changes, make_tree, run_as_nobody
from support import tree_snapshot as snapshot

SYSTEM_RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
ENV = GIT_ENV


def compare_run(tmp_path, script: str, tree=make_tree, policy_kw=None, env=None):
    """Run ``sh -c script`` bare in one copy, under COW (commit) in another, dry-run in a third."""
    orig = tree(tmp_path / "orig")
    bare, cow, dry = tmp_path / "bare", tmp_path / "cow", tmp_path / "dry"
    for d in (bare, cow, dry):
        shutil.copytree(orig, d, symlinks=True)
    env = {**os.environ, **ENV, **(env or {})}
    b = subprocess.run(["sh", "-c", script], cwd=bare, env=env, capture_output=True)
    assert b.returncode == 0, b.stderr
    before = snapshot(orig)
    after = snapshot(bare)
    kw = dict(policy_kw or {})
    pol = Policy(workdir=str(cow), cwd=str(cow), env=ENV, **kw)
    r = Sandbox(pol).run(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    assert snapshot(cow) == after, f"commit must leave the same tree as a bare run {r.stdout!r} {r.stderr!r}"
    pol = Policy(workdir=str(dry), cwd=str(dry), env=ENV, **kw)
    d = Sandbox(pol).dry_run(["sh", "-c", script])
    assert d.exit_code == 0, d.stderr
    assert snapshot(dry) == before, "dry run must leave the tree untouched"
    got = [(c.kind, c.path) for c in d.changes if c.path != os.path.join(".git", "index")]
    assert got == [c for c in expected_changes(before, after) if c[1] != os.path.join(".git", "index")]
    return d


def test_sed_in_place(tmp_path):
    d = compare_run(tmp_path, "sed -i s/hello/bye/ README && grep bye README && sed -i s/x/x/ src/deep/x.txt")
    assert [(c.kind, c.path) for c in d.changes] == [("M", "README")]  # rewriting identical bytes: no change


def test_mv_directory(tmp_path):
    compare_run(tmp_path, "mv src/deep moved && ls moved/er && cat moved/er/y.txt && test ! -e src/deep")


def test_rm_rf_subtree(tmp_path):
    compare_run(tmp_path, "rm -rf src && test ! -e src && ls")


def test_write_then_delete_is_no_change(tmp_path):
    d = compare_run(tmp_path, "echo tmp > t.tmp && cat t.tmp && rm t.tmp && mkdir tdir && rmdir tdir")
    assert d.changes == []


def test_mixed_operations(tmp_path):
    compare_run(tmp_path, textwrap.dedent("""
        set -e
        echo new > src/new.txt; mkdir -p a/b/c; echo z > a/b/c/z
        chmod 600 README; ln -s src/a.c alink; ln src/a.c hard; cp -r src copy
        rm link; touch README; truncate -s 3 src/deep/x.txt; mv tool.sh src/tool2.sh
        cd a/b && pwd && echo here > here.txt && cd ../.. && cat a/b/here.txt
        ls -la a/b >/dev/null; test -d a/b/c; test "$(cat alink)" = "int a(void) { return 1; }"
    """))


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_init_add_commit(tmp_path):
    compare_run(tmp_path, "git init -q . && git add -A && git commit -qm first && echo more >> README "
                          "&& git commit -qam second && git log --oneline && git status --short")


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_in_existing_repository(tmp_path):
    def repo(root):
        make_tree(root)
        env = {**os.environ, **ENV}
        subprocess.run(["sh", "-c", "git init -q . && git add -A && git commit -qm base"], cwd=root, env=env,
                       check=True)
        return root
    compare_run(tmp_path, "echo change >> src/a.c && git rm -q --cached link && git commit -qam two "
                          "&& git gc -q 2>/dev/null; git status --short", tree=repo)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="make/cc missing")
def test_make_c_project(tmp_path):
    def project(root):
        root.mkdir()
        (root / "main.c").write_text('#include <stdio.h>\nint a(void);\nint main(void){printf("%d\\n",a());}\n')
        (root / "a.c").write_text("int a(void) { return 42; }\n")
        (root / "Makefile").write_text("prog: main.o a.o\n\tcc -o prog main.o a.o\n%.o: %.c\n\tcc -c -o $@ $<\n"
                                       "clean:\n\trm -f prog *.o\n")
        return root
    compare_run(tmp_path, "make -s && test -x prog && /bin/sh -c 'make -s clean' && make -s", tree=project)


def test_exec_binary_created_in_upper(tmp_path):
    wd = make_tree(tmp_path / "wd")
    script = f"cp /bin/echo {wd}/myecho && {wd}/myecho works && cp tool.sh {wd}/t2.sh && {wd}/t2.sh"
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd))).dry_run(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == b"works\ntool\n"
    assert not (wd / "myecho").exists()


def test_abort_and_keep(tmp_path):
    from sandlock_core import BranchAction
    wd = make_tree(tmp_path / "wd")
    before = snapshot(wd)
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd))).run(["sh", "-c", "echo x > new; exit 3"])
    assert r.exit_code == 3 and snapshot(wd) == before  # on_error defaults to abort
    sb = Sandbox(Policy(workdir=str(wd), cwd=str(wd), on_exit=BranchAction.KEEP, fs_storage=str(tmp_path / "st")))
    r = sb.run(["sh", "-c", "echo x > new; rm README"])
    assert r.exit_code == 0 and snapshot(wd) == before
    kept = r.cow_upper
    assert open(os.path.join(kept, "new")).read() == "x\n"
    assert "D README" in open(os.path.join(os.path.dirname(kept), "deleted.txt")).read()
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd), on_exit=BranchAction.ABORT)).run(["sh", "-c", "echo x > y"])
    assert snapshot(wd) == before


def test_commit_lock_conflict(tmp_path):
    wd = make_tree(tmp_path / "wd")
    with commit_lock(str(wd)):
        with pytest.raises(BranchConflictError):
            Sandbox(Policy(workdir=str(wd), cwd=str(wd))).run(["sh", "-c", "echo x > new"])
    assert not (wd / "new").exists()


def test_concurrent_sandboxes_see_only_their_writes(tmp_path):
    wd = make_tree(tmp_path / "wd")
    out = {}

    def one(i):
        sb = Sandbox(Policy(workdir=str(wd), cwd=str(wd)))
        out[i] = sb.dry_run(["sh", "-c", f"echo {i} > mine{i}; echo {i} >> README; sleep 0.3; ls; cat README"])

    ts = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(2):
        text = out[i].stdout.decode()
        assert f"mine{i}" in text and f"mine{1 - i}" not in text
        assert text.endswith(f"hello\nworld\n{i}\n")
        assert sorted((c.kind, c.path) for c in out[i].changes) == [("A", f"mine{i}"), ("M", "README")]


def test_max_disk(tmp_path):
    wd = make_tree(tmp_path / "wd")
    (wd / "big").write_bytes(b"x" * 200_000)
    sb = Sandbox(Policy(workdir=str(wd), cwd=str(wd), max_disk="100K"))
    r = sb.dry_run(["sh", "-c", "echo a >> big"])
    assert r.exit_code != 0 and b"space" in r.stderr.lower()
    r = sb.dry_run(["sh", "-c", "echo small > s; head -c 50000 /dev/zero > f1; head -c 60000 /dev/zero > f2; "
                                "echo more > f3"])
    assert r.exit_code != 0
    assert ("A", "s") in [(c.kind, c.path) for c in r.changes]


def test_cli_dry_run(tmp_path):
    wd = make_tree(tmp_path / "wd")
    before = snapshot(wd)
    cmd = [sys.executable, "-m", "sandlock_core.cli", "run", "--workdir", str(wd), "--cwd", str(wd), "--dry-run"]
    p = subprocess.run(cmd + ["--", "sh", "-c", "echo n > n; rm README"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "A  n" in p.stderr and "D  README" in p.stderr
    p = subprocess.run(cmd + ["--json", "--", "sh", "-c", "echo n > n"], capture_output=True, text=True)
    assert json.loads(p.stdout.strip().splitlines()[-1])["changes"] == [{"kind": "A", "path": "n"}]
    assert snapshot(wd) == before
    p = subprocess.run([sys.executable, "-m", "sandlock_core.cli", "run", "--workdir", str(wd), "--cwd", str(wd),
                        "--", "sh", "-c", "echo n > n"], capture_output=True, text=True)
    assert p.returncode == 0 and (wd / "n").read_text() == "n\n"


def test_fs_isolation_branchfs_refused(tmp_path):
    from sandlock_core import PolicyError
    with pytest.raises(PolicyError, match="branchfs"):
        Sandbox(Policy(workdir=str(tmp_path), fs_isolation="branchfs"))


# ---- path tricks: none of them reaches the host tree -------------------------------------------------------

TRICKS = r"""
import errno, os, sys
wd, outside = sys.argv[1], sys.argv[2]
os.chdir(os.path.join(wd, "sub"))
def w(path, data=b"P", **kw):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, **kw)
        os.write(fd, data); os.close(fd); return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
res = {}
res["dotdot"] = w("../f")
res["abs"] = w(wd + "/g")
res["proc_cwd"] = w("/proc/self/cwd/../h")
res["proc_cwd2"] = w("/proc/%d/cwd/s2" % os.getpid())
dfd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
res["dirfd"] = w("sub/dfile", dir_fd=dfd)
res["devfd"] = w("/dev/fd/%d/i" % dfd)
res["hardlink_out"] = w(wd + "/hl")        # a hard link, in the lower, to a file outside
res["symlink_out"] = w(wd + "/out")        # a symlink, in the lower, to a file outside
os.symlink(outside, wd + "/mylink")
res["own_symlink_out"] = w(wd + "/mylink")
try:
    os.link(wd + "/f", outside + ".2"); res["link_out"] = "ok"
except OSError as e:
    res["link_out"] = errno.errorcode[e.errno]
try:
    os.rename(wd + "/f", outside + ".3"); res["rename_out"] = "ok"
except OSError as e:
    res["rename_out"] = errno.errorcode[e.errno]
try:
    os.chmod(wd + "/hl", 0o600); res["chmod"] = "ok"
except OSError as e:
    res["chmod"] = errno.errorcode[e.errno]
print(repr(res))
print(open(wd + "/hl").read(), open(wd + "/f").read())
"""

NOBODY_TRICKS = r"""
import os, shutil, sys, tempfile
from sandlock_core import Policy, Sandbox
base = tempfile.mkdtemp()
wd = os.path.join(base, "wd"); os.makedirs(wd + "/sub")
outside = os.path.join(base, "outside.txt")
open(outside, "w").write("OUT")
open(wd + "/f", "w").write("F")
os.link(outside, wd + "/hl")
os.symlink(outside, wd + "/out")
before = sorted(os.listdir(wd)), sorted(os.listdir(wd + "/sub"))
ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
r = Sandbox(Policy(workdir=wd, fs_readable=ro + [base], on_exit="commit")).dry_run(
    [sys.executable, "-I", "-S", "-c", sys.argv[1], wd, outside])
print(r.stdout.decode()); print(r.stderr.decode(), file=sys.stderr)
assert open(outside).read() == "OUT", "outside file changed"
assert open(wd + "/f").read() == "F" and (sorted(os.listdir(wd)), sorted(os.listdir(wd + "/sub"))) == before
assert not os.path.exists(outside + ".2") and not os.path.exists(outside + ".3")
print("CHANGES", sorted((c.kind, c.path) for c in r.changes))
"""


def _check_tricks(out: str):
    res = eval(out.splitlines()[0])  # noqa: S307 - our own repr
    for k in ("dotdot", "abs", "proc_cwd", "proc_cwd2", "dirfd", "devfd", "hardlink_out", "chmod"):
        assert res[k] == "ok", (k, res)
    assert res["symlink_out"] == "EACCES" and res["own_symlink_out"] == "EACCES"  # Landlock: outside is read-only
    assert res["link_out"] == "EXDEV" and res["rename_out"] == "EXDEV"
    assert out.splitlines()[1] == "P P"
    ch = dict((p, k) for k, p in eval(out.split("CHANGES", 1)[1]))  # noqa: S307
    assert ch == {"f": "M", "g": "A", "h": "A", "sub/s2": "A", "sub/dfile": "A", "i": "A", "hl": "M",
                  "mylink": "A"}


def test_path_tricks(tmp_path):
    r = subprocess.run([sys.executable, "-c", NOBODY_TRICKS, TRICKS], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    _check_tricks(r.stdout)


def test_path_tricks_unprivileged():
    r = run_as_nobody(NOBODY_TRICKS, TRICKS)
    assert r.returncode == 0, r.stderr + r.stdout
    _check_tricks(r.stdout)


def test_merged_view_through_copied_up_directories_and_lower_symlinks(tmp_path):
    """Copied-up directories are walked by the kernel as the lower ones (fast path); a lower symlink into a
    directory with upper entries, ``..`` out of it, and stat/ls/cat of new, changed and deleted names must still
    show the merged view, as in a bare run."""
    def tree(root):
        make_tree(root)
        os.symlink("src/deep", root / "dl")
        return root
    compare_run(tmp_path, textwrap.dedent("""
        set -e
        echo new > src/deep/new.txt; echo changed >> src/deep/x.txt; rm src/deep/er/y.txt
        cat dl/new.txt dl/x.txt; test ! -e dl/er/y.txt; ls dl dl/er; stat -c %s dl/x.txt src/deep/x.txt
        cat dl/../a.c; cat src/deep/../../README; test -d dl/er && test -f src/a.c
        ls -la src | wc -l; cd dl && cat new.txt && cd er && ls && cd ../.. && pwd
    """), tree=tree)


def test_a_run_that_writes_nothing_makes_no_branch(tmp_path):
    from sandlock_core import BranchAction
    wd, st = make_tree(tmp_path / "wd"), tmp_path / "st"
    st.mkdir(mode=0o700)
    sb = Sandbox(Policy(workdir=str(wd), cwd=str(wd), fs_storage=str(st)))
    r = sb.run(["sh", "-c", f"cat README src/a.c >/dev/null && ls -R >/dev/null && ls -A {st}"])
    assert r.exit_code == 0 and r.stdout == b"" and os.listdir(st) == []  # nothing made, during the run or after
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd), fs_storage=str(st), on_exit=BranchAction.KEEP)).run(["true"])
    assert os.path.isdir(r.cow_upper) and os.listdir(r.cow_upper) == []  # a kept branch is always there
