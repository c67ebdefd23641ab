"""fs_isolation=OVERLAYFS: real programs under a kernel overlay in a user + mount namespace, compared with bare
runs file by file; abort, keep, dry run; Landlock and the read-only view; the same as uid 65534."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from sandlock_core import Policy, PolicyError, Sandbox
from sandlock_core.policy import BranchAction, FsIsolation

from support import GIT_ENV, GIT_INDEX, expected_changes, make_tree, run_as_nobody, userns_unavailable
from support import tree_snapshot as snapshot

SYSTEM_RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
OVERLAY = FsIsolation.OVERLAYFS
ENV = GIT_ENV


def _userns_overlay_works() -> str | None:
    """None when an unprivileged user namespace may mount an overlay here, else why not."""
    why = userns_unavailable()
    if why is not None:
        return why
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "no overlay filesystem in this kernel"
    return None


pytestmark = pytest.mark.skipif(_userns_overlay_works() is not None, reason=str(_userns_overlay_works()))


def overlay_policy(workdir, **kw) -> Policy:
    kw.setdefault("fs_readable", SYSTEM_RO)
    return Policy(workdir=str(workdir), cwd=str(workdir), env=ENV, fs_isolation=OVERLAY, **kw)


def compare_run(tmp_path, script: str, tree=make_tree, **kw):
    """``sh -c script`` bare in one copy, under the overlay with commit in another, dry-run in a third."""
    orig = tree(tmp_path / "orig")
    bare, ovl, dry = tmp_path / "bare", tmp_path / "ovl", tmp_path / "dry"
    for d in (bare, ovl, dry):
        shutil.copytree(orig, d, symlinks=True)
    b = subprocess.run(["sh", "-c", script], cwd=bare, env={**os.environ, **ENV}, capture_output=True)
    assert b.returncode == 0, b.stderr
    before, after = snapshot(orig), snapshot(bare)
    r = Sandbox(overlay_policy(ovl, **kw)).run(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    assert snapshot(ovl) == after, f"commit must leave the same tree as a bare run: {r.stderr!r}"
    d = Sandbox(overlay_policy(dry, **kw)).dry_run(["sh", "-c", script])
    assert d.exit_code == 0, d.stderr
    assert snapshot(dry) == before, "a dry run leaves the tree untouched"
    assert [(c.kind, c.path) for c in d.changes if c.path != GIT_INDEX] == [
        c for c in expected_changes(before, after) if c[1] != GIT_INDEX]
    return d


def test_sed_in_place(tmp_path):
    d = compare_run(tmp_path, "sed -i s/hello/bye/ README && grep bye README && sed -i s/x/x/ src/deep/x.txt")
    assert [(c.kind, c.path) for c in d.changes] == [("M", "README")]  # identical bytes rewritten: no change


def test_mv_directory(tmp_path):
    # OverlayFS in a user namespace has no redirect_dir: rename(2) of a lower directory is EXDEV, mv copies
    compare_run(tmp_path, "mv src/deep moved && cat moved/er/y.txt && test ! -e src/deep")


def test_rm_rf_subtree_and_recreate(tmp_path):
    d = compare_run(tmp_path, "rm -rf src && test ! -e src && mkdir src && echo n > src/new")
    assert ("D", "src/a.c") in [(c.kind, c.path) for c in d.changes]  # opaque directory: the old content goes


def test_write_then_delete_is_no_change(tmp_path):
    d = compare_run(tmp_path, "echo tmp > t.tmp && rm t.tmp && mkdir tdir && rmdir tdir")
    assert d.changes == []


def test_mixed_operations(tmp_path):
    compare_run(tmp_path, textwrap.dedent("""
        set -e
        echo new > src/new.txt; mkdir -p a/b/c; echo z > a/b/c/z
        chmod 600 README; ln -s src/a.c alink; ln src/a.c hard; cp -r src copy
        rm link; touch README; truncate -s 1 src/deep/x.txt; mv tool.sh src/tool2.sh; ./src/tool2.sh
        cd a/b && echo here > here.txt && cd ../.. && cat a/b/here.txt
    """))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_init_add_commit(tmp_path):
    d = compare_run(tmp_path, "git init -q . && git add -A && git commit -qm first && git log --oneline | wc -l",
                    fs_writable=["/dev/null"], fs_readable=[*SYSTEM_RO, "/dev/urandom"])  # git needs both
    assert any(c.path.startswith(".git/objects/") for c in d.changes)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None, reason="make/cc missing")
def test_make_c_project(tmp_path):
    def project(root):
        root.mkdir()
        (root / "main.c").write_text('#include <stdio.h>\nint a(void);\nint main(void){printf("%d\\n",a());}\n')
        (root / "a.c").write_text("int a(void) { return 42; }\n")
        (root / "Makefile").write_text("prog: main.o a.o\n\tcc -o prog main.o a.o\n%.o: %.c\n\tcc -c -o $@ $<\n")
        return root
    d = compare_run(tmp_path, "make -s && ./prog | grep -x 42", tree=project,
                    fs_writable=["/dev/null", "/tmp"])  # cc's temporary files
    assert sorted(c.path for c in d.changes) == ["a.o", "main.o", "prog"]


def test_abort_on_exit_and_on_error_leave_the_tree(tmp_path):
    w = make_tree(tmp_path / "w")
    before = snapshot(w)
    r = Sandbox(overlay_policy(w, on_exit=BranchAction.ABORT)).run(["sh", "-c", "rm -rf src; echo x > README"])
    assert r.exit_code == 0, r.stderr
    assert snapshot(w) == before
    r = Sandbox(overlay_policy(w)).run(["sh", "-c", "rm -rf src; echo x > new; exit 3"])  # on_error: abort
    assert r.exit_code == 3
    assert snapshot(w) == before


def test_keep_leaves_plain_content_and_manifest(tmp_path):
    w = make_tree(tmp_path / "w")
    before = snapshot(w)
    r = Sandbox(overlay_policy(w, on_exit=BranchAction.KEEP, fs_storage=str(tmp_path / "st"))).run(
        ["sh", "-c", "rm README; echo n > new"])
    assert r.exit_code == 0, r.stderr
    assert snapshot(w) == before
    upper = r.cow_upper
    assert sorted(os.listdir(upper)) == ["new"]  # the whiteout device was translated, not kept
    with open(os.path.join(os.path.dirname(upper), "deleted.txt")) as f:
        assert f.read() == "D README\n"


def test_the_sandbox_sees_the_overlay_and_writes_only_there(tmp_path):
    """Landlock: the workdir's grant covers the mounted tree; other trees stay as the policy says."""
    w = make_tree(tmp_path / "w")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "f").write_text("f\n")
    os.chmod(ro / "f", 0o644)
    script = textwrap.dedent(f"""
        cat {w}/README && echo read-ok
        echo z > {w}/z && echo write-ok
        cat {outside}/secret 2>&1 || true
        cat {ro}/f
        chmod 600 {ro}/f 2>&1 || true
        echo x > {ro}/g 2>&1 || true
    """)
    r = Sandbox(overlay_policy(w, fs_readable=[*SYSTEM_RO, str(ro)])).dry_run(["sh", "-c", script])
    out = r.stdout.decode() + r.stderr.decode()
    assert "read-ok" in out and "write-ok" in out
    assert f"cat: {outside}/secret: Permission denied" in out          # Landlock: not in any rule
    assert "f\n" in r.stdout.decode()                                     # readable tree
    assert f"chmod: changing permissions of '{ro}/f': Read-only file system" in out  # the read-only view
    assert stat.S_IMODE(os.stat(ro / "f").st_mode) == 0o644
    assert not (ro / "g").exists()
    assert [(c.kind, c.path) for c in r.changes] == [("A", "z")]


def test_fs_writable_outside_the_workdir_stays_writable(tmp_path):
    w = make_tree(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    r = Sandbox(overlay_policy(w, fs_writable=[str(out)])).dry_run(
        ["sh", "-c", f"echo o > {out}/o && chmod 600 {out}/o"])
    assert r.exit_code == 0, r.stderr
    assert (out / "o").read_text() == "o\n" and stat.S_IMODE(os.stat(out / "o").st_mode) == 0o600
    assert r.changes == []


def test_fs_writable_given_as_a_symlink(tmp_path):
    w = make_tree(tmp_path / "w")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    r = Sandbox(overlay_policy(w, fs_writable=[str(tmp_path / "link")])).run(
        ["sh", "-c", f"echo x > {tmp_path}/link/f"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "real" / "f").read_text() == "x\n"


def test_inherited_cwd_inside_the_workdir_sees_the_overlay(tmp_path):
    w = make_tree(tmp_path / "w")
    pol = Policy(fs_readable=SYSTEM_RO, workdir=str(w), fs_isolation=OVERLAY)
    old = os.getcwd()
    os.chdir(w / "src")
    try:
        d = Sandbox(pol).dry_run(["sh", "-c", "echo n > here && pwd"])
    finally:
        os.chdir(old)
    assert d.exit_code == 0, d.stderr
    assert d.stdout.decode().strip() == str(w / "src")
    assert [(c.kind, c.path) for c in d.changes] == [("A", "src/here")]
    assert not (w / "src" / "here").exists()


def test_mount_syscalls_refused_inside(tmp_path):
    """Landlock and the filter forbid undoing the overlay or the read-only view, even as uid 0 inside."""
    w = make_tree(tmp_path / "w")
    code = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        for name, args in (("umount2", ({str(w).encode()!r}, 2)), ("chroot", (b"/",)), ("unshare", (0x20000,))):
            r = getattr(libc, name)(*args)
            print(name, r, os.strerror(ctypes.get_errno()))
    """)
    r = Sandbox(overlay_policy(w, privileged=True)).dry_run(["/usr/bin/python3", "-c", code])
    assert r.stdout.decode().splitlines() == ["umount2 -1 Operation not permitted", "chroot -1 Operation not permitted",
                                              "unshare -1 Operation not permitted"], r.stderr


@pytest.mark.parametrize("kw, field", [
    (dict(fs_denied=["/etc/shadow"]), "fs_denied"),
    (dict(max_disk="1M"), "max_disk"),
])
def test_refused_combinations(tmp_path, kw, field):
    with pytest.raises(PolicyError, match=field):
        Sandbox(overlay_policy(tmp_path, **kw)).run(["true"])


def test_policy_fn_refused(tmp_path):
    with pytest.raises(PolicyError, match="policy_fn"):
        Sandbox(overlay_policy(tmp_path), policy_fn=lambda event, ctx: None).run(["true"])


def test_nested_sandbox_gets_a_clear_error_not_a_hang(tmp_path):
    """Inside a sandbox the default blocklist refuses unshare: the inner overlay run fails at that step."""
    inner = textwrap.dedent(f"""
        from sandlock_core import Sandbox, Policy
        from sandlock_core.policy import FsIsolation
        r = Sandbox(Policy(workdir={str(tmp_path)!r}, fs_isolation=FsIsolation.OVERLAYFS)).run(["/bin/true"])
        print(r.exit_code, r.reason.name)
        print(r.error)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = Sandbox(Policy(env={"PYTHONPATH": root})).run([sys.executable, "-c", inner], timeout=60)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "127 SETUP_FAILED", r.stderr
    assert lines[1].startswith("sandlock: namespaces: unshare(CLONE_NEWUSER|CLONE_NEWNS): Operation not permitted "
                               "(user namespaces are refused here")


def test_nested_in_a_landlock_sandbox_that_allows_unshare(tmp_path):
    """An outer sandbox without the blocklist still has Landlock, which forbids mounts: a clear error too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inner = textwrap.dedent(f"""
        from sandlock_core import Sandbox, Policy
        from sandlock_core.policy import FsIsolation
        r = Sandbox(Policy(workdir={str(tmp_path)!r}, fs_isolation=FsIsolation.OVERLAYFS)).run(["/bin/true"])
        print(r.exit_code, r.error)
    """)
    readable = [*SYSTEM_RO, root, os.path.dirname(os.path.realpath(sys.executable)), sys.prefix, "/dev"]
    readable += [p for p in sys.path if p.startswith("/") and os.path.isdir(p)]
    outer = Policy(fs_readable=readable, fs_writable=[str(tmp_path), "/proc", "/dev/null", "/tmp"],
                   deny_syscalls=[], env={"PYTHONPATH": root})
    r = Sandbox(outer).run([sys.executable, "-c", inner], timeout=60)
    assert r.stdout.decode().startswith("127 sandlock: namespaces: make mounts private: Operation not permitted "
                                        "(mounts are refused: this process runs inside a Landlock sandbox"), r.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_works_from_inside_a_user_namespace(tmp_path):
    """A caller that already runs in a user namespace gets a nested one: the overlay works the same."""
    w = make_tree(tmp_path / "w")
    code = textwrap.dedent(f"""
        from sandlock_core import Sandbox, Policy
        from sandlock_core.policy import FsIsolation
        d = Sandbox(Policy(fs_readable={SYSTEM_RO!r}, workdir={str(w)!r}, cwd={str(w)!r},
                           fs_isolation=FsIsolation.OVERLAYFS, fs_storage={str(tmp_path / "st")!r})
                   ).dry_run(["sh", "-c", "rm README; id -u"])
        print(d.exit_code, d.stdout.decode().strip(), [(c.kind, c.path) for c in d.changes])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert r.stdout == "0 0 [('D', 'README')]\n", r.stderr
    assert (w / "README").exists()


NOBODY_CODE = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    from sandlock_core import Policy, Sandbox
    from sandlock_core.policy import BranchAction, FsIsolation
    base = tempfile.mkdtemp()
    w = os.path.join(base, "w")
    os.makedirs(w + "/src/deep")
    for rel, text in (("README", "hello\\n"), ("src/a.c", "a\\n"), ("src/deep/x", "x\\n")):
        with open(os.path.join(w, rel), "w") as f:
            f.write(text)
    out = os.path.join(base, "out")
    os.mkdir(out)
    ro = ["/usr", "/lib", "/lib64", "/bin", "/etc"]
    script = ("sed -i s/hello/bye/ README && rm -rf src/deep && mv src/a.c b.c && echo n > new && id -u && "
              "touch " + out + "/made")
    res = {}
    for priv in (False, True):
        pol = Policy(fs_readable=[p for p in ro if os.path.exists(p)], fs_writable=[out], workdir=w, cwd=w,
                     fs_isolation=FsIsolation.OVERLAYFS, privileged=priv)
        d = Sandbox(pol).dry_run(["sh", "-c", script])
        res[str(priv)] = [d.exit_code, d.stdout.decode(), d.stderr.decode(), [[c.kind, c.path] for c in d.changes]]
    pol = Policy(fs_readable=[p for p in ro if os.path.exists(p)], workdir=w, cwd=w, fs_isolation=FsIsolation.OVERLAYFS,
                 on_exit=BranchAction.ABORT)
    a = Sandbox(pol).run(["sh", "-c", "rm -rf src README"])
    res["abort"] = [a.exit_code, sorted(os.listdir(w)), open(w + "/README").read()]
    res["owner"] = os.stat(out + "/made").st_uid
    res["me"] = os.getuid()
    print(json.dumps(res))
""")


def test_as_nobody_dry_run_abort_and_privileged_mapping():
    r = run_as_nobody(NOBODY_CODE, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    changes = [["M", "README"], ["A", "b.c"], ["A", "new"], ["D", "src/a.c"], ["D", "src/deep"], ["D", "src/deep/x"]]
    for priv, uid in (("False", "65534"), ("True", "0")):
        code, out, err, got = res[priv]
        assert code == 0, err
        assert out == uid + "\n"  # privileged: uid 0 inside
        assert got == changes
    assert res["abort"] == [0, ["README", "src"], "hello\n"]
    assert res["me"] == 65534 and res["owner"] == 65534  # a file made as "root" inside belongs to the real uid


def test_two_concurrent_sandboxes_see_only_their_own_writes(tmp_path):
    """Each run has its own upper: while both are running, neither sees the other's file."""
    import threading
    w = make_tree(tmp_path / "w")
    sync = tmp_path / "sync"
    sync.mkdir()
    pol = overlay_policy(w, fs_writable=[str(sync)], on_exit=BranchAction.ABORT)
    before = snapshot(w)

    def script(me, other):  # write, say so, wait until the other one wrote too, then look
        return (f"echo {me} > {me}.txt && touch {sync}/{me} && "
                f"while [ ! -e {sync}/{other} ]; do sleep 0.01; done; ls")
    results = {}

    def run(me, other):
        results[me] = Sandbox(pol).run(["sh", "-c", script(me, other)], timeout=60)
    threads = [threading.Thread(target=run, args=args) for args in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for me, other in (("a", "b"), ("b", "a")):
        listing = results[me].stdout.decode().split()
        assert f"{me}.txt" in listing and f"{other}.txt" not in listing, results[me].stderr
    assert snapshot(w) == before
