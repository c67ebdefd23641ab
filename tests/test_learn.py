"""Learn mode: ``sandlock learn`` and ``pytest --sandlock-learn`` write the least-privilege profile of a run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandlock_core import learn as L
from sandlock_core.profile import _load_toml, dumps_toml

DEMO = Path(__file__).resolve().parent.parent / "examples" / "learn-demo"
CLI = [sys.executable, "-m", "sandlock_core.cli"]


def _landlock() -> bool:
    try:
        from sandlock_core import landlock_abi_version
        return landlock_abi_version() >= 4
    except Exception:
        return False


needs_landlock = pytest.mark.skipif(not _landlock(), reason="needs Landlock ABI 4 (filesystem and TCP)")


def _beneath(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SANDLOCK"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


# ---- units ----------------------------------------------------------------------------------------------

def test_secret_reason():
    assert L.secret_reason("/home/u/.ssh/id_rsa")
    assert L.secret_reason("/home/u/.ssh")
    assert L.secret_reason("/home/u/.aws/credentials")
    assert L.secret_reason("/home/u/.netrc")
    assert L.secret_reason("/srv/app/.env")
    assert L.secret_reason("/srv/app/.env.production")
    assert L.secret_reason("/home/u/.config/gcloud/credentials.db")
    assert L.secret_reason("/home/u/keys/id_ed25519")
    assert not L.secret_reason("/home/u/keys/id_ed25519.pub")
    assert not L.secret_reason("/srv/app/environment.py")
    assert not L.secret_reason("/etc/ssl/certs/ca.pem")


def test_minimize_and_ports():
    assert L.minimize(["/a/b", "/a", "/c/d", "/c/de"]) == ["/a", "/c/d", "/c/de"]
    assert L._compress_ports([80, 443, 8000, 8001, 8002, 8003]) == [80, 443, "8000-8003"]


def test_interpreters(tmp_path):
    script = tmp_path / "s"
    script.write_text("#!/bin/sh -e\necho\n")
    found = L.interpreters(str(script))
    assert found[0] == "/bin/sh"
    assert any("ld-linux" in p or "ld-" in os.path.basename(p) for p in found[1:])  # the ELF interpreter


def _tree(tmp_path):
    home = tmp_path / "home"
    proj = home / "src" / "proj"
    for d in (proj / "tests" / "fixtures", proj / "pkg", home / ".ssh", home / "other", tmp_path / "scratch"):
        d.mkdir(parents=True)
    for f in (proj / "tests" / "fixtures" / "a.json", proj / "pkg" / "m.py", home / ".ssh" / "id_rsa",
              home / ".netrc", home / "other" / "notes.txt", proj / ".env"):
        f.write_text("x")
    return home, proj


def test_build_profile_collapses_reads_and_keeps_home_tight(tmp_path):
    home, proj = _tree(tmp_path)
    obs = L.Observations()
    obs.reads |= {str(proj / "tests" / "fixtures" / "a.json"), str(proj / "pkg" / "m.py"), "/usr/lib/os-release",
                  str(home / ".netrc"), "/proc/1/status"}
    obs.lists |= {str(home)}
    lr = L.build_profile(obs, collapse=3, home=str(home), limits=False)
    r = lr.fields["fs_readable"]
    # counted from $HOME: ~/src/proj/<3rd component>; never ~/src/proj itself (it holds .env)
    assert str(proj / "tests") in r and str(proj / "pkg") in r
    assert "/usr" in r and "/proc" in r
    assert not any(_beneath(p, [str(home / ".ssh"), str(home / "other")]) or p == str(home) for p in r)
    assert str(home / ".netrc") not in r
    assert [s[0] for s in lr.secrets] == [str(home / ".netrc")]
    assert any(str(home) in n and "listed" in n for n in lr.notes)


def test_build_profile_writes_use_the_ancestor_that_existed(tmp_path):
    base = tmp_path / "scratch"
    base.mkdir()
    run = base / "pytest-7"
    (run / "t0").mkdir(parents=True)  # made by the run
    obs = L.Observations()
    obs.names |= {str(run), str(run / "t0"), str(run / "t0" / "f")}
    obs.created |= {str(run), str(run / "t0"), str(run / "t0" / "f")}
    existing = tmp_path / "log.txt"
    existing.write_text("")
    obs.writes.add(str(existing))
    obs.reads.add(str(run / "t0" / "f"))
    lr = L.build_profile(obs, home="/nonexistent-home", limits=False)
    assert lr.fields["fs_writable"] == sorted([str(base), str(existing)])
    assert "fs_readable" not in lr.fields  # covered by the writable rule


def test_build_profile_names_in_tmp_and_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    obs = L.Observations()
    obs.names.add(str(home / "made"))
    obs.created.add(str(home / "made"))
    lr = L.build_profile(obs, home=str(home), limits=False)
    assert "fs_writable" not in lr.fields  # never $HOME itself
    assert any(str(home / "made") in n and "not granted" in n for n in lr.notes)
    obs.names.add("/tmp/tmpab12cd")
    obs.created.add("/tmp/tmpab12cd")
    lr = L.build_profile(obs, home=str(home), limits=False)
    assert lr.fields["fs_writable"] == ["/tmp"]  # tempfile names: the temp dir itself
    assert any("/tmp writable" in n for n in lr.notes)


def test_build_profile_pseudo_files_and_execs():
    obs = L.Observations()
    obs.reads |= {"/proc/123/status", "/dev/pts/7", "/dev/urandom", "/usr/bin/git"}
    obs.writes |= {"/dev/pts/7", "/dev/null"}
    obs.execs.add("/usr/bin/git")
    lr = L.build_profile(obs, limits=False)
    assert lr.fields["fs_readable"] == ["/dev/urandom", "/proc", "/usr"]
    assert lr.fields["fs_writable"] == ["/dev/null", "/dev/pts"]
    assert any("all of /proc" in n for n in lr.notes)
    assert any(n == "programs executed: /usr/bin/git" for n in lr.notes)


def test_build_profile_network_and_limits():
    obs = L.Observations()
    lo, hi = L.ephemeral_range()
    obs.connects |= {("127.0.0.1", lo + 5, "tcp"), ("127.0.0.1", 5432, "tcp"), ("127.0.0.53", 53, "udp")}
    obs.binds |= {("127.0.0.1", 0, "tcp")}
    obs.peak_processes, obs.peak_fd, obs.peak_memory = 3, 20, 50 << 20
    f = L.build_profile(obs).fields
    assert f["net_connect"] == [5432, f"{lo}-{hi}"]
    assert f["net_bind"] == [0]
    assert "net_allow_hosts" not in f  # loopback only
    assert f["max_processes"] >= 6 and f["max_open_files"] >= 64 and f["max_memory"] == "164M"
    obs.connects.add(("93.184.216.34", 443, "tcp"))
    assert "93.184.216.34" in L.build_profile(obs).fields["net_allow_hosts"]


def test_merge_widens():
    old = {"fs_readable": ["/a/b", "/c"], "net_connect": [80], "max_processes": 10, "max_memory": "1G",
           "clean_env": True}
    new = {"fs_readable": ["/a"], "fs_writable": ["/c/w"], "net_connect": [81, 82], "max_processes": 4,
           "max_memory": "2G"}
    m = L.merge(old, new)
    assert m["fs_readable"] == ["/a", "/c"]
    assert m["fs_writable"] == ["/c/w"]
    assert m["net_connect"] == ["80-82"]
    assert m["max_processes"] == 10 and m["max_memory"] == "2G" and m["clean_env"] is True


def test_render_is_a_loadable_profile(tmp_path):
    lr = L.Learned({"fs_readable": ["/usr"], "net_connect": [443], "max_processes": 10}, ["a note"],
                   [("/h/.netrc", ".netrc file", "read")])
    text = L.render(lr, command=["echo", "hi"])
    assert "# note: a note" in text and "/h/.netrc" in text
    p = tmp_path / "p.toml"
    p.write_text(text)
    from sandlock_core.profile import load_profile_file
    pol = load_profile_file(p)
    assert pol.fs_readable == ("/usr",) and pol.net_connect == (443,)


# ---- sandlock learn ---------------------------------------------------------------------------------------

def _learn(args, cwd, env, check=True):
    r = subprocess.run(CLI + ["learn", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _run(profile_dir, cmd, cwd, env):
    env = dict(env, XDG_CONFIG_HOME=str(profile_dir))
    return subprocess.run(CLI + ["run", "-p", "learned", "--", *cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@needs_landlock
def test_cli_learn_shell_run_passes_under_its_profile(tmp_path):
    home, proj = _tree(tmp_path)
    cfg = tmp_path / "cfg" / "sandlock" / "profiles"
    cfg.mkdir(parents=True)
    out = tmp_path / "scratch"
    script = (f"cat {proj}/tests/fixtures/a.json >/dev/null && ls {proj}/pkg >/dev/null && "
              f"mkdir -p {out}/run/x && echo hi > {out}/run/x/f && git --version >/dev/null && sleep 0.2")
    env = _env(HOME=str(home))
    _learn(["-o", str(cfg / "learned.toml"), "--", "/bin/sh", "-c", script], tmp_path, env)
    text = (cfg / "learned.toml").read_text()
    data = _load_toml(cfg / "learned.toml")
    assert str(out) in data["fs_writable"]
    assert "/usr" in data["fs_readable"]
    assert "max_processes" in data and "max_open_files" in data
    assert text.startswith("# sandlock profile learned")
    shutil.rmtree(out / "run")
    r = _run(tmp_path / "cfg", ["/bin/sh", "-c", script], tmp_path, env)
    assert r.returncode == 0, r.stderr
    # what was not learned is refused
    r = _run(tmp_path / "cfg", ["/bin/cat", str(home / "other" / "notes.txt")], tmp_path, env)
    assert r.returncode != 0 and "Permission denied" in r.stderr


@needs_landlock
def test_cli_learn_calls_out_secrets_instead_of_granting_them(tmp_path):
    home, proj = _tree(tmp_path)
    cfg = tmp_path / "cfg" / "sandlock" / "profiles"
    cfg.mkdir(parents=True)
    env = _env(HOME=str(home))
    cmd = ["/bin/sh", "-c", f"cat {home}/.netrc {proj}/pkg/m.py >/dev/null"]
    _learn(["-o", str(cfg / "learned.toml"), "--", *cmd], tmp_path, env)
    text = (cfg / "learned.toml").read_text()
    data = _load_toml(cfg / "learned.toml")
    assert not any(_beneath(str(home / ".netrc"), [p]) for p in data["fs_readable"])
    assert f"#   {home}/.netrc" in text and "NOT granted" in text
    r = _run(tmp_path / "cfg", cmd, tmp_path, env)
    assert r.returncode != 0 and ".netrc" in r.stderr


@needs_landlock
def test_cli_learn_merge_widens_an_existing_profile(tmp_path):
    a, b = tmp_path / "a" / "x", tmp_path / "b" / "y"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "f").write_text("1")
    prof = tmp_path / "p.toml"
    env = _env()
    _learn(["--collapse", "4", "-o", str(prof), "--", "/bin/cat", str(a / "f")], tmp_path, env)
    _learn(["--collapse", "4", "--merge", str(prof), "--", "/bin/cat", str(b / "f")], tmp_path, env)
    r = _load_toml(prof)["fs_readable"]
    assert any(_beneath(str(a / "f"), [p]) for p in r) and any(_beneath(str(b / "f"), [p]) for p in r)


def test_cli_learn_to_stdout_and_exit_code(tmp_path):
    r = _learn(["--", "/bin/sh", "-c", "exit 3"], tmp_path, _env(), check=False)
    assert r.returncode == 3
    assert "did not succeed" in r.stdout and "fs_readable" in r.stdout
    assert subprocess.run(CLI + ["learn"], capture_output=True).returncode == 2


def test_cli_learn_sees_processes(tmp_path):
    r = _learn(["--", "/bin/sh", "-c", "sleep 0.4 & sleep 0.4 & sleep 0.4 & wait"], tmp_path, _env())
    data = __import__("tomllib").loads(r.stdout)
    assert data["max_processes"] >= 2 * 4  # sh + 3 sleeps, with headroom


# ---- the proof: a real project's pytest run ----------------------------------------------------------------

def _workload(tmp_path):
    """A small project under $HOME: a fixture inside it, shared data outside it, git, a loopback server."""
    home = tmp_path / "home"
    proj = home / "src" / "proj"
    shutil.copytree(DEMO, proj, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    (home / "data").mkdir()
    (home / "data" / "shared.txt").write_text("shared\n")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("key")
    (home / "other-project").mkdir()
    (home / "other-project" / "notes.txt").write_text("untouched")
    scratch = tmp_path / "scratch" / "tmp"
    scratch.mkdir(parents=True)
    env = _env(HOME=str(home), TMPDIR=str(scratch), LEARN_DEMO_DATA=str(home / "data" / "shared.txt"),
               GIT_CONFIG_NOSYSTEM="1")
    return home, proj, env


PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "tests"]


def _pytest(args, proj, env):
    return subprocess.run(PYTEST + list(args), cwd=proj, env=env, capture_output=True, text=True, timeout=300)


def _without(src: Path, dst: Path, key: str, entry: str) -> None:
    data = _load_toml(src)
    assert entry in data[key]
    data[key] = [e for e in data[key] if e != entry]
    dst.write_text(dumps_toml(data))


@needs_landlock
def test_proof_learn_a_pytest_run_then_run_it_under_the_profile(tmp_path):
    home, proj, env = _workload(tmp_path)
    cfg = tmp_path / "cfg" / "sandlock" / "profiles"
    cfg.mkdir(parents=True)
    prof = cfg / "learned.toml"
    r = _learn(["-o", str(prof), "--", *PYTEST], proj, env)
    data = _load_toml(prof)
    shared = str(home / "data" / "shared.txt")
    assert shared in data["fs_readable"]
    lo, hi = L.ephemeral_range()
    assert f"{lo}-{hi}" in data["net_connect"] and 0 in data["net_bind"]
    # nothing under $HOME the run did not touch
    for rule in data.get("fs_readable", []) + data.get("fs_writable", []):
        if _beneath(rule, [str(home)]):
            assert rule != str(home)
            assert not _beneath(str(home / ".ssh"), [rule]) and not _beneath(str(home / "other-project"), [rule])
            assert rule.startswith((str(proj), shared)), rule
    # the same run passes under the learned profile, whole (sandlock run) ...
    r = _run(tmp_path / "cfg", PYTEST, proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 passed" in r.stdout
    # remove one rule: the whole-run check names what is missing
    broken = tmp_path / "broken.toml"
    _without(prof, broken, "fs_readable", shared)
    r = _learn(["--check", str(broken), "--", *PYTEST], proj, env, check=False)
    assert r.returncode == 1 and "1 failed, 4 passed" in r.stdout
    assert "1 operation refused" in r.stderr and f"fs_readable += ['{shared}']" in r.stderr
    r = _learn(["--check", str(prof), "--", *PYTEST], proj, env)
    assert "nothing refused" in r.stderr
    # ... and test by test (the plugin confines each test body under the profile)
    r = _pytest(["--sandlock-profile=" + str(prof)], proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 tests ran confined" in r.stdout
    # without that rule, the test that needed it fails and the plugin's denial report names what is missing
    r = _pytest(["--sandlock-profile=" + str(broken)], proj, env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 4 passed" in r.stdout
    assert "test_reads_shared_data" in r.stdout and f"fs_readable += ['{shared}']" in r.stdout


@needs_landlock
def test_proof_pytest_sandlock_learn(tmp_path):
    home, proj, env = _workload(tmp_path)
    prof = tmp_path / "suite.toml"
    r = _pytest(["--sandlock-learn=" + str(prof)], proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sandlock learn" in r.stdout and "learned a profile from 5 tests" in r.stdout
    data = _load_toml(prof)
    shared = str(home / "data" / "shared.txt")
    assert shared in data["fs_readable"]
    assert not any(_beneath(p, [str(proj)]) for p in data["fs_readable"])  # the plugin grants the rootdir
    r = _pytest(["--sandlock-profile=" + str(prof)], proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "broken.toml"
    lo, hi = L.ephemeral_range()
    data["net_connect"] = [p for p in data["net_connect"] if p != f"{lo}-{hi}"] or [1]
    broken.write_text(dumps_toml(data))
    r = _pytest(["--sandlock-profile=" + str(broken)], proj, env)
    assert "1 failed, 4 passed" in r.stdout and "test_loopback_http" in r.stdout
    assert "connect" in r.stdout and "net_connect += [" in r.stdout


@needs_landlock
def test_pytest_sandlock_learn_per_test_and_merge(tmp_path):
    home, proj, env = _workload(tmp_path)
    prof = tmp_path / "suite.toml"
    r = _pytest(["--sandlock-learn=" + str(prof), "--sandlock-learn-per-test"], proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    text = prof.read_text()
    shared = str(home / "data" / "shared.txt")
    assert "need more than the suite profile" in r.stdout
    assert "# tests/test_workload.py::test_reads_shared_data" in text
    assert f"@pytest.mark.sandbox(fs_readable=['{shared}'])" in text
    data = _load_toml(prof)
    assert shared not in data.get("fs_readable", [])
    assert data["fs_readable"]  # never empty: an empty list would leave the filesystem unrestricted
    # learning again with --sandlock-learn-merge widens instead of replacing
    r = _pytest(["--sandlock-learn=" + str(prof), "--sandlock-learn-merge", "-k", "shared"], proj, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert shared in _load_toml(prof)["fs_readable"]
