"""The plugin's copy-on-write: ``@pytest.mark.sandbox(workdir=...)`` and the ``sandbox_changes`` fixture, end to
end through pytester (``runpytest_subprocess``: confinement cannot be undone in-process)."""
from __future__ import annotations

import json
import os
import textwrap
import xml.etree.ElementTree as ET

import pytest

import sandlock_core

pytestmark = pytest.mark.skipif(sandlock_core.landlock_abi_version() < 1, reason="Landlock is not available")

SYS = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]

# The command writes a file, modifies one, deletes one and leaves one alone.
SCRIPT = "echo new > out.txt; echo changed > edit.txt; rm gone.txt"
EXPECTED = '[Change("M", "edit.txt"), Change("D", "gone.txt"), Change("A", "out.txt")]'


def make_repo(path) -> str:
    os.makedirs(path, exist_ok=True)
    for name, text in (("keep.txt", "same\n"), ("edit.txt", "old\n"), ("gone.txt", "bye\n")):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


def tree(path) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name)) as f:
            out[name] = f.read()
    return out


ORIGINAL = {"edit.txt": "old\n", "gone.txt": "bye\n", "keep.txt": "same\n"}


def cow_test(repo: str, marker_extra: str = "", body_extra: str = "") -> str:
    return textwrap.dedent(f"""
        import subprocess
        import pytest
        from sandlock_core import Change

        @pytest.mark.sandbox(workdir={repo!r}, fs_readable={SYS!r}{marker_extra})
        def test_tool(sandbox_changes):
            subprocess.run(["sh", "-c", {SCRIPT!r}], cwd={repo!r}, check=True)
            with open({repo!r} + "/out.txt") as f:           # the test sees its own writes
                assert f.read() == "new\\n"
            assert sandbox_changes() == {EXPECTED}
            {body_extra}
    """)


def test_changes_are_listed_and_the_host_tree_is_untouched(pytester):
    repo = make_repo(pytester.path / "repo")
    pytester.makepyfile(cow_test(repo))
    result = pytester.runpytest_subprocess("-rA", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    assert tree(repo) == ORIGINAL   # default for tests: on_exit="abort"
    result.stdout.fnmatch_lines(["*- sandlock changes -*", f"under {repo}, discarded (on_exit=abort):",
                                 "  M edit.txt", "  D gone.txt", "  A out.txt"])
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "out.xml").iter("property")}
    assert json.loads(props["sandlock_changes"]) == [["M", "edit.txt"], ["D", "gone.txt"], ["A", "out.txt"]]


def test_changes_so_far_grow_during_the_test(pytester):
    repo = make_repo(pytester.path / "repo")
    pytester.makepyfile(textwrap.dedent(f"""
        import os
        import pytest
        from sandlock_core import Change

        @pytest.mark.sandbox(workdir={repo!r})
        def test_body_writes(sandbox_changes):
            assert sandbox_changes() == []
            with open({repo!r} + "/a.txt", "w") as f:         # the test body's own writes are copied on write
                f.write("a")
            assert sandbox_changes() == [Change("A", "a.txt")]
            os.unlink({repo!r} + "/keep.txt")
            assert sandbox_changes() == [Change("A", "a.txt"), Change("D", "keep.txt")]
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert tree(repo) == ORIGINAL


def test_on_exit_commit_applies_the_changes_of_a_passing_test(pytester):
    repo = make_repo(pytester.path / "repo")
    pytester.makepyfile(cow_test(repo, ', on_exit="commit"'))
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"under {repo}, committed (on_exit=commit):"])
    assert tree(repo) == {"edit.txt": "changed\n", "keep.txt": "same\n", "out.txt": "new\n"}


def test_a_failing_test_follows_on_error(pytester):
    """on_exit="commit" but the test fails: on_error (default abort) applies, and the report shows the
    changes next to the failure."""
    repo = make_repo(pytester.path / "repo")
    pytester.makepyfile(cow_test(repo, ', on_exit="commit"', body_extra="assert False, 'boom'"))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert tree(repo) == ORIGINAL
    result.stdout.fnmatch_lines(["*AssertionError: boom*", "*- sandlock changes -*",
                                 f"under {repo}, discarded (on_error=abort):", "  M edit.txt"])


def test_workdir_placeholder_tmp_path(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import subprocess
        import pytest
        from sandlock_core import Change

        @pytest.fixture
        def repo(tmp_path):
            (tmp_path / "repo").mkdir()
            (tmp_path / "repo" / "edit.txt").write_text("old\\n")
            return tmp_path / "repo"

        @pytest.mark.sandbox(workdir="{{tmp_path}}/repo", cwd="{{tmp_path}}/repo", fs_readable={SYS!r})
        def test_tool(repo, sandbox_changes):
            subprocess.run(["sh", "-c", "echo changed > edit.txt; mkdir build; echo x > build/o"], check=True)
            assert sandbox_changes() == [Change("A", "build"), Change("A", "build/o"), Change("M", "edit.txt")]

        def test_after(tmp_path_factory):
            repo = tmp_path_factory.getbasetemp() / "test_tool0" / "repo"
            assert (repo / "edit.txt").read_text() == "old\\n"
            assert sorted(p.name for p in repo.iterdir()) == ["edit.txt"]
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_sandbox_changes_needs_a_workdir(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(clean_env=True)
        def test_no_workdir(sandbox_changes):
            pass

        def test_unconfined(sandbox_changes):
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*sandbox_changes needs a workdir in the test's policy*",
                                 "*sandbox_changes needs a confined test with a workdir*"])


def test_xdist_workers_each_have_their_own_layer(pytester):
    """Two workers write the same file of the same workdir at the same time: each test sees only its own."""
    pytest.importorskip("xdist")
    repo = make_repo(pytester.path / "repo")
    pytester.makepyfile(textwrap.dedent(f"""
        import time
        import pytest
        from sandlock_core import Change

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.sandbox(workdir={repo!r})
        def test_worker(n, sandbox_changes):
            with open({repo!r} + "/edit.txt", "w") as f:
                f.write(f"test {{n}}\\n")
            time.sleep(0.3)                                  # overlap with the other worker's test
            with open({repo!r} + "/edit.txt") as f:
                assert f.read() == f"test {{n}}\\n"
            assert sandbox_changes() == [Change("M", "edit.txt")]
    """))
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=4)
    assert tree(repo) == ORIGINAL
