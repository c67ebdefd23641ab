"""The seccomp copy-on-write layer attacked by a confined child: planted commit journals, the commit lock
directory of another user, exec/fchmod of files outside the workdir, fs_denied inside the workdir, and the
metadata guard meeting COW's own upper files."""
from __future__ import annotations

import datetime
import hashlib
import os
import tempfile

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.errors import PolicyError

from support import run_as_nobody
from .helpers import SYSTEM_RO, py

RO = SYSTEM_RO + [p for p in ("/proc", "/dev") if os.path.exists(p)]


def _shared_dir(prefix: str) -> str:
    """A directory uid 65534 can use too (pytest's tmp_path is under a 0700 directory)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


# ---------------------------------------------------------------- planted commit journals
PLANTER = r'''
import hashlib, json, os, sys
wd, storage, victim = sys.argv[1:]
key = hashlib.sha256(os.fsencode(wd)).hexdigest()[:32]
def plant(pointer, root):
    os.makedirs(root + "/upper", exist_ok=True)
    os.chmod(root, 0o700)
    open(root + "/upper/PLANTED.txt", "w").write("planted\n")
    open(root + "/commit.json", "w").write(json.dumps({"workdir": wd, "upper": root + "/upper"}))
    open(root + "/deleted.txt", "w").write(f"D {victim}\nD ../../{os.path.basename(os.path.dirname(victim))}\n"
                                           "D link/precious\nO /\n")
    os.makedirs(os.path.dirname(pointer), exist_ok=True)
    open(pointer, "w").write(root)
uid = os.geteuid()
# the old place (next to the locks; another user's directory when run unprivileged), the per-user lock
# directory, and the storage itself (which must work: the policy lets the child write it)
for pointer, root in ((f"/tmp/sandlock-commit-locks/{key}.{uid}.journal", "aa"),
                      (f"/tmp/sandlock-commit-locks-{uid}/{key}.{uid}.journal", "bb")):
    try:
        plant(pointer, storage + "/branch-00000000000000" + root)
    except OSError as e:
        print("not planted", pointer, e.errno)
plant(f"{storage}/journal-{key}", storage + "/branch-00000000000000cc")
print("planted")
'''


def test_a_journal_planted_by_the_child_never_deletes_outside_the_workdir():
    base = _shared_dir("sl-jplant-")
    victim_dir = os.path.join(base, "victim")
    victim = os.path.join(victim_dir, "precious")
    os.makedirs(victim)
    open(os.path.join(victim, "data.txt"), "w").write("precious\n")
    wd, storage = os.path.join(base, "wd"), os.path.join(base, "st")
    os.mkdir(wd)
    os.symlink(victim_dir, os.path.join(wd, "link"))  # "D link/precious" must not follow it
    # /tmp writable: the child reaches the lock directories and (here) the storage; the workdir too, so the
    # policy is allowed, and a roll forward may change the workdir but nothing else
    pol = Policy(workdir=wd, cwd=wd, fs_storage=storage, fs_readable=RO, fs_writable=["/tmp", base])
    r = Sandbox(pol).dry_run(py(PLANTER, os.path.realpath(wd), os.path.realpath(storage), victim))
    assert r.exit_code == 0 and b"planted" in r.stdout, r.stderr
    r = Sandbox(Policy(workdir=wd, cwd=wd, fs_storage=storage, fs_readable=RO)).dry_run(["/bin/true"])
    assert r.exit_code == 0
    assert open(os.path.join(victim, "data.txt")).read() == "precious\n"
    assert os.path.islink(os.path.join(wd, "link"))
    # a well-formed journal whose whiteout goes through a workdir symlink: rolled forward, but only in the
    # workdir (the deletion does not follow the link)
    import json
    from sandlock_core.cow_commit import pointer_path, recover
    st = os.path.realpath(storage)
    root = os.path.join(st, "branch-00000000000000dd")
    os.makedirs(os.path.join(root, "upper"))
    os.chmod(root, 0o700)
    open(os.path.join(root, "upper", "new.txt"), "w").write("new\n")
    open(os.path.join(root, "commit.json"), "w").write(
        json.dumps({"workdir": os.path.realpath(wd), "upper": os.path.join(root, "upper")}))
    open(os.path.join(root, "deleted.txt"), "w").write("D link/precious\n")
    open(pointer_path(wd, st), "w").write(root)
    assert recover(wd, st) is True
    assert open(os.path.join(wd, "new.txt")).read() == "new\n"
    assert open(os.path.join(victim, "data.txt")).read() == "precious\n"


def test_storage_writable_while_the_workdir_is_not_is_a_policy_error(tmp_path):
    wd, st = tmp_path / "wd", tmp_path / "scratch" / "st"
    wd.mkdir()
    (tmp_path / "scratch").mkdir()
    with pytest.raises(PolicyError, match="fs_writable.*copy-on-write storage"):
        Sandbox(Policy(workdir=str(wd), fs_storage=str(st), fs_readable=RO + [str(wd)],
                       fs_writable=[str(tmp_path / "scratch")])).run(["/bin/true"])
    r = Sandbox(Policy(workdir=str(wd), fs_storage=str(tmp_path / "st"), fs_readable=RO + [str(wd)],
                       fs_writable=[str(tmp_path / "scratch")])).run(["/bin/true"])
    assert r.exit_code == 0


# ---------------------------------------------------------------- the commit lock directory
def test_commit_after_another_user_made_a_lock_directory_works_as_nobody():
    wd = _shared_dir("sl-lock-root-")
    r = Sandbox(Policy(workdir=wd, cwd=wd)).run(["/bin/sh", "-c", "echo root > r.txt"])  # root's lock dir
    assert r.exit_code == 0 and os.path.exists(os.path.join(wd, "r.txt"))
    nwd = _shared_dir("sl-lock-nobody-")
    os.chmod(nwd, 0o777)
    code = ("import sys\nfrom sandlock_core import Policy, Sandbox\n"
            "w = sys.argv[1]\n"
            "r = Sandbox(Policy(workdir=w, cwd=w)).run(['/bin/sh', '-c', 'echo hi > new.txt'])\n"
            "print('exit', r.exit_code)\n")
    p = run_as_nobody(code, nwd)
    assert p.returncode == 0 and "exit 0" in p.stdout, p.stderr
    assert open(os.path.join(nwd, "new.txt")).read() == "hi\n"


# ---------------------------------------------------------------- exec through an upper symlink
EXEC_LEAK_CHILD = r'''
import os, subprocess, sys
secret, = sys.argv[1:]
os.symlink(secret, "a_rather_long_link_name")
try:
    os.execv("a_rather_long_link_name", ["x"])
except OSError as e:
    print("exec errno", e.errno)
for fd in os.listdir("/proc/self/fd"):
    try:
        if "secret" in os.readlink(f"/proc/self/fd/{fd}"):
            print("LEAKED", os.pread(int(fd), 100, 0))
    except OSError:
        pass
os.symlink("/bin/true", "t")
print("true through an upper symlink:", subprocess.run(["./t"]).returncode)
'''
EXEC_LEAK_RUN = r'''
import os, sys, tempfile
from sandlock_core import Policy, Sandbox
child, denied, ro = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
base = tempfile.mkdtemp(prefix="sl-cowexec-")
wd = os.path.join(base, "wd"); os.mkdir(wd)
secret = os.path.join(base, "secret.txt")
open(secret, "w").write("TOP-SECRET\n"); os.chmod(secret, 0o600)
readable = ro + [wd] + ([base] if denied else [])
pol = Policy(workdir=wd, cwd=wd, fs_readable=readable, fs_denied=[secret] if denied else [])
r = Sandbox(pol).dry_run(["/usr/bin/python3", "-I", "-S", "-c", child, secret])
print(r.exit_code, r.stdout.decode(), r.stderr.decode()[-500:])
'''


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
@pytest.mark.parametrize("denied", [False, True], ids=["outside-fs_readable", "fs_denied"])
def test_exec_of_an_upper_symlink_to_a_file_the_child_may_not_read_leaks_no_fd(as_nobody, denied):
    args = [EXEC_LEAK_CHILD, "1" if denied else "0", *RO]
    if as_nobody:
        p = run_as_nobody(EXEC_LEAK_RUN, *args)
    else:
        import subprocess
        import sys
        p = subprocess.run([sys.executable, "-c", EXEC_LEAK_RUN, *args], capture_output=True, text=True,
                           timeout=60)
    assert p.returncode == 0, p.stderr
    assert "exec errno 13" in p.stdout and "LEAKED" not in p.stdout, p.stdout
    assert "true through an upper symlink: 0" in p.stdout, p.stdout


def _run_here_or_as_nobody(code: str, as_nobody: bool, *args: str):
    if as_nobody:
        return run_as_nobody(code, *args)
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- fd metadata outside the workdir
FCHMOD_RUN = r'''
import os, sys, tempfile
from sandlock_core import Policy, Sandbox
ro_trees = sys.argv[1:]
base = tempfile.mkdtemp(prefix="sl-cowmeta-")
wd = os.path.join(base, "wd"); os.mkdir(wd)
ro = os.path.join(base, "ro"); os.mkdir(ro)
host = os.path.join(ro, "host.txt"); open(host, "w").write("x"); os.chmod(host, 0o644)
open(os.path.join(wd, "mine.txt"), "w").write("x"); os.chmod(os.path.join(wd, "mine.txt"), 0o644)
child = """
import os, sys
for p, mode in ((sys.argv[1], 0o4777), ("mine.txt", 0o600)):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fchmod(fd, mode); print(os.path.basename(p), "fchmod ok", oct(os.stat(p).st_mode & 0o7777))
    except OSError as e:
        print(os.path.basename(p), "fchmod errno", e.errno)
"""
pol = Policy(workdir=wd, cwd=wd, fs_readable=ro_trees + [ro], fs_writable=[wd])
r = Sandbox(pol).dry_run(["/usr/bin/python3", "-I", "-S", "-c", child, host])
print(r.stdout.decode(), r.stderr.decode()[-300:], "host mode", oct(os.stat(host).st_mode & 0o7777),
      "workdir mode", oct(os.stat(os.path.join(wd, "mine.txt")).st_mode & 0o7777), "changes", r.changes)
'''


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
def test_fchmod_of_an_fd_outside_the_workdir_goes_to_the_metadata_guard(as_nobody):
    p = _run_here_or_as_nobody(FCHMOD_RUN, as_nobody, *RO)
    assert p.returncode == 0, p.stderr
    assert "host.txt fchmod errno 13" in p.stdout and "host mode 0o644" in p.stdout, p.stdout
    # inside the workdir the change goes to the upper (seen by the child, not by the host)
    assert "mine.txt fchmod ok 0o600" in p.stdout and "workdir mode 0o644" in p.stdout, p.stdout


# ---------------------------------------------------------------- fs_denied inside the workdir
FSDENY_RUN = r'''
import os, sys, tempfile
from sandlock_core import Policy, Sandbox
writable, ro_trees = sys.argv[1] == "1", sys.argv[2:]
base = tempfile.mkdtemp(prefix="sl-cowdeny-")
wd = os.path.join(base, "wd"); os.mkdir(wd)
secret = os.path.join(wd, "secret.txt"); open(secret, "w").write("TOP-SECRET\n")
os.mkdir(os.path.join(wd, "private")); open(os.path.join(wd, "private", "key"), "w").write("KEY\n")
open(os.path.join(wd, "ok.txt"), "w").write("fine\n")
child = """
import os
def attempt(label, fn):
    try:
        got = fn()
        print(label, "ALLOWED", got)
    except OSError as e:
        print(label, "errno", e.errno)
attempt("rdwr", lambda: os.pread(os.open("secret.txt", os.O_RDWR), 100, 0))
attempt("trunc", lambda: os.open("secret.txt", os.O_WRONLY | os.O_TRUNC))
attempt("rename", lambda: (os.rename("secret.txt", "moved.txt"), open("moved.txt").read()))
attempt("link", lambda: (os.link("secret.txt", "linked.txt"), open("linked.txt").read()))
attempt("chmod", lambda: os.chmod("secret.txt", 0o666))
attempt("unlink", lambda: os.unlink("secret.txt"))
attempt("dir-rename", lambda: (os.rename("private", "public"), open("public/key").read()))
attempt("create-in-dir", lambda: os.open("private/new", os.O_WRONLY | os.O_CREAT))
attempt("replace", lambda: os.rename("ok.txt", "secret.txt"))
with open("ok.txt", "a") as f:
    f.write("more\\n")
print("ok.txt:", open("ok.txt").read().replace("\\n", " "))
"""
kw = dict(fs_readable=ro_trees, fs_writable=[wd]) if writable else dict(fs_readable=ro_trees + [wd])
pol = Policy(workdir=wd, cwd=wd, fs_denied=[secret, os.path.join(wd, "private")], **kw)
r = Sandbox(pol).dry_run(["/usr/bin/python3", "-I", "-S", "-c", child])
print(r.stdout.decode(), r.stderr.decode()[-300:])
'''


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root", "nobody"])
@pytest.mark.parametrize("writable", [True, False], ids=["wd-writable", "wd-readable"])
def test_fs_denied_holds_inside_the_copy_on_write_workdir(as_nobody, writable):
    p = _run_here_or_as_nobody(FSDENY_RUN, as_nobody, "1" if writable else "0", *RO)
    assert p.returncode == 0, p.stderr
    for label in ("rdwr", "trunc", "rename", "link", "chmod", "unlink", "dir-rename", "create-in-dir", "replace"):
        assert f"{label} errno 13" in p.stdout, (label, p.stdout)
    assert "ALLOWED" not in p.stdout and "SECRET" not in p.stdout and "KEY" not in p.stdout, p.stdout
    assert "ok.txt: fine more" in p.stdout, p.stdout


# ---------------------------------------------------------------- the metadata guard and COW's own upper
@pytest.mark.parametrize("rules", ["wd-writable", "wd-readable", "no-rules"])
def test_times_and_xattrs_of_workdir_files_stay_in_the_upper_under_time_start(tmp_path, rules):
    from sandlock_core import BranchAction
    wd = tmp_path / "wd"
    wd.mkdir()
    f = wd / "f.txt"
    f.write_text("x\n")
    os.utime(f, (1000000000, 1000000000))
    kw = {"wd-writable": dict(fs_readable=RO, fs_writable=[str(wd)]),
          "wd-readable": dict(fs_readable=RO + [str(wd)]), "no-rules": {}}[rules]
    ts = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
    script = ("sed -i s/x/y/ f.txt && touch f.txt && ls -l --time-style=+%Y f.txt && "
              "/usr/bin/python3 -I -S -c \"import os, time; os.utime('f.txt'); "
              "print('utime', time.gmtime(os.stat('f.txt').st_mtime).tm_year)\"")
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd), time_start=ts, on_exit=BranchAction.ABORT, **kw)).run(
        ["/bin/sh", "-c", script])
    assert r.exit_code == 0 and r.stderr == b"", r.stderr
    assert b" 2001 f.txt" in r.stdout and b"utime 2001" in r.stdout, r.stdout
    assert r.denials == [], r.denials  # no "outside fs_writable" for the upper's own files
    assert f.read_text() == "x\n" and os.stat(f).st_mtime == 1000000000  # the host file never changed
