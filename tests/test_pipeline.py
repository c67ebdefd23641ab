"""Pipelines (Sandbox.cmd, |) and a running sandbox (popen, Process, pause/resume/kill, context manager)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from sandlock_core import ExitReason, Policy, Sandbox
from sandlock_core.pipeline import Pipeline, PipelineResult, Stage

SYS = ["/usr", "/lib", "/lib64", "/bin", "/etc"]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def datadir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "secret.csv").write_text("secret,value\n")
    os.chmod(tmp_path, 0o755)
    return d


# ---- pipelines ----
def test_stage_or_builds_pipeline():
    a, b, c = (Sandbox(Policy()).cmd(["true"]) for _ in range(3))
    p = a | b | c
    assert isinstance(p, Pipeline) and len(p) == 3 and all(isinstance(s, Stage) for s in p.stages)
    with pytest.raises(ValueError):
        Sandbox(Policy()).cmd([])


def test_each_stage_has_its_own_policy(datadir):
    trusted = Policy(fs_readable=[*SYS, str(datadir)])
    restricted = Policy(fs_readable=SYS)
    r = (Sandbox(trusted).cmd(["cat", str(datadir / "secret.csv")]) | Sandbox(restricted).cmd(["tr", "a-z", "A-Z"])).run()
    assert isinstance(r, PipelineResult)
    assert r.success and r.stdout == b"SECRET,VALUE\n"
    # the restricted stage cannot read the data itself
    r = (Sandbox(restricted).cmd(["cat", str(datadir / "secret.csv")]) | Sandbox(restricted).cmd(["tr", "a-z", "A-Z"])).run()
    assert r.stdout == b""
    assert r.stages[0].exit_code == 1 and b"Permission denied" in r.stages[0].stderr
    assert r.stages[1].success and r.success  # the result is the last stage's status (no pipefail)
    assert not r.all_succeeded


def test_three_stages_and_stage_statuses():
    sb = Sandbox(Policy(fs_readable=SYS))
    r = (sb.cmd(["sh", "-c", "echo b; echo a; echo c; echo oops >&2; exit 4"]) | sb.cmd(["sort"])
         | sb.cmd(["sh", "-c", "cat; exit 7"])).run()
    assert r.stdout == b"a\nb\nc\n"
    assert [s.exit_code for s in r.stages] == [4, 0, 7]
    assert r.exit_code == 7 and not r.success
    assert r.stages[0].stderr == b"oops\n" and r.stderr == b""


def test_pipeline_data_not_copied_by_parent():
    # 64 MiB through a pipe between stages; only the last stage's few bytes reach the parent.
    sb = Sandbox(Policy(fs_readable=[*SYS, "/dev"]))
    r = (sb.cmd(["head", "-c", str(64 << 20), "/dev/zero"]) | sb.cmd(["wc", "-c"])).run(timeout=30)
    assert r.success and r.stdout.strip() == str(64 << 20).encode()


def test_pipeline_stdin_bytes():
    sb = Sandbox(Policy(fs_readable=SYS))
    r = (sb.cmd(["tr", "a-z", "A-Z"]) | sb.cmd(["rev"])).run(stdin=b"hello\n")
    assert r.stdout == b"OLLEH\n"


def test_one_timeout_covers_all_stages():
    sb = Sandbox(Policy(fs_readable=SYS))
    t = time.monotonic()
    r = (sb.cmd(["sleep", "30"]) | sb.cmd(["cat"]) | sb.cmd(["sleep", "30"])).run(timeout=0.5)
    assert time.monotonic() - t < 5
    assert r.reason is ExitReason.TIMEOUT and not r.success
    assert all(s.reason is ExitReason.TIMEOUT for s in r.stages)


def test_setup_failure_of_a_stage():
    sb = Sandbox(Policy(fs_readable=SYS))
    r = (sb.cmd(["/nonexistent/cmd"]) | sb.cmd(["cat"])).run(timeout=10)
    assert r.stages[0].reason is ExitReason.SETUP_FAILED and r.stages[0].exit_code == 127
    assert r.success  # cat saw EOF


# ---- popen / Process ----
def test_popen_streams_and_wait():
    with Sandbox(Policy(fs_readable=SYS)) as sb:
        p = sb.popen(["sh", "-c", "read x; echo got $x; echo err >&2; exit 3"])
        assert p.pid > 0 and sb.pid == p.pid
        p.stdin.write(b"hi\n")
        p.stdin.close()
        assert p.stdout.read() == b"got hi\n"
        assert p.stderr.read() == b"err\n"
        assert p.wait(timeout=10) == 3
        assert p.result.exit_code == 3 and p.returncode == 3
        assert sb.pid is None


def test_popen_streaming_line_by_line():
    with Sandbox(Policy(fs_readable=SYS)) as sb:
        p = sb.popen(["cat"], stderr=None)
        for word in (b"one\n", b"two\n"):
            p.stdin.write(word)
            assert p.stdout.readline() == word  # answered before stdin is closed: streaming
        p.stdin.close()
        assert p.wait(10) == 0


def test_popen_communicate_and_timeout():
    sb = Sandbox(Policy(fs_readable=SYS))
    p = sb.popen(["tr", "a-z", "A-Z"])
    assert p.communicate(b"abc", timeout=10) == (b"ABC", b"")
    p = sb.popen(["sleep", "30"])
    with pytest.raises(TimeoutError):
        p.wait(timeout=0.2)
    out, err = p.communicate(timeout=0.3)
    assert p.result.reason is ExitReason.TIMEOUT
    sb.close()


def test_pause_resume_kill():
    sb = Sandbox(Policy(fs_readable=SYS))
    p = sb.popen(["sh", "-c", "sleep 30 & while true; do sleep 0.05; done"], stdout=-3, stderr=-3)
    time.sleep(0.3)
    sb.pause()
    from sandlock_core.process import sandbox_pids
    pids = sandbox_pids(p._reaper)
    assert len(pids) >= 2
    time.sleep(0.1)
    assert all(_state(pid) == "T" for pid in pids)
    p.resume()
    time.sleep(0.1)
    assert _state(p.pid) != "T"
    sb.kill()
    assert p.wait(10) == -signal.SIGKILL and p.result.reason is ExitReason.KILLED
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    with pytest.raises(RuntimeError):
        sb.pause()
    with pytest.raises(RuntimeError):
        p.resume()


def test_context_manager_ends_everything():
    with Sandbox(Policy(fs_readable=SYS)) as sb:
        p1 = sb.popen(["sleep", "30"])
        p2 = sb.popen(["sh", "-c", "sleep 30 & sleep 30"])
        time.sleep(0.2)
        from sandlock_core.process import sandbox_pids
        pids = [p1.pid, *sandbox_pids(p2._reaper)]
    assert p1.result is not None and p2.result is not None
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def test_process_context_manager_and_exec_failure():
    sb = Sandbox(Policy(fs_readable=SYS))
    with sb.popen(["sleep", "30"]) as p:
        pass
    assert p.result.reason is ExitReason.KILLED
    p = sb.popen(["/no/such/binary"])
    assert p.wait(10) == 127 and p.result.reason is ExitReason.SETUP_FAILED
    sb.close()
