"""chroot and privileged: the sandbox sees a directory as ``/`` (chroot(2) in its own user + mount namespace),
optionally as uid 0 there; with fs_isolation=overlayfs the root is a throwaway copy-on-write view."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sandlock_core import Policy, PolicyError, Sandbox
from sandlock_core.policy import BranchAction, FsIsolation

from support import run_as_nobody, userns_unavailable

PROGS = ("sh", "id", "ls", "cat", "touch", "stat", "rm", "mkdir", "chroot")
FIND = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # chroot(8) lives in sbin, often off a user's PATH


def _userns_works() -> str | None:
    why = userns_unavailable()
    if why is not None:
        return why
    if shutil.which("ldd", path=FIND) is None or any(shutil.which(p, path=FIND) is None for p in PROGS):
        return "ldd and " + ", ".join(PROGS) + " are needed to build a small root"
    return None


pytestmark = pytest.mark.skipif(_userns_works() is not None, reason=str(_userns_works()))

# Builds a root holding PROGS and the libraries ldd names (shared with the uid 65534 runs, which exec it).
MAKE_ROOT = textwrap.dedent('''
    import os, shutil, subprocess
    def make_root(root, progs):
        for prog in progs:
            src = os.path.realpath(shutil.which(prog, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"))
            files = [src] + [w for line in subprocess.run(["/usr/bin/env", "PATH=/usr/bin:/bin", "ldd", src],
                                                          capture_output=True, text=True).stdout.splitlines()
                             for w in line.split() if w.startswith("/")]
            for f in files:
                dst = root + f
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if not os.path.exists(dst):
                    shutil.copy2(os.path.realpath(f), dst)
            os.makedirs(root + "/bin", exist_ok=True)
            if not os.path.exists(root + "/bin/" + prog):
                shutil.copy2(src, root + "/bin/" + prog)
        os.makedirs(root + "/etc", exist_ok=True)
        os.makedirs(root + "/tmp", exist_ok=True)
        with open(root + "/etc/marker", "w") as f:
            f.write("inside\\n")
        for d, _, _ in os.walk(root):
            os.chmod(d, 0o755)
        return root
''')
_defs: dict = {}
exec(MAKE_ROOT, _defs)
make_root = _defs["make_root"]


@pytest.fixture
def root(tmp_path):
    return make_root(str(tmp_path / "root"), PROGS)


def run(policy, script, **kw):
    return Sandbox(policy).run(["/bin/sh", "-c", script], **kw)


def test_the_sandbox_sees_only_the_new_root(root, tmp_path):
    host = tmp_path / "host-only"
    host.write_text("host\n")
    r = run(Policy(chroot=root, fs_readable=[root]),
            f"ls /; cat /etc/marker; pwd; cat {host}; cat /etc/hostname")
    out = r.stdout.decode().splitlines()
    assert sorted(out[:-2]) == sorted(os.listdir(root))
    assert out[-2:] == ["inside", "/"]
    err = r.stderr.decode()
    assert f"cat: {host}: No such file or directory" in err   # a host path outside the root: ENOENT
    assert "cat: /etc/hostname: No such file or directory" in err


def test_landlock_paths_are_host_paths(root):
    """fs_readable names the caller's files: granting <root>/bin and the libraries but not <root>/etc refuses
    /etc inside the chroot."""
    libs = [os.path.join(root, d) for d in ("bin", "lib", "lib64", "usr") if os.path.exists(os.path.join(root, d))]
    r = run(Policy(chroot=root, fs_readable=libs), "cat /bin/../etc/marker; ls /bin > /dev/null && echo bin-ok")
    assert r.stderr.decode().startswith("cat: /bin/../etc/marker: Permission denied")
    r = run(Policy(chroot=root, fs_readable=[*libs, os.path.join(root, "etc")]), "cat /etc/marker")
    assert r.stdout == b"inside\n", r.stderr


def test_cwd_is_a_path_inside_the_root(root):
    r = run(Policy(chroot=root, fs_readable=[root], cwd="/etc"), "pwd; cat marker")
    assert r.stdout == b"/etc\ninside\n", r.stderr


def test_privileged_is_uid_0_inside_and_the_real_uid_outside(root):
    r = run(Policy(chroot=root, fs_readable=[root], fs_writable=[os.path.join(root, "tmp")], privileged=True),
            "id -u; id -g; touch /tmp/made; stat -c %u /tmp/made")
    assert r.stdout == b"0\n0\n0\n", r.stderr
    assert os.stat(os.path.join(root, "tmp", "made")).st_uid == os.getuid()
    r = run(Policy(chroot=root, fs_readable=[root]), "id -u")
    assert r.stdout == f"{os.getuid()}\n".encode()


def test_no_way_back_out_of_the_chroot(root):
    """uid 0 inside holds CAP_SYS_CHROOT there: chroot(2) itself is refused, so the classic escape is shut."""
    r = run(Policy(chroot=root, fs_readable=[root], privileged=True), "chroot / /bin/id -u")
    assert r.exit_code == 125
    assert r.stderr.decode().startswith("chroot: cannot change root directory to '/': Operation not permitted")


def test_throwaway_root_with_overlay(root):
    pol = dict(chroot=root, workdir=root, fs_readable=[root], fs_isolation=FsIsolation.OVERLAYFS, privileged=True)
    before = sorted(os.listdir(root))
    d = Sandbox(Policy(**pol)).dry_run(["/bin/sh", "-c", "echo n > /new; rm /etc/marker; rm -rf /tmp; ls /"])
    assert d.exit_code == 0, d.stderr
    assert sorted(d.stdout.decode().split()) == sorted([n for n in before if n != "tmp"] + ["new"])
    assert [(c.kind, c.path) for c in d.changes] == [("D", "etc/marker"), ("A", "new"), ("D", "tmp")]
    assert sorted(os.listdir(root)) == before and os.path.exists(os.path.join(root, "etc", "marker"))
    r = Sandbox(Policy(**pol, on_exit=BranchAction.COMMIT)).run(["/bin/sh", "-c", "echo n > /new"])
    assert r.exit_code == 0, r.stderr
    with open(os.path.join(root, "new")) as f:
        assert f.read() == "n\n"


def test_bad_chroot_and_combinations_are_refused(root, tmp_path):
    with pytest.raises(PolicyError, match="chroot: .* is not a directory"):
        Sandbox(Policy(chroot=str(tmp_path / "missing"))).run(["/bin/true"])
    with pytest.raises(PolicyError, match="needs fs_isolation='overlayfs'"):
        Sandbox(Policy(chroot=root, workdir=root)).run(["/bin/true"])
    with pytest.raises(PolicyError, match="fs_denied"):
        Sandbox(Policy(chroot=root, fs_readable=[root], fs_denied=[os.path.join(root, "etc")])).run(["/bin/true"])


def test_confine_refuses_namespaces(root):
    from sandlock_core import confine
    with pytest.raises(PolicyError, match="confine\\(\\): chroot/privileged"):
        confine(Policy(chroot=root))  # refused before anything is applied to this process


def test_cli_chroot_privileged(root):
    r = subprocess.run([sys.executable, "-m", "sandlock_core.cli", "run", "--chroot", root, "--privileged", "-r", root,
                        "--", "/bin/sh", "-c", "id -u; cat /etc/marker"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0\ninside\n"


NOBODY_CODE = MAKE_ROOT + textwrap.dedent('''
    import json, tempfile
    from sandlock_core import Policy, Sandbox
    from sandlock_core.policy import FsIsolation
    base = tempfile.mkdtemp()
    root = make_root(base + "/root", %r)
    res = {}
    for priv in (False, True):
        r = Sandbox(Policy(chroot=root, fs_readable=[root], fs_writable=[root + "/tmp"], privileged=priv)).run(
            ["/bin/sh", "-c", "id -u; ls /; touch /tmp/m%%d; cat %%s/root/etc/marker" %% (priv, base)])
        res[str(priv)] = [r.exit_code, r.stdout.decode().split(), r.stderr.decode(),
                          os.stat(root + "/tmp/m%%d" %% priv).st_uid]
    d = Sandbox(Policy(chroot=root, workdir=root, fs_readable=[root], fs_isolation=FsIsolation.OVERLAYFS)).dry_run(
        ["/bin/sh", "-c", "rm -rf /etc; echo x > /x"])
    res["dry"] = [d.exit_code, [[c.kind, c.path] for c in d.changes], os.path.exists(root + "/etc/marker")]
    res["me"] = os.getuid()
    res["base"] = base
    print(json.dumps(res))
''') % (PROGS,)


def test_as_nobody():
    r = run_as_nobody(NOBODY_CODE, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["me"] == 65534
    for priv, uid in (("False", "65534"), ("True", "0")):
        code, out, err, owner = res[priv]
        assert out[0] == uid and "etc" in out and owner == 65534, (out, err)
        assert f"cat: {res['base']}/root/etc/marker: No such file or directory" in err  # host path: not there
    assert res["dry"] == [0, [["D", "etc"], ["D", "etc/marker"], ["A", "x"]], True]


def test_privileged_with_the_seccomp_copy_on_write(tmp_path):
    """Without chroot the paths are the caller's: the supervisor's COW works for a uid-0-inside sandbox."""
    w = tmp_path / "w"
    (w / "d").mkdir(parents=True)
    (w / "a").write_text("a\n")
    ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
    d = Sandbox(Policy(fs_readable=ro, workdir=str(w), cwd=str(w), privileged=True)).dry_run(
        ["sh", "-c", "id -u; echo b > b; echo aa >> a; rm -r d; chmod 600 a"])
    assert d.stdout == b"0\n", d.stderr
    assert [(c.kind, c.path) for c in d.changes] == [("M", "a"), ("A", "b"), ("D", "d")]
    assert (w / "a").read_text() == "a\n" and (w / "d").is_dir()


def test_whole_filesystem_writable_stays_writable(tmp_path):
    """fs_writable=["/"]: no read-only view at all (a mount moved onto "/" would not be seen)."""
    r = Sandbox(Policy(fs_writable=["/"], privileged=True)).run(
        ["sh", "-c", f"echo x > {tmp_path}/f; chmod 600 {tmp_path}/f"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "f").read_text() == "x\n"
