"""Copy-on-write: programs that exist only in the upper, run through short relative paths, symlinks and a
venv (``python -m venv`` + ``pip install`` of a local wheel), checked against bare runs and the host tree."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import zipfile

import pytest

from sandlock_core import Policy, Sandbox

from test_cow import ENV, PY, snapshot

RELATIVE = ("cp /bin/echo sub/prog && cd sub && ./prog a b && cd .. && sub/prog c && ./sub/prog d "
            "&& ln -s sub/prog lnk && ./lnk e && printf '#!/bin/sh\\necho script $0 $1\\n' > s && chmod +x s "
            "&& ./s f && cd sub && ../s g")


def test_upper_binaries_run_through_short_relative_paths(tmp_path):
    outs = []
    for mode in ("bare", "cow"):
        wd = tmp_path / mode
        (wd / "sub").mkdir(parents=True)
        if mode == "bare":
            r = subprocess.run(["sh", "-c", RELATIVE], cwd=wd, capture_output=True)
            outs.append((r.returncode, r.stdout))
            bare_tree = snapshot(wd)
        else:
            before = snapshot(wd)
            r = Sandbox(Policy(workdir=str(wd), cwd=str(wd))).dry_run(["sh", "-c", RELATIVE])
            outs.append((r.exit_code, r.stdout))
            assert snapshot(wd) == before
            assert sorted(c.path for c in r.changes) == sorted(set(bare_tree) - set(before))
    assert outs[0] == outs[1] == (0, b"a b\nc\nd\ne\nscript ./s f\nscript ../s g\n"), outs


def test_argv0_is_kept_when_a_shell_execs_an_upper_binary(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    script = f"cp {PY} ./py && ./py -c 'import sys; print(sys.argv[0], sys.orig_argv[0])'"
    r = Sandbox(Policy(workdir=str(wd), cwd=str(wd))).dry_run(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == b"-c ./py\n"


def _wheel(path):
    files = {"tinypkg/__init__.py": b"VALUE = 42\n",
             "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
             "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in files.items()]
    files["tinypkg-1.0.dist-info/RECORD"] = ("\n".join(record + ["tinypkg-1.0.dist-info/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path


def _venv_works(py) -> bool:
    r = subprocess.run([py, "-c", "import venv, ensurepip"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _venv_works(PY), reason="python3 without venv/ensurepip")
def test_venv_and_pip_install_of_a_local_wheel(tmp_path):
    whl = _wheel(tmp_path / "tinypkg-1.0-py3-none-any.whl")
    # bin/pip is a #! script whose interpreter (bin/python, a symlink) exists only in the upper
    script = (f"{PY} -m venv v && v/bin/pip install -q --no-index {whl} "
              "&& v/bin/python -c 'import sys, tinypkg; print(sys.prefix == sys.base_prefix, tinypkg.VALUE)'")
    bare, cow, dry = tmp_path / "bare", tmp_path / "cow", tmp_path / "dry"
    for d in (bare, cow, dry):
        d.mkdir()
        (d / "keep.txt").write_text("host file\n")
    env = {**os.environ, **ENV}
    env.pop("VIRTUAL_ENV", None)
    b = subprocess.run(["sh", "-c", script], cwd=bare, env=env, capture_output=True)
    assert b.returncode == 0 and b.stdout == b"False 42\n", b.stderr
    before = snapshot(dry)
    d = Sandbox(Policy(workdir=str(dry), cwd=str(dry), env=ENV)).dry_run(["sh", "-c", script], timeout=300)
    assert d.exit_code == 0 and d.stdout == b"False 42\n", d.stderr
    assert snapshot(dry) == before, "the dry run left the host tree as it was"
    r = Sandbox(Policy(workdir=str(cow), cwd=str(cow), env=ENV)).run(["sh", "-c", script], timeout=300)
    assert r.exit_code == 0 and r.stdout == b"False 42\n", r.stderr
    # byte-compiled caches and pip's RECORD hold paths and timestamps of each tree: compare everything else
    def comparable(root):
        return {p: v for p, v in snapshot(root).items()
                if "__pycache__" not in p and not p.endswith(("RECORD", "pyvenv.cfg")) and "/bin/" not in p}
    assert comparable(cow) == {k.replace(str(bare), str(cow)): v for k, v in comparable(bare).items()}
    assert (cow / "v" / "bin" / "python").is_symlink()
    assert {c.path for c in d.changes} >= {"v/pyvenv.cfg", "v/bin/python", "v/lib/python3.11/site-packages/tinypkg"
                                           "/__init__.py".replace("python3.11", _pyver())}
    # the committed venv works on the host, outside any sandbox
    out = subprocess.run([str(cow / "v" / "bin" / "python"), "-c", "import tinypkg; print(tinypkg.VALUE)"],
                         capture_output=True)
    assert out.stdout == b"42\n"


def _pyver() -> str:
    out = subprocess.run([PY, "-c", "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_script_whose_interpreter_exists_only_in_the_upper_runs_as_the_kernel_would(tmp_path):
    """The kernel looks #! interpreters up itself (in the lower, where this one is not): the supervisor relays
    the exec through a /bin/sh trampoline with the argv the kernel would have built."""
    outs = []
    for mode in ("bare", "cow"):
        wd = tmp_path / mode
        wd.mkdir()
        script = (f"ln -s {PY} {wd}/py && printf '#!{wd}/py -S\\nimport sys; print(sys.argv[1:], sys.flags.no_site)\\n'"
                  f" > {wd}/s && chmod +x {wd}/s && {wd}/s a 'b c' && cd {wd} && ./s d")
        if mode == "bare":
            r = subprocess.run(["sh", "-c", script], capture_output=True)
            outs.append((r.returncode, r.stdout.replace(os.fsencode(wd), b"WD")))
        else:
            d = Sandbox(Policy(workdir=str(wd), cwd=str(wd))).dry_run(["sh", "-c", script])
            outs.append((d.exit_code, d.stdout.replace(os.fsencode(wd), b"WD")))
            assert sorted(c.path for c in d.changes) == ["py", "s"] and not (wd / "s").exists()
    assert outs[0] == outs[1] == (0, b"['a', 'b c'] 1\n['d'] 1\n"), outs


LANDLOCKED = r"""
import os, sys, tempfile
from sandlock_core import Policy, Sandbox
base = tempfile.mkdtemp()
os.chmod(base, 0o755)
wd = os.path.join(base, "wd")
os.makedirs(wd + "/sub")
ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
script = ("cp /bin/echo sub/p && cd sub && ./p relative && cd .. && %s/sub/p absolute "
          "&& printf '#!/bin/sh\\necho script\\n' > s && chmod +x s && ./s && cat /bin/echo > e && chmod +x e; "
          "./e; echo rc=$?" % wd)
r = Sandbox(Policy(workdir=wd, cwd=wd, fs_readable=ro)).dry_run(["sh", "-c", script])
print(repr(r.stdout), r.exit_code)
assert os.listdir(wd + "/sub") == []
"""


def _check_landlocked(out: str):
    assert out.splitlines()[0] == repr(b"relative\nabsolute\nscript\n\nrc=0\n") + " 0", out


def test_upper_binaries_run_under_a_landlock_filesystem_policy():
    """No Landlock rule covers the branch storage: the supervisor hands the child a sealed copy to run."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", LANDLOCKED], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    _check_landlocked(r.stdout)


def test_upper_binaries_run_under_a_landlock_filesystem_policy_unprivileged():
    from support import run_as_nobody
    r = run_as_nobody(LANDLOCKED, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_landlocked(r.stdout)
