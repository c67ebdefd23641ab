"""COW fork and map-reduce: Sandbox(policy, init_fn, work_fn).fork(n), Sandbox(p).reduce(cmd, clones)."""
from __future__ import annotations

import os
import time

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.forking import ForkError

SYS = ["/usr", "/lib", "/lib64", "/bin", "/etc"]
STATE = {}


def _init():
    STATE["data"] = list(range(100))


def _work(i):
    print(sum(STATE["data"][i::4]), os.environ["CLONE_ID"])


def test_fork_clone_ids_and_outputs():
    with Sandbox(Policy(fs_readable=SYS), init_fn=_init, work_fn=_work) as sb:
        clones = sb.fork(4)
        assert len(clones) == 4 and clones.success
        assert [c.clone_id for c in clones] == [0, 1, 2, 3]
        assert [c.stdout for c in clones] == [f"{sum(range(i, 100, 4))} {i}\n".encode() for i in range(4)]
        assert len({c.pid for c in clones}) == 4 and sb._template.pid not in {c.pid for c in clones}
        # the template serves again (init_fn ran once: the clones see the same state)
        again = sb.fork(2)
        assert [c.stdout.split()[1] for c in again] == [b"0", b"1"]


def test_reduce_feeds_clone_outputs_to_reducer():
    mapper = Sandbox(Policy(fs_readable=SYS), init_fn=_init, work_fn=_work)
    clones = mapper.fork(4)
    reducer = Sandbox(Policy(fs_readable=SYS))
    r = reducer.reduce(["python3", "-c", "import sys; print(sum(int(l.split()[0]) for l in sys.stdin))"], clones)
    assert r.success and r.stdout == b"4950\n"
    mapper.close()


def test_clones_inherit_confinement(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")

    def work(i):
        try:
            open(secret).read()
            print("read")
        except PermissionError:
            print("denied")

    with Sandbox(Policy(fs_readable=SYS), work_fn=work) as sb:
        assert [c.stdout for c in sb.fork(3)] == [b"denied\n"] * 3


def test_exit_codes_and_exceptions():
    def work(i):
        if i == 1:
            raise RuntimeError("boom")
        if i == 2:
            os.kill(os.getpid(), 9)
        return 5 if i == 3 else None

    with Sandbox(Policy(), work_fn=work) as sb:
        res = sb.fork(4)
        assert [c.exit_code for c in res] == [0, 1, -9, 5]
        assert not res.success


def test_large_output_does_not_block():
    def work(i):
        import sys
        sys.stdout.write("x" * (1 << 20))

    with Sandbox(Policy(), work_fn=work) as sb:
        res = sb.fork(3, timeout=30)
        assert [len(c.stdout) for c in res] == [1 << 20] * 3


def test_init_fn_failure_is_reported():
    def init():
        raise ValueError("no data")

    sb = Sandbox(Policy(), init_fn=init, work_fn=print)
    with pytest.raises(ForkError, match="no data"):
        sb.fork(2)
    sb.close()


def test_fork_without_work_fn_refused():
    with pytest.raises(ValueError):
        Sandbox(Policy()).fork(2)


def test_many_clones():
    def work(i):
        print(i)

    with Sandbox(Policy(fs_readable=SYS), work_fn=work) as sb:
        res = sb.fork(300)
        assert [c.stdout for c in res] == [f"{i}\n".encode() for i in range(300)]
        assert res.success


def test_clones_share_template_pages():
    """200 MiB written by init_fn in the template: a clone maps them as shared dirty pages, not private ones."""
    def init():
        STATE["blob"] = bytearray(b"\x01") * (200 << 20)

    def work(i):
        fields = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
        print(fields["Shared_Dirty"], fields["Private_Dirty"], fields["Rss"])

    with Sandbox(Policy(), init_fn=init, work_fn=work) as sb:
        res = sb.fork(3, timeout=60)
    for c in res:
        shared, private, rss = map(int, c.stdout.split())
        assert shared >= 200 * 1024          # kB: the blob is shared with the template and the other clones
        assert private < 50 * 1024           # a clone's own copies stay small


def test_timeout_kills_template_and_clones():
    def work(i):
        print(os.getpid(), flush=True)
        time.sleep(60)

    sb = Sandbox(Policy(), work_fn=work)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        sb.fork(2, timeout=0.5)
    assert time.monotonic() - start < 10
    assert sb._template._proc.result is not None  # the template (and with it every clone) is gone
    with pytest.raises(ForkError):
        sb.fork(1)
    sb.close()


def test_close_ends_template():
    sb = Sandbox(Policy(), work_fn=print)
    sb.fork(1)
    pid = sb._template.pid
    assert os.path.exists(f"/proc/{pid}")
    sb.close()
    assert not os.path.exists(f"/proc/{pid}")


def test_clone_id_in_python_and_c_environment_and_fds_closed():
    """CLONE_ID is written in place by C (no setenv per clone): Python's os.environ, libc's getenv and a
    program the clone runs all see the clone's own number. A clone's fd table is the template's plus its own
    stdout: no other clone's pipe (the batch's write ends are closed in one close_range)."""
    def work(i):
        import ctypes
        import subprocess
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        child = subprocess.run(["sh", "-c", "echo $CLONE_ID"], capture_output=True).stdout.strip().decode()
        fds = {}
        for f in os.listdir("/proc/self/fd"):
            try:
                fds[int(f)] = os.readlink(f"/proc/self/fd/{f}")
            except OSError:
                pass  # listdir's own fd, closed by now
        print(os.environ["CLONE_ID"], libc.getenv(b"CLONE_ID").decode(), child, repr(fds))

    with Sandbox(Policy(fs_readable=[*SYS, "/proc", "/dev"]), work_fn=work) as sb:
        for n in (12, 3):
            res = sb.fork(n, timeout=60)
            assert res.success, [c.stdout for c in res]
            lines = [c.stdout.decode().split(" ", 3) for c in res]
            assert [ln[:3] for ln in lines] == [[str(i)] * 3 for i in range(n)]
            tables = [eval(ln[3]) for ln in lines]
            stdouts = {t[1] for t in tables}
            assert len(stdouts) == n and all(t[1].startswith("pipe:") for t in tables)
            for t in tables:
                assert set(t) == set(tables[0])
                assert not {v for fd, v in t.items() if fd != 1} & stdouts


def test_clones_get_a_stdout_when_the_caller_closed_fd_1():
    """The template inherits no fd 1 (the caller closed its stdout): a clone's pipe may land on fd 1 itself."""
    import subprocess
    import sys
    code = ("import os, sys\n"
            "from sandlock_core import Policy, Sandbox\n"
            "os.close(1)\n"
            "with Sandbox(Policy(), work_fn=lambda i: print('clone', i)) as sb:\n"
            "    res = sb.fork(20)\n"
            "sys.stderr.write(repr(res.stdout) + ' ' + str(res.success))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    expected = b"".join(b"clone %d\n" % i for i in range(20))
    assert r.stderr.strip() == f"{expected!r} True", r.stderr
