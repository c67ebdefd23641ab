"""`sandlock run` start-up stays lean (issue #2: within 25 ms of a bare exec): what it imports, as a set.

No timings here (they would flake on a busy machine): benchmarks/startup.py measures. These tests pin the
design that makes the time: the run path imports neither ``dataclasses`` (``_records`` writes the records'
methods, ``policy_spec.LeanPolicy`` carries the policy) nor ``argparse`` (``cli._fast_run_args``), nor any of
the heavy modules those used to pull in.
"""
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest

from sandlock_core._records import dataclass, field

RO = sum((["-r", p] for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.isdir(p)), [])
# What the console script does, then the names in sys.modules written to argv[1] (not -X importtime: it does
# not list modules loaded through importlib.import_module, as plan.py loads mechanisms).
SCRIPT = ("import sys\n"
          "from sandlock_core.cli import main\n"
          "code = main(sys.argv[2:])\n"
          "names = sorted(sys.modules)\n"
          "with open(sys.argv[1], 'w') as f:\n"
          "    f.write('\\n'.join(names))\n"
          "sys.exit(code)\n")
HEAVY = {"dataclasses", "argparse", "inspect", "datetime", "shutil", "re", "typing", "logging", "gettext",
         "locale", "copy", "difflib", "tomllib", "importlib", "warnings", "signal", "queue",
         "enum", "functools", "collections", "threading", "types", "struct", "sandlock_core.bpf",
         "sandlock_core.learn", "sandlock_core.policy", "sandlock_core.profile"}


def imported_by(*argv: str, tmp_path) -> tuple[subprocess.CompletedProcess, set[str]]:
    out = tmp_path / "modules"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), *argv], capture_output=True, text=True,
                          timeout=60)
    names = set(out.read_text().split("\n"))
    assert "sandlock_core.cli" in names and "sandlock_core.sandbox" in names or proc.returncode == 2
    return proc, names


@pytest.mark.parametrize("argv", [
    [*RO, "--", "/bin/true"],  # the benchmark's command
    ["--", "/bin/true"],
    ["--clean-env", "--env", "A=1", "-t", "30", "--net-bind", "8000-8002", "--max-open-files", "64",
     "--cpu-cores", "0", "--fs-read=/usr", "--no-coredump", "--", "/bin/true"],
])
def test_the_run_path_imports_nothing_heavy(argv, tmp_path):
    proc, names = imported_by("run", *argv, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert names & HEAVY == set()
    if "/usr" in argv:
        assert "sandlock_core.metadata" in names  # mechanisms loaded by importlib are in the set too


def test_the_full_path_still_serves_what_the_lean_one_leaves(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sandlock_core.cli", "run", "--bogus-flag", "--", "/bin/true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus-flag" in proc.stderr
    proc, names = imported_by("run", "--max-memory", "12Q", "--", "/bin/true", tmp_path=tmp_path)
    assert proc.returncode == 2 and "sandlock: error: max_memory: '12Q' is not a size" in proc.stderr
    assert "dataclasses" not in names  # a policy error is found by the same validators, on the lean path


# ---- _records: the dataclass stand-in keeps dataclass behaviour -------------------------------------------

@dataclass
class Rec:
    a: int
    b: str = "x"
    c: list = field(default_factory=list)


@dataclass(frozen=True)
class Key:
    arch: str
    nrs: frozenset = frozenset()


def test_records_behave_like_dataclasses():
    r = Rec(1)
    assert (r.a, r.b, r.c) == (1, "x", []) and Rec(1).c is not r.c
    assert r == Rec(1, "x", []) and r != Rec(2) and r != (1, "x", [])
    assert repr(r) == "Rec(a=1, b='x', c=[])"
    with pytest.raises(TypeError):
        hash(r)  # eq without frozen: unhashable, as with dataclasses
    with pytest.raises(TypeError):
        Rec()  # a is required
    k = Key("x86_64", frozenset({1}))
    assert hash(k) == hash(Key("x86_64", frozenset({1}))) and {k: 1}[Key("x86_64", frozenset({1}))] == 1
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'arch'"):
        k.arch = "arm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del k.arch
    assert Rec.__match_args__ == ("a", "b", "c")


def test_records_answer_the_dataclasses_api():
    r = Rec(1, c=[2])
    assert dataclasses.is_dataclass(Rec) and dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(Rec)] == ["a", "b", "c"]
    assert dataclasses.fields(Rec)[2].default_factory is list
    assert dataclasses.asdict(r) == {"a": 1, "b": "x", "c": [2]}
    assert dataclasses.astuple(Key("a")) == ("a", frozenset())
    assert dataclasses.replace(r, b="y") == Rec(1, "y", [2])
    assert dataclasses.fields(Key("a"))[0].name == "arch" and Key.__dataclass_params__.frozen
    assert pickle.loads(pickle.dumps(Key("a"))) == Key("a")


def test_records_leave_anything_richer_to_dataclasses():
    @dataclass(order=True)
    class Ordered:
        a: int
    assert Ordered(1) < Ordered(2)
    with pytest.raises(ValueError, match="mutable default"):
        @dataclass
        class Mutable:
            a: list = []
    with pytest.raises(TypeError, match="non-default argument"):
        @dataclass
        class Order:
            a: int = 0
            b: int


def test_the_sandbox_records_are_dataclasses():
    from sandlock_core.sandbox import Change, Result
    from sandlock_core.seccomp import FilterSpec
    assert [f.name for f in dataclasses.fields(Result)][:6] == ["success", "exit_code", "stdout", "stderr",
                                                                  "error", "signal"]
    assert dataclasses.replace(Result(True, 0), exit_code=3).exit_code == 3
    assert hash(FilterSpec("x86_64")) == hash(FilterSpec(arch="x86_64"))
    assert dataclasses.asdict(Change("A", "f")) == {"kind": "A", "path": "f"}


# ---- every mechanism reads a LeanPolicy as it reads a Policy ----------------------------------------------

READ_ONLY = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.isdir(p)]


@pytest.mark.parametrize("fields", [
    {"fs_readable": READ_ONLY, "fs_writable": ["/tmp"], "fs_denied": ["/etc/shadow"]},
    {"max_memory": "256M", "max_processes": 10, "num_cpus": 1, "isolate_pids": True},
    {"time_start": "2000-01-01T00:00:00Z", "random_seed": 7, "hostname": "box", "deterministic_dirs": True},
    {"net_allow_hosts": ["127.0.0.1"], "port_remap": True, "net_bind": [8080], "net_connect": "443"},
    {"clean_env": True, "env": {"A": "1"}, "max_open_files": 64, "no_coredump": True, "cpu_cores": "0"},
])
def test_the_sandbox_runs_a_lean_policy_like_a_policy(fields):
    from sandlock_core import Policy, Sandbox
    from sandlock_core.policy_spec import LeanPolicy
    cmd = ["/bin/sh", "-c", "echo ${A:-none}; hostname; exit 3"]
    lean, full = Sandbox(LeanPolicy(**fields)).run(cmd), Sandbox(Policy(**fields)).run(cmd)
    assert (lean.exit_code, lean.stdout, lean.stderr) == (full.exit_code, full.stdout, full.stderr) == (
        3, full.stdout, b"")
    assert lean.stdout.startswith(b"1\n" if "env" in fields else b"none\n")


# ---- the launcher (scripts/bootstrap.sh): `sandlock` without `site` ----------------------------------------

ECHO_RUN = ["run", *RO, "--", "/bin/echo", "hi"]


def _launcher(tmp_path, paths=None):
    from sandlock_core import launcher
    path = tmp_path / "sandlock"
    if paths is None:
        launcher.write(str(path))
    else:
        path.write_text(launcher.script_text(sys.executable, paths))
        path.chmod(0o755)
    return path


def _run_importing(argv, env=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``argv`` with Python's import log on; (process, names of the modules it imported)."""
    env = {**os.environ, **(env or {}), "PYTHONPROFILEIMPORTTIME": "1"}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, names


def test_the_launcher_starts_without_site(tmp_path):
    path = _launcher(tmp_path)
    assert path.read_text().startswith(f"#!{sys.executable} -S\n")
    proc, names = _run_importing([str(path), *ECHO_RUN])
    assert (proc.returncode, proc.stdout) == (0, "hi\n"), proc.stderr
    assert "sandlock_core.cli" in names and "site" not in names and "sitecustomize" not in names


def test_the_launcher_keeps_pythonpath_first(tmp_path):
    shadow = tmp_path / "shadow" / "sandlock_core"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "cli.py").write_text("def main():\n    print('shadow')\n    return 5\n")
    proc = subprocess.run([str(_launcher(tmp_path)), *ECHO_RUN], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")})
    assert (proc.returncode, proc.stdout) == (5, "shadow\n"), proc.stderr


@pytest.mark.parametrize("stale", ["no cffi", "a package without cli"])
def test_the_launcher_falls_back_to_site_when_its_paths_are_stale(stale, tmp_path):
    """Recorded paths that no longer hold cffi or the package: the usual start-up (site), same result."""
    if stale == "no cffi":
        paths, env = [], {}
    else:
        old = tmp_path / "old" / "sandlock_core"
        old.mkdir(parents=True)
        (old / "__init__.py").write_text("")
        import _cffi_backend
        paths = [str(tmp_path / "old"), os.path.dirname(_cffi_backend.__file__)]
        env = {"PYTHONPATH": None}  # else PYTHONPATH's sandlock_core would come before the stale one
    proc, names = _run_importing([str(_launcher(tmp_path, paths)), *ECHO_RUN], env)
    assert (proc.returncode, proc.stdout) == (0, "hi\n"), proc.stderr
    assert {"site", "sandlock_core.cli"} <= names


def test_bootstrap_installs_the_launcher():
    """scripts/bootstrap.sh (the README's set-up) writes the launcher over pip's script: checked on the
    environment the suite runs in when that is the checkout's own .venv (CI, scripts/test.sh)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(sys.executable), "sandlock")
    if os.path.dirname(os.path.dirname(sys.executable)) != os.path.join(root, ".venv"):
        pytest.skip("not the checkout's own .venv (scripts/bootstrap.sh did not make this environment)")
    with open(script) as f:
        assert f.readline() == f"#!{sys.executable} -S\n"
