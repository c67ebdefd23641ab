"""Worker mode (``--sandlock-worker``): tests with the session policy run, fixtures and all, in one long-lived
confined worker. End to end through pytester (``runpytest_subprocess``), real confinement, exact outcomes."""
from __future__ import annotations

import json
import os
import re
import textwrap
import xml.etree.ElementTree as ET

import pytest

import sandlock_core

pytestmark = pytest.mark.skipif(sandlock_core.landlock_abi_version() < 1, reason="Landlock is not available")

SYS = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]

# Each test logs "<event> <pid> <confined>" to LOG (writable under the profile): which process ran what.
HEAD = textwrap.dedent("""
    import ctypes as _ctypes, os, pytest

    LOG = os.environ["WORKER_LOG"]

    def _confined():
        prctl = _ctypes.CDLL(None).prctl
        return prctl(21, 0, 0, 0, 0) == 2 and prctl(39, 0, 0, 0, 0) == 1

    def log(event):
        with open(LOG, "a") as f:
            f.write(f"{event} {os.getpid()} {int(_confined())}\\n")
""")


@pytest.fixture
def project(pytester, tmp_path, monkeypatch):
    """A profile restricting the filesystem (the log directory writable) and the log's path in the env."""
    logdir = tmp_path / "log"
    logdir.mkdir()
    monkeypatch.setenv("WORKER_LOG", str(logdir / "events"))
    prof = pytester.path / "ci.toml"
    prof.write_text(f"fs_readable = {json.dumps(SYS)}\nfs_writable = {json.dumps([str(logdir)])}\n")
    return prof, logdir / "events"


def events(path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    return [(e, int(p), int(c)) for e, p, c in (line.split() for line in path.read_text().splitlines())]


def run(pytester, prof, *args, **kw):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-rA",
                                         f"--sandlock-profile={prof}", "--sandlock-worker", *args, **kw)


def test_help_and_header(pytester, project):
    out = pytester.runpytest_subprocess("--help").stdout.str()
    assert "--sandlock-worker" in out and "sandlock_worker" in out
    pytester.makepyfile("def test_a():\n    pass\n")
    result = run(pytester, project[0])
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandlock: worker mode (--sandlock-worker): *"])


def test_outcomes_fixtures_and_one_process(pytester, project):
    prof, log = project
    pytester.makepyfile(test_one=HEAD + textwrap.dedent("""
        @pytest.fixture(scope="session")
        def sess():
            log("session-setup")
            yield
            log("session-teardown")

        @pytest.fixture(scope="module")
        def mod(sess):
            log("module-setup")
            yield
            log("module-teardown")

        def test_pass(mod):
            log("test")

        def test_fail(mod):
            x = 1
            assert x == 2, "rewritten"

        def test_skip(mod):
            pytest.skip("not today")

        @pytest.mark.xfail(reason="known")
        def test_xfail(mod):
            assert 0

        def test_output(mod, capsys):
            print("to stdout")
            log("test")
            assert 0
    """), test_two=HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod2():
            log("module2-setup")
            yield
            log("module2-teardown")

        def test_other(mod2, tmp_path):
            (tmp_path / "f").write_text("x")
            log("test")
    """))
    result = run(pytester, prof)
    result.assert_outcomes(passed=2, failed=2, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*AssertionError: rewritten", "*assert 1 == 2*"])
    result.stdout.fnmatch_lines(["*- Captured stdout call -*", "to stdout"])
    result.stdout.fnmatch_lines(["SKIPPED * not today", "XFAIL *test_xfail*known*"])
    ev = events(log)
    names = [e for e, _, _ in ev]
    assert names == ["session-setup", "module-setup", "test", "test", "module-teardown", "module2-setup", "test",
                     "module2-teardown", "session-teardown"], ev
    assert len({p for _, p, _ in ev}) == 1 and all(c for _, _, c in ev)   # one confined worker did it all
    assert ev[0][1] != result.ret and ev[0][1] != os.getpid()


def test_denials_are_per_test_and_in_junit(pytester, project):
    prof, log = project
    pytester.makepyfile(test_d=HEAD + textwrap.dedent("""
        def test_denied():
            with open("/etc/hostname") as f:
                f.read()

        def test_clean():
            assert True

        def test_denied_again():
            with open("/etc/hostname") as f:   # the same denial again: a new window, counted again
                f.read()
    """))
    result = run(pytester, prof, "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert out.count("- sandlock denials -") == 2, out
    result.stdout.fnmatch_lines(["FAILED *test_denied - [[]sandlock: 1 denied[]] Permission*",
                                 "FAILED *test_denied_again - [[]sandlock: 1 denied[]] Permission*"])
    result.stdout.re_match_lines([r"  openat \[read\]  /etc/hostname +EACCES  pid \d+ \(python\S*\) +"
                                  r"-> fs_readable \+= \['/etc/hostname'\]"])
    junit = ET.parse(pytester.path / "junit.xml")
    props = {tc.get("name"): {p.get("name"): p.get("value") for p in tc.iter("property")}
             for tc in junit.iter("testcase")}
    assert "sandlock_denials" not in props["test_clean"], props
    for name in ("test_denied", "test_denied_again"):
        data = json.loads(props[name]["sandlock_denials"])
        assert [(d["detail"], d["count"], d["source"]) for d in data] == [("/etc/hostname", 1, "landlock")]
    assert "test_denied (1)" in out and "test_denied_again (1)" in out


def test_segfault_fails_the_test_and_a_new_worker_takes_over(pytester, project):
    prof, log = project
    pytester.makepyfile(test_s=HEAD + textwrap.dedent("""
        import signal

        @pytest.fixture(scope="session")
        def sess():
            log("session-setup")
            yield
            log("session-teardown")

        def test_before(sess):
            log("test")

        def test_segv(sess):
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_after(sess):
            log("test")

        def test_after2(sess):
            log("test")
    """))
    result = run(pytester, prof, "-p", "no:faulthandler")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*was killed by SIGSEGV (Segmentation fault)*",
                                 "FAILED *test_segv - Failed: the confined worker*"])
    result.stdout.fnmatch_lines(["worker mode: 4 tests ran in 2 confined workers"])
    ev = events(log)
    assert [e for e, _, _ in ev] == ["session-setup", "test", "session-setup", "test", "test",
                                     "session-teardown"], ev
    assert ev[0][1] != ev[2][1] and ev[2][1] == ev[3][1] == ev[5][1]   # a second worker after the crash


def test_timeout_kills_the_worker_not_the_session(pytester, project):
    pytest.importorskip("pytest_timeout")
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        import time

        def test_hang():
            time.sleep(300)

        def test_after():
            log("test")

        @pytest.mark.timeout(1)
        def test_hang_marker():
            time.sleep(300)

        def test_after_marker():
            log("test")
    """))
    result = run(pytester, prof, "--sandlock-timeout", "2", timeout=60)
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines(["*Timeout (>2s) from sandlock_timeout: sandlock killed*"])
    result.stdout.fnmatch_lines(["*Timeout (>1s) from pytest-timeout: sandlock killed*"])
    assert result.duration < 30
    assert [e for e, _, _ in events(log)] == ["test", "test"]


def test_marker_tests_fall_back_to_fork_mode(pytester, project):
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod():
            log("module-setup")
            yield
            log("module-teardown")

        def test_w1(mod):
            log("w")

        @pytest.mark.sandbox(max_open_files=200)   # another policy: fork mode, fixtures in pytest
        def test_fork(mod):
            log("f")

        @pytest.mark.sandbox()                     # changes nothing: still the worker
        def test_w2(mod):
            log("w")

        @pytest.mark.no_sandbox
        def test_unconfined(mod):
            log("u")

        def test_w3(mod):
            log("w")
    """))
    result = run(pytester, prof)
    result.assert_outcomes(passed=5)
    ev = events(log)
    worker = {p for e, p, _ in ev if e == "w"}
    assert len(worker) == 1 and all(c for e, _, c in ev if e in ("w", "f")), ev
    fork = [p for e, p, _ in ev if e == "f"]
    assert fork[0] not in worker
    unconfined = [(p, c) for e, p, c in ev if e == "u"]
    assert unconfined[0][1] == 0 and unconfined[0][0] not in worker
    # the module fixture: once in the worker, once in pytest (for the fork-mode and the unconfined test)
    setups = [p for e, p, _ in ev if e == "module-setup"]
    assert len(setups) == 2 and setups[0] in worker and setups[1] not in worker, ev
    assert [e for e, _, _ in ev].count("module-teardown") == 2


def test_session_policy_with_per_test_semantics_turns_worker_mode_off(pytester, project):
    prof, _ = project
    prof.write_text(prof.read_text() + "random_seed = 7\n")
    pytester.makepyfile(HEAD + "def test_a():\n    assert _confined()\n")
    result = run(pytester, prof)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandlock: worker mode off (the session policy has per-test semantics: "
                                 "random_seed)"])


def test_off_and_not_loaded(pytester, project):
    prof, _ = project
    pytester.makepyfile(HEAD + "def test_a():\n    assert not _confined()\n")
    run(pytester, prof, "--sandlock-off").assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nsandlock_worker = true\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:sandlock")
    result.assert_outcomes(passed=1)


def test_ini_and_xdist(pytester, project):
    pytest.importorskip("xdist")
    prof, log = project
    pytester.makeini(f"[pytest]\nsandlock_worker = true\nsandlock_profile = {prof}\n")
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.mark.parametrize("i", range(8))
        def test_many(i):
            log(f"test-{os.environ.get('PYTEST_XDIST_WORKER')}")
            assert _confined()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=8)
    ev = events(log)
    assert len(ev) == 8
    by_xdist: dict[str, set] = {}
    for e, p, _ in ev:
        by_xdist.setdefault(e, set()).add(p)
    # one sandlock worker per xdist worker, never shared
    assert all(len(pids) == 1 for pids in by_xdist.values()), by_xdist
    assert len(set.union(*by_xdist.values())) == len(by_xdist)


def test_coverage_of_worker_tests_is_collected(pytester, project):
    pytest.importorskip("pytest_cov")
    prof, _ = project
    pytester.makepyfile(mod_under_test=textwrap.dedent("""
        def covered():
            return 1

        def not_covered():
            return 2
    """))
    pytester.makepyfile(test_cov="from mod_under_test import covered\n\ndef test_c():\n    assert covered() == 1\n")
    result = run(pytester, prof, "--cov=mod_under_test", "--cov-report=term-missing")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"mod_under_test\.py\s+4\s+1\s+75%\s+5"])
    assert not re.search(r"sandlock: coverage", result.stderr.str() + result.stdout.str())


def test_fork_mode_child_holds_none_of_the_workers_fds(pytester, project):
    """A fork-mode test forked while a worker runs: no seccomp listener (it would answer the worker's syscalls)
    and no pidfd of the worker's sandbox."""
    prof, _ = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        def test_w1():
            pass

        @pytest.mark.sandbox(fs_readable=["/proc"])
        def test_fork():
            kinds = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            assert not [k for k in kinds if "seccomp" in k or "pidfd" in k], kinds

        def test_w2():
            pass
    """))
    run(pytester, prof).assert_outcomes(passed=3)


def test_pytest_exit_in_the_worker_ends_the_session_after_its_teardowns(pytester, project):
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod():
            yield
            log("module-teardown")

        def test_1(mod):
            pass

        def test_exit(mod):
            pytest.exit("enough", returncode=3)

        def test_never(mod):
            log("never")
    """))
    result = run(pytester, prof)
    assert result.ret == 3
    result.stdout.fnmatch_lines(["*Exit: enough*"])
    assert [e for e, _, _ in events(log)] == ["module-teardown"]   # the finish command ran it in the worker


def test_stop_on_first_failure_still_tears_down_in_the_worker(pytester, project):
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod():
            yield
            log("module-teardown")

        def test_fail(mod):
            assert 0

        def test_never(mod):
            log("never")
    """))
    result = run(pytester, prof, "-x")
    result.assert_outcomes(failed=1)
    assert [e for e, _, _ in events(log)] == ["module-teardown"]


def test_keyboard_interrupt_in_the_worker_interrupts_the_session(pytester, project):
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        def test_1():
            pass

        def test_interrupt():
            raise KeyboardInterrupt

        def test_never():
            log("never")
    """))
    result = run(pytester, prof)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert events(log) == []


def test_the_worker_dies_with_pytest(pytester, project):
    import signal
    import subprocess
    import sys
    import time
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        import time

        def test_sleep():
            log("sleeping")
            time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--sandlock-profile={prof}",
                             "--sandlock-worker"], cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not events(log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events(log), "the worker test never started"
        pid = events(log)[0][1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the confined worker outlived pytest"
    finally:
        proc.kill()
        proc.wait(10)


def test_a_worker_that_cannot_start_turns_worker_mode_off(pytester, project):
    prof, log = project
    pytester.makeconftest("import pytest_sandlock._worker as W\nW.worker_main = lambda *args: 3\n")
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod():
            log("module-setup")
            yield

        @pytest.mark.parametrize("i", range(3))
        def test_t(mod, i):
            log("test")
            assert _confined()
    """))
    result = run(pytester, prof)
    result.assert_outcomes(passed=3, warnings=1)
    result.stdout.fnmatch_lines(["*sandlock: worker mode off, tests run in fork mode: the worker could not start: "
                                 "the confined test process exited with status 3*"])
    ev = events(log)
    assert [e for e, _, _ in ev] == ["module-setup", "test", "test", "test"], ev
    assert not ev[0][2] and len({p for e, p, _ in ev if e == "test"}) == 3   # fixtures in pytest, a fork each


def test_fork_mode_after_a_worker_crash(pytester, project):
    """After a crash the dead worker's fd numbers are reused: a fork-mode child must not close them."""
    prof, log = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        import signal

        def test_segv():
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.sandbox(max_open_files=200)
        def test_fork():
            log("fork")

        def test_worker():
            log("worker")
    """))
    result = run(pytester, prof, "-p", "no:faulthandler")
    result.assert_outcomes(passed=2, failed=1)
    assert [(e, c) for e, _, c in events(log)] == [("fork", 1), ("worker", 1)]



def test_a_teardown_error_at_the_end_of_the_session_is_reported(pytester, project):
    """-x stops the session while the worker keeps the module fixture: the finish command tears it down, and
    its error is a warning (never lost)."""
    prof, _ = project
    pytester.makepyfile(HEAD + textwrap.dedent("""
        @pytest.fixture(scope="module")
        def mod():
            yield
            raise RuntimeError("teardown boom")

        def test_fail(mod):
            assert 0

        def test_never(mod):
            pass
    """))
    result = run(pytester, prof, "-x")
    result.assert_outcomes(failed=1, warnings=1)
    result.stdout.fnmatch_lines(["*sandlock: the confined worker's teardowns at the end of the session: "
                                 "RuntimeError: teardown boom*"])
