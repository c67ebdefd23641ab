"""Each way to ask for confinement. Run: pytest (from examples/pytest-demo)."""
import os
import subprocess
import sys
import time

import pytest


def confined() -> bool:
    """prctl(PR_GET_SECCOMP) == 2 under a seccomp filter (no file access needed)."""
    import ctypes
    return ctypes.CDLL(None).prctl(21, 0, 0, 0, 0) == 2


# 1. A marker on one test; placeholders expand per test. The subprocess sees the sandbox's clock.
@pytest.mark.sandbox(fs_readable=["/usr", "/lib", "/etc"], fs_writable=["{tmp_path}"], net_allow_hosts=[],
                     time_start="2000-01-01T00:00:00Z", random_seed=42)
def test_tool(tmp_path):
    out = subprocess.run(["date", "+%Y"], capture_output=True, text=True).stdout
    assert out == "2000\n"
    (tmp_path / "report.txt").write_text("written inside the sandbox")


# 2. The sandbox fixture: a Sandbox for the test's effective policy.
@pytest.mark.sandbox(fs_readable=["/usr", "/lib"])
def test_explicit(sandbox):
    result = sandbox.run(["cat", "/etc/shadow"])
    assert result.exit_code != 0


# 3. Every process the test starts is confined, in any language.
@pytest.mark.sandbox(fs_readable=["/usr", "/lib"])
def test_python_and_shell_children_are_confined():
    assert confined()
    sh = subprocess.run(["sh", "-c", "cat /etc/hostname"], capture_output=True, text=True)
    assert sh.returncode != 0 and "Permission denied" in sh.stderr
    py = subprocess.run([sys.executable, "-c", "open('/etc/hostname')"], capture_output=True, text=True)
    assert "PermissionError" in py.stderr


# 4. A class marker applies to every method; a method marker refines it; sandbox(False) opts out.
@pytest.mark.sandbox(clean_env=True)
class TestClassMarker:
    def test_clean_environment(self):
        assert confined() and "PYTEST_CURRENT_TEST" not in os.environ or set(os.environ) <= {
            "PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG", "PYTEST_CURRENT_TEST", "TMPDIR"}

    @pytest.mark.sandbox(max_open_files=32)
    def test_refined(self, sandbox_policy):
        import resource
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 32
        assert sandbox_policy.clean_env            # from the class marker

    @pytest.mark.sandbox(False)
    def test_opted_out(self):
        assert not confined()


# 5. Seeds: one seed for test data and sandboxed randomness; printed in the summary for replay.
@pytest.mark.sandbox(random_seed=True)               # True: the test's seed (from --sandlock-seed)
def test_seeded(sandlock_seed, sandbox_faker, sandbox_policy):
    assert sandbox_policy.random_seed == sandlock_seed
    assert sandbox_faker.name()                      # the same name for the same seed


# 6. No marker: runs as usual (unless --sandlock-profile / --sandlock).
def test_unmarked(pytestconfig):
    assert confined() == bool(pytestconfig.getoption("sandlock_profile"))


@pytest.mark.no_sandbox
def test_never_confined():
    assert not confined()


# 7. Timeouts kill the whole sandboxed tree (pytest-timeout's marker works too).
@pytest.mark.sandbox(clean_env=True)
@pytest.mark.xfail(reason="demonstrates a timeout: the sandbox kills the test and its children", strict=True)
@pytest.mark.timeout(1)
def test_hangs():
    subprocess.Popen(["sleep", "60"])
    time.sleep(60)
