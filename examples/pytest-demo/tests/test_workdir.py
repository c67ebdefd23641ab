"""Copy-on-write: run a command against a COW view of a tree and assert on exactly what it changed."""
import subprocess

import pytest
from sandlock_core import Change


@pytest.fixture
def project(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "setup.cfg").write_text("[metadata]\nname = demo\nversion = 1.0\n")
    (repo / "build").mkdir()
    (repo / "build" / "stale.o").write_text("old object")
    return repo


# 8. workdir=: the test body and every process it starts see a copy-on-write view of the tree; writes land in
#    a private upper layer, and the tree itself is left as it was (on_exit="commit" would apply them).
#    sandbox_changes() lists what changed so far, contents compared: A added, M modified, D deleted.
@pytest.mark.sandbox(workdir="{tmp_path}/project", cwd="{tmp_path}/project")
def test_release_script_changes_exactly_this(project, sandbox_changes):
    subprocess.run(["sh", "-c", "sed -i s/1.0/1.1/ setup.cfg && rm -r build && echo 1.1 > CHANGELOG"], check=True)
    assert sandbox_changes() == [Change("A", "CHANGELOG"), Change("D", "build"), Change("D", "build/stale.o"),
                                 Change("M", "setup.cfg")]
    assert (project / "setup.cfg").read_text().endswith("version = 1.1\n")   # the test sees its own writes
