"""The pytest plugin, end to end through pytester (always ``runpytest_subprocess``: confinement cannot be undone
in-process, and an in-process run would leak plugin state)."""
from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

import sandlock_core

pytestmark = pytest.mark.skipif(sandlock_core.landlock_abi_version() < 1, reason="Landlock is not available")

# Paths an ordinary subprocess (cat, sh, python) needs once the filesystem is restricted; on merged-/usr
# systems /bin and /lib are symlinks into /usr.
SYS = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]
SYS_ARG = repr(SYS)

# Is this process confined? prctl(PR_GET_SECCOMP) is 2 under a seccomp filter, and PR_GET_NO_NEW_PRIVS 1
# (no file access needed: /proc may not be readable under the policy).
PROBE = textwrap.dedent("""
    import ctypes as _ctypes

    def _confined():
        prctl = _ctypes.CDLL(None).prctl
        return prctl(21, 0, 0, 0, 0) == 2 and prctl(39, 0, 0, 0, 0) == 1
""")


# ---- nothing changes unless asked ------------------------------------------------------------------------

def test_installed_but_unused_changes_nothing(pytester):
    pytester.makepyfile(PROBE + textwrap.dedent("""
        def test_plain():
            assert not _confined()
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert "sandlock" not in result.stdout.str().replace("plugins: sandlock-", "")


def test_help_lists_options_and_ini(pytester):
    result = pytester.runpytest_subprocess("--help")
    out = result.stdout.str()
    for opt in ("--sandlock-profile", "--sandlock-off", "--sandlock-seed", "--sandlock-strict",
                "--sandlock-best-effort", "--sandlock-no-defaults", "--sandlock-timeout",
                "sandlock_profile", "sandlock_readable", "sandlock_writable", "sandlock_defaults",
                "sandlock_policy"):
        assert opt in out, opt
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.sandbox(enabled=True, *", "*@pytest.mark.no_sandbox*"])


# ---- markers ------------------------------------------------------------------------------------------------

def test_marker_on_function_confines_the_body(pytester):
    pytester.makepyfile(PROBE + textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_confined():
            assert _confined()
            try:
                open("/etc/hostname").read()
            except PermissionError:
                pass
            else:
                raise AssertionError("/etc/hostname was readable")

        def test_not_marked():
            assert not _confined()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_marker_on_class_and_module(pytester):
    pytester.makepyfile(PROBE + textwrap.dedent("""
        import pytest

        pytestmark = pytest.mark.sandbox(clean_env=True)

        def test_module_level():
            assert _confined()

        @pytest.mark.sandbox(max_open_files=64)
        class TestClass:
            def test_class_level(self):
                import resource
                assert _confined()
                assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 64

            @pytest.mark.sandbox(False)
            def test_opted_out(self):
                assert not _confined()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_subprocesses_are_confined_too(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import subprocess, pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_cat():
            r = subprocess.run(["cat", "/etc/hostname"], capture_output=True, text=True)
            assert r.returncode != 0
            assert "Permission denied" in r.stderr
            r = subprocess.run(["sh", "-c", "grep NoNewPrivs /proc/self/status"], capture_output=True, text=True)
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_placeholders_expand_per_test(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import os, pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG}, fs_writable=["{{tmp_path}}"], env={{"ROOT": "{{rootdir}}"}},
                             no_coredump=True)
        def test_tmp(tmp_path, sandbox_policy):
            (tmp_path / "out.txt").write_text("hi")
            assert (tmp_path / "out.txt").read_text() == "hi"
            assert any(os.fspath(p) == str(tmp_path) for p in sandbox_policy.fs_writable)
            assert dict(sandbox_policy.env)["ROOT"] == str({str(pytester.path)!r})
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_bad_marker_arguments_fail_at_setup(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(fs_readabel=["/usr"])
        def test_typo():
            pass

        @pytest.mark.sandbox(max_open_files="lots")
        def test_bad_value():
            pass

        @pytest.mark.sandbox(1, 2)
        def test_bad_args():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    assert "unknown policy field 'fs_readabel' (did you mean 'fs_readable'?)" in out
    assert "max_open_files" in out
    assert "Traceback" not in out
    assert "INTERNALERROR" not in out


def test_strict_markers(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(clean_env=True)
        def test_a():
            pass

        @pytest.mark.no_sandbox
        def test_b():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2)


def test_disabled_with_p_no_sandlock_and_sandlock_off(pytester):
    pytester.makepyfile(PROBE + textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(clean_env=True)
        def test_marked():
            assert not _confined()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:sandlock", "-W",
                                           "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandlock-off")
    result.assert_outcomes(passed=1)


# ---- options, ini and profiles ------------------------------------------------------------------------------

def _write_profile(pytester, name="ci", body=None):
    body = body if body is not None else f"fs_readable = {json.dumps(SYS)}\nclean_env = true\n"
    path = pytester.path / f"{name}.toml"
    path.write_text(body)
    return path


def test_option_profile_confines_every_test(pytester):
    prof = _write_profile(pytester)
    pytester.makepyfile(PROBE + textwrap.dedent("""
        import os, pytest

        def test_a():
            assert _confined()
            assert "SECRET" not in os.environ   # clean_env from the profile

        @pytest.mark.sandbox(max_open_files=32)   # refines the profile
        def test_b(sandbox_policy):
            assert _confined()
            assert sandbox_policy.clean_env and sandbox_policy.max_open_files == 32

        @pytest.mark.no_sandbox
        def test_c():
            assert not _confined()
    """))
    os.environ["SECRET"] = "x"
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandlock-profile={prof}")
    finally:
        del os.environ["SECRET"]
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert re.search(r"sandlock: pytest-sandlock \S+; Landlock ABI \d+; mechanisms: .*; profile=.*ci\.toml; seed=\d+ "
                     r"\(replay: --sandlock-seed \d+\)", out), out
    result.stdout.fnmatch_lines(["*2 tests ran confined*", "*1 test opted out and ran unconfined*test_c*"])


def test_ini_profile_and_paths(pytester):
    prof = _write_profile(pytester, body="clean_env = true\n")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "x.txt").write_text("data")
    readable = "".join(f"\n    {p}" for p in SYS)
    pytester.makeini(f"[pytest]\nsandlock_profile = {prof}\nsandlock_readable ={readable}\n"
                     f"sandlock_writable = {{rootdir}}/out\nsandlock_policy =\n    max_open_files = 100\n")
    (pytester.path / "out").mkdir()
    pytester.makepyfile(PROBE + textwrap.dedent("""
        import resource

        def test_ini(sandbox_policy, pytestconfig):
            assert _confined()
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 100
            root = pytestconfig.rootpath
            (root / "out" / "w.txt").write_text("ok")
            assert (root / "data" / "x.txt").read_text() == "data"   # rootdir: readable by default
            try:
                (root / "data" / "y.txt").write_text("no")
            except PermissionError:
                pass
            else:
                raise AssertionError("rootdir must not be writable")
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_precedence_marker_over_profile_over_ini(pytester):
    prof = _write_profile(pytester, body="max_open_files = 200\nclean_env = true\n")
    pytester.makeini(textwrap.dedent(f"""
        [pytest]
        sandlock_policy =
            max_open_files = 100
            no_coredump = true
    """))
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        def test_profile(sandbox_policy):
            assert sandbox_policy.max_open_files == 200     # profile beats ini
            assert sandbox_policy.no_coredump               # ini applies where the profile is silent

        @pytest.mark.sandbox(max_open_files=50)
        def test_marker(sandbox_policy):
            assert sandbox_policy.max_open_files == 50      # marker beats profile
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandlock-profile", str(prof))
    result.assert_outcomes(passed=2)


def test_defaults_can_be_switched_off(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_policy(sandbox_policy):
            import sys
            assert len(sandbox_policy.fs_readable) == len({SYS_ARG})
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandlock-no-defaults")
    # without the defaults the test body still runs: pytest's modules are already imported in the child
    result.assert_outcomes(passed=1)


def test_unknown_profile_is_a_usage_error(pytester):
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess("--sandlock-profile", str(pytester.path / "nope.toml"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sandlock*nope.toml*"])


@pytest.mark.parametrize("key", ["sandlock_worker", "sandlock_strict"])
def test_a_bad_boolean_ini_value_is_a_usage_error_naming_the_key(pytester, key):
    pytester.makeini(f"[pytest]\n{key} = maybe\n")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*ini {key}: 'maybe' is not a boolean*"])


# ---- outcomes reported as if in-process ---------------------------------------------------------------------

def test_outcomes_and_rewritten_assertions(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest, warnings

        pytestmark = pytest.mark.sandbox(clean_env=True)

        def test_pass(record_property):
            record_property("answer", 42)

        def test_fail():
            x = [1, 2, 3]
            print("captured-out-marker")
            assert x == [1, 2, 4]

        def test_skip():
            pytest.skip("skipped inside the sandbox")

        @pytest.mark.xfail(reason="expected")
        def test_xfail():
            assert 0

        def test_warns():
            warnings.warn("warned-inside-the-sandbox", UserWarning)
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--junitxml=junit.xml",
                                           "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1, warnings=1)
    out = result.stdout.str()
    assert "assert [1, 2, 3] == [1, 2, 4]" in out
    assert "At index 2 diff: 3 != 4" in out
    assert "captured-out-marker" in out
    assert "skipped inside the sandbox" in out
    assert "warned-inside-the-sandbox" in out
    junit = ET.parse(pytester.path / "junit.xml")
    props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert props.get("answer") == "42"
    assert "sandlock_seed" in props


def test_session_fixture_set_up_once_in_parent(pytester):
    pytester.makeconftest(textwrap.dedent("""
        import os, pytest

        @pytest.fixture(scope="session")
        def shared(tmp_path_factory):
            d = tmp_path_factory.mktemp("shared")
            (d / "setups").write_text(str(os.getpid()))
            return {"pid": os.getpid(), "dir": d}
    """))
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest

        pytestmark = pytest.mark.sandbox(clean_env=True)

        @pytest.mark.parametrize("i", range(3))
        def test_uses(shared, i):
            assert shared["pid"] == os.getppid() or shared["pid"] != os.getpid()
            assert (shared["dir"] / "setups").read_text() == str(shared["pid"])
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


# ---- crashes, signals and timeouts ---------------------------------------------------------------------------

def test_child_that_segfaults(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import ctypes, pytest

        @pytest.mark.sandbox(no_coredump=True)
        def test_segv():
            ctypes.string_at(0)

        @pytest.mark.sandbox(no_coredump=True)
        @pytest.mark.xfail(reason="crashes")
        def test_segv_xfail():
            ctypes.string_at(0)

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "-p", "no:faulthandler")
    result.assert_outcomes(failed=1, passed=1, xfailed=1)
    result.stdout.fnmatch_lines(["the confined test process was killed by SIGSEGV (Segmentation fault)*"])


def test_child_that_hangs_past_the_timeout(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess, time, pytest

        @pytest.mark.sandbox(clean_env=True)
        def test_hang():
            subprocess.Popen(["sleep", "300"])
            time.sleep(300)

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--sandlock-timeout", "1",
                                           timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>1s) from sandlock_timeout: sandlock killed the confined test*"])
    assert result.duration < 30


def test_pytest_timeout_marker_kills_the_sandbox_not_the_session(pytester):
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(textwrap.dedent("""
        import time, pytest

        @pytest.mark.sandbox(clean_env=True)
        @pytest.mark.timeout(1)
        def test_slow():
            time.sleep(60)

        @pytest.mark.sandbox(clean_env=True)
        @pytest.mark.timeout(1, func_only=True)
        def test_slow_func_only():
            time.sleep(60)

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=60)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>1s) from pytest-timeout*"])


# ---- denials ------------------------------------------------------------------------------------------------

def test_denial_report(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import subprocess, pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_reads_etc():
            subprocess.run(["cat", "/etc/hostname"], capture_output=True)
            subprocess.run(["cat", "/etc/hostname"], capture_output=True)
            with open("/etc/passwd") as f:
                f.read()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--junitxml=junit.xml")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["*- sandlock denials -*"])
    result.stdout.re_match_lines([
        r"\d+ operations refused \(\d+ distinct\):",
        r"  openat \[read\]  /etc/hostname +EACCES  pid \d+ \(cat\) +x2  -> fs_readable \+= \['/etc/hostname'\]",
        r"  openat \[read\]  /etc/passwd +EACCES  pid \d+ \(python\S*\) +-> fs_readable \+= \['/etc/passwd'\]",
        r"to allow all of them: @pytest.mark.sandbox\(fs_readable=\[\.\.\., .*'/etc/hostname', '/etc/passwd'\]\)",
    ], consecutive=False)
    result.stdout.fnmatch_lines(["FAILED *test_reads_etc - [[]sandlock: 3 denied[]] Permissio*"])
    junit = ET.parse(pytester.path / "junit.xml")
    props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    data = json.loads(props["sandlock_denials"])
    assert {d["detail"] for d in data} == {"/etc/hostname", "/etc/passwd"}
    assert all(d["errno"] == "EACCES" and d["source"] == "landlock" for d in data)
    assert {d["comm"] for d in data} == {"cat", "python"} or "cat" in {d["comm"] for d in data}
    failure = next(junit.iter("failure"))
    assert failure.get("message").startswith("[sandlock: 3 denied]")


def test_denials_for_writes_creates_and_network(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import os, socket, pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG}, net_connect=[1])
        def test_many(tmp_path):
            (tmp_path / "ok.txt").write_text("tmp_path is writable by default")
            for op in (lambda: open(tmp_path.parent / "created.txt", "w"),
                       lambda: os.mkdir("/var/tmp/sandlock-nope"),
                       lambda: open("/etc/hostname", "a"),
                       lambda: socket.create_connection(("127.0.0.1", 9), timeout=1)):
                try:
                    op()
                except OSError:
                    pass
            assert 0, "show the report"
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([
        r"  openat +\[create\] +/tmp/\S+/created.txt +EACCES .* -> fs_writable \+= \['/tmp/\S+'\]",
        r"  mkdir +\[create\] +/var/tmp/sandlock-nope +EACCES .* -> fs_writable \+= \['/var/tmp'\]",
        r"  openat +\[write\] +/etc/hostname +EACCES .* -> fs_writable \+= \['/etc/hostname'\]",
        r"  connect +127.0.0.1:9/tcp +EACCES .* -> net_connect \+= \[9\]",
    ], consecutive=False)
    assert not re.search(r"ok.txt +EACCES", result.stdout.str())


def test_passing_test_with_denials_keeps_quiet(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_tolerates():
            try:
                open("/etc/hostname")
            except PermissionError:
                pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "sandlock denials" not in result.stdout.str()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rP")
    assert "sandlock denials" in result.stdout.str()


# ---- fixtures and seeds --------------------------------------------------------------------------------------

def test_fixtures(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_explicit(sandbox, sandbox_policy):
            result = sandbox.run(["cat", "/etc/shadow"])
            assert result.exit_code != 0
            assert sandbox.policy == sandbox_policy

        def test_explicit_unconfined(sandbox):
            # without a marker the fixture still builds a Sandbox (for the session/default policy)
            result = sandbox.run(["true"])
            assert result.exit_code == 0

        def test_seed(sandlock_seed, sandbox_faker):
            print("SEED", sandlock_seed, sandbox_faker.name())

        @pytest.mark.sandbox(False, random_seed=1234)   # the seed without confinement: random_seed is not
        def test_marker_seed(sandlock_seed):              # enforced by every build yet
            assert sandlock_seed == 1234
    """))
    one = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--sandlock-seed", "7")
    seeds1 = re.findall(r"SEED \d+ .*", one.stdout.str())
    two = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--sandlock-seed", "7")
    seeds2 = re.findall(r"SEED \d+ .*", two.stdout.str())
    assert seeds1 and seeds1 == seeds2
    three = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--sandlock-seed", "8")
    assert re.findall(r"SEED \d+ .*", three.stdout.str()) != seeds1
    one.assert_outcomes(passed=4)


def test_seed_last_replays_the_previous_run(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(clean_env=True)
        def test_seed(sandlock_seed):
            print("SEED", sandlock_seed)
    """))
    first = pytester.runpytest_subprocess("-s")
    seed = re.search(r"ran confined; seed (\d+)", first.stdout.str()).group(1)
    again = pytester.runpytest_subprocess("-s", "--sandlock-seed", "last")
    assert f"seed={seed} (replay: --sandlock-seed {seed})" in again.stdout.str()
    assert re.findall(r"SEED \d+", first.stdout.str()) == re.findall(r"SEED \d+", again.stdout.str())


# ---- other plugins ----------------------------------------------------------------------------------------

def test_xdist_two_workers(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(PROBE + textwrap.dedent("""
        import os, pytest

        @pytest.mark.parametrize("i", range(6))
        def test_conf(i, sandlock_seed, worker_id):
            assert _confined()
            print("SEEDLINE", i, sandlock_seed, worker_id)
    """))
    prof = _write_profile(pytester, body="clean_env = true\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--sandlock-profile", str(prof),
                                           "--sandlock-seed", "99", "-rP")
    result.assert_outcomes(passed=6)
    lines = re.findall(r"SEEDLINE (\d) (\d+) (gw\d)", result.stdout.str())
    assert {w for _, _, w in lines} == {"gw0", "gw1"}
    single = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandlock-profile", str(prof),
                                           "--sandlock-seed", "99", "-rP")
    one = {i: s for i, s in re.findall(r"SEEDLINE (\d) (\d+) master", single.stdout.str())}
    assert one == {i: s for i, s, _ in lines}   # the same seeds with and without xdist


def test_xdist_parallel_tests_bind_the_same_fixed_port_with_port_remap(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(textwrap.dedent("""
        import socket, time, pytest

        pytestmark = pytest.mark.sandbox(port_remap=True)

        @pytest.mark.parametrize("i", range(4))
        def test_fixed_port(i):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", 18765))
                s.listen()
                time.sleep(0.5)      # overlap with the other worker's test
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)


def test_coverage_from_confined_test_and_its_python_subprocess(pytester):
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(mod=textwrap.dedent("""
        import sys

        def in_child():
            return 1

        def never():
            return 2

        if __name__ == "__main__":
            print("sub", in_child())
    """))
    pytester.makepyfile(test_cov=textwrap.dedent(f"""
        import subprocess, sys, pytest
        import mod

        @pytest.mark.sandbox(fs_readable={SYS_ARG})
        def test_it():
            assert mod.in_child() == 1
            out = subprocess.run([sys.executable, mod.__file__], capture_output=True, text=True)
            assert out.stdout == "sub 1\\n", out.stderr
    """))
    pytester.makeini("[pytest]\n")
    (pytester.path / ".coveragerc").write_text("[run]\npatch = subprocess\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cov=mod", "--cov-report=term-missing")
    result.assert_outcomes(passed=1)
    # line 3-4 (in_child) and 9-10 (__main__ block, run only in the subprocess) are covered; never() is not
    result.stdout.fnmatch_lines(["mod.py * 7 * 1 * 86%* 7"])


# ---- unprivileged ---------------------------------------------------------------------------------------

def _nobody_site() -> str:
    """A world-readable copy of pytest, its dependencies and our packages (the venv may sit under root's
    0700 home, where uid 65534 cannot read it). The plugin is loaded with ``-p`` (no dist-info here)."""
    import importlib
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="sandlock-nobody-site-")
    for name in ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py", "sandlock_core", "pytest_sandlock"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        src = mod.__file__
        if os.path.basename(src) == "__init__.py":
            shutil.copytree(os.path.dirname(src), os.path.join(base, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, base)
    from importlib import metadata
    for dist in ("pytest", "pluggy", "iniconfig", "packaging"):  # they read their own versions
        try:
            path = metadata.distribution(dist)._path
        except Exception:
            continue
        shutil.copytree(path, os.path.join(base, os.path.basename(path)))
    for root, dirs, files in os.walk(base):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return base


def test_plugin_as_an_unprivileged_user(tmp_path_factory):
    import shutil
    import subprocess
    import tempfile
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
            pytest.skip("needs setpriv and /usr/bin/python3 to drop to uid 65534")
        site = _nobody_site()
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/env",
                f"PYTHONPATH={site}", "HOME=/tmp", "/usr/bin/python3", "-B"]
    else:
        argv = [sys.executable]
    proj = tempfile.mkdtemp(prefix="sandlock-nobody-proj-")
    os.chmod(proj, 0o777)
    with open(os.path.join(proj, "test_np.py"), "w") as f:
        f.write(PROBE + textwrap.dedent(f"""
            import os, subprocess, pytest

            @pytest.mark.sandbox(fs_readable={SYS_ARG}, fs_writable=["{{tmp_path}}"])
            def test_confined_as_nobody(tmp_path):
                assert os.geteuid() != 0 or {os.geteuid() != 0}
                assert _confined()
                (tmp_path / "x").write_text("ok")
                r = subprocess.run(["cat", "/etc/hostname"], capture_output=True, text=True)
                assert r.returncode != 0
                assert 0, "show the denials"
        """))
    os.chmod(os.path.join(proj, "test_np.py"), 0o644)
    try:
        r = subprocess.run([*argv, "-m", "pytest", "-p", "pytest_sandlock.plugin", "-p", "no:cacheprovider",
                            "-rA", f"--basetemp={proj}/bt", proj], capture_output=True, text=True, cwd=proj,
                           timeout=120)
    finally:
        shutil.rmtree(proj, ignore_errors=True)
        if os.geteuid() == 0:
            shutil.rmtree(site, ignore_errors=True)
    out = r.stdout + r.stderr
    assert "1 failed" in out, out
    assert "AssertionError: show the denials" in out, out
    assert re.search(r"openat \[read\]\s+/etc/hostname\s+EACCES\s+pid \d+ \(cat\)", out), out


# ---- policy_fn through the marker ------------------------------------------------------------------------

def test_policy_fn_marker_denies_and_audits(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import subprocess, pytest

        def on_event(event, ctx):
            if event.syscall == "execve" and event.argv_contains("false"):
                return True                 # deny
            if event.syscall == "execve":
                return "audit"              # allow, flag in the report
            return 0

        @pytest.mark.sandbox(fs_readable={SYS_ARG}, policy_fn=on_event)
        def test_gated():
            assert subprocess.run(["true"]).returncode == 0
            with pytest.raises(PermissionError):
                subprocess.run(["false"])
            assert False, "show the report"

        @pytest.mark.sandbox(policy_fn="not callable")
        def test_bad():
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(failed=1, errors=1)
    out = result.stdout.str()
    assert "show the report" in out
    assert "sandlock audit" in out and "execve" in out
    assert "must be callable" in out
