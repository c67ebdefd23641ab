"""Load and faults: many sandboxes from one process, and the supervisor killed under them."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from sandlock_core import Policy, Sandbox
from support import still_running

from .helpers import SYSTEM_RO


def census() -> dict:
    """What a run could leak into the caller: fds, threads, zombie (or any) children, temp entries."""
    children = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                if int(fields[1]) == os.getpid():
                    children.append((int(pid), fields[0]))
            except OSError:
                pass
    tmp = tempfile.gettempdir()  # a private directory per test (see the private_tmp fixture)
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")), "children": children,
            "tmp": set(os.listdir(tmp))}


def settle(before: dict, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        after = census()
        ok = (after["fds"] <= before["fds"] and after["threads"] <= before["threads"]
              and after["os_threads"] <= before["os_threads"] and not after["children"]
              and after["tmp"] <= before["tmp"])
        if ok or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def assert_no_leaks(before: dict, after: dict):
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"] and after["os_threads"] <= before["os_threads"], (before, after)
    assert not after["children"], after["children"]
    assert after["tmp"] <= before["tmp"], after["tmp"] - before["tmp"]


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Temp files of this process land in a directory nobody else uses, so they can be counted exactly."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def policies(tmp_path):
    os.chmod(tmp_path, 0o755)
    return [Policy(), Policy(fs_readable=SYSTEM_RO, fs_denied=[str(tmp_path / "x")]),
            Policy(net_allow_hosts=["127.0.0.1"]), Policy(fs_readable=SYSTEM_RO, isolate_signals=True,
                                                          isolate_ipc=True)]


def test_1000_sequential_sandboxes_leak_nothing(policies):
    sbs = [Sandbox(p) for p in policies]
    for sb in sbs:
        sb.run(["true"])
    before = census()
    for i in range(1000):
        res = sbs[i % len(sbs)].run(["true"])
        assert res.exit_code == 0, res
    for sb in sbs:
        sb.close()
    assert_no_leaks(before, settle(before))


def test_50_concurrent_sandboxes_leak_nothing(policies):
    Sandbox(policies[1]).run(["true"])
    before = census()
    results, errors = [], []

    def one(i):
        try:
            with Sandbox(policies[i % len(policies)]) as sb:
                res = sb.run(["sh", "-c", f"sleep 0.2; echo {i}"], timeout=60)
                results.append((i, res.exit_code, res.stdout))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, f"Sandbox use from {len(errors)} threads raised: {errors[:3]}"
    assert sorted(results) == [(i, 0, f"{i}\n".encode()) for i in range(50)]
    assert_no_leaks(before, settle(before))


SUPERVISOR = """
import sys
sys.path[:0] = [{root!r}]
from sandlock_core import Policy, Sandbox
policy = {policy}
# a child, a grandchild, a setsid'd double-forked daemon, and one that ignores SIGHUP/SIGTERM
Sandbox(policy).run(["sh", "-c",
    "sleep 60 & echo $! >> {pids}; "
    "(setsid sh -c 'sleep 60 & echo $! >> {pids}; wait') & "
    "(trap '' HUP TERM; sleep 60 & echo $! >> {pids}; wait) & "
    "echo $$ >> {pids}; wait"])
"""


@pytest.mark.parametrize("policy", ["Policy()", "Policy(fs_denied=['/nonexistent-x'])",
                                    "Policy(net_allow_hosts=['127.0.0.1'])", "Policy(isolate_signals=True)"])
def test_sigkill_of_the_supervisor_kills_every_sandboxed_process_within_1s(tmp_path, policy):
    pidfile = tmp_path / "pids"
    root = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR.format(root=root, policy=policy, pids=str(pidfile))])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(pidfile.read_text().split() if pidfile.exists() else []) < 4:
        time.sleep(0.05)
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 4, pids
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    alive = still_running(pids, 1.0)
    try:
        assert not alive, f"still running 1 s after the supervisor died: {alive}"
    finally:
        for p in alive:
            try:
                os.kill(p, 9)
            except OSError:
                pass


COW_SUPERVISOR = """
import sys
sys.path[:0] = [{root!r}]
from sandlock_core import Policy, Sandbox
RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if __import__("os").path.exists(p)]
sb = Sandbox(Policy(workdir={w!r}, fs_storage={s!r}, fs_readable=RO, cwd={w!r}))
sb.run([sys.executable, "-I", "-S", "-c",
        "for i in range({n}):\\n    open(f'f{{i}}', 'wb').write(b'N' * {size})"])
"""


@pytest.mark.parametrize("kill_after", [0, 150])
def test_cow_commit_interrupted_by_sigkill_is_per_file_atomic_and_the_upper_survives(tmp_path, kill_after):
    """SIGKILL of the supervisor in the middle of the commit: every workdir file is wholly old or wholly new,
    and the upper (in fs_storage) still holds every new file in full."""
    try:
        Policy(workdir=str(tmp_path))
        from sandlock_core.plan import check_supported
        check_supported(Policy(workdir=str(tmp_path)))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"copy-on-write workdir unavailable: {exc}")
    n, size = 300, 256 * 1024
    w, s = tmp_path / "w", tmp_path / "s"
    w.mkdir()
    for i in range(n):
        (w / f"f{i}").write_bytes(b"O" * size)
    root = os.path.dirname(os.path.dirname(__import__("sandlock_core").__file__))
    proc = subprocess.Popen([sys.executable, "-c", COW_SUPERVISOR.format(root=root, w=str(w), s=str(s), n=n,
                                                                          size=size)])
    # the commit goes through names in sorted order: kill once the kill_after-th of them is in
    first = w / sorted(f"f{i}" for i in range(n))[kill_after]
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with open(first, "rb") as f:
                if f.read(1) == b"N":
                    break
    finally:
        proc.kill()
        proc.wait()
    states = {}
    for i in range(n):
        data = (w / f"f{i}").read_bytes()
        assert data in (b"O" * size, b"N" * size), f"f{i}: {len(data)} bytes, {set(data)}"
        states[i] = data[:1].decode()
    new = sum(1 for v in states.values() if v == "N")
    assert new >= 1, "the commit never started"
    if new < n:  # interrupted: the upper must still have everything
        uppers = list(s.glob("branch-*/upper"))
        assert len(uppers) == 1, uppers
        for i in range(n):
            assert (uppers[0] / f"f{i}").read_bytes() == b"N" * size, f"upper f{i}"
