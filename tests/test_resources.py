"""max_memory, max_processes, max_cpu: real programs under the limits (see sandlock_core/resources.py)."""
import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from sandlock_core import Policy, Sandbox, syscalls
from sandlock_core.plan import Plan
from sandlock_core.sandbox import ExitReason
from support import run_as_nobody

PY = ["/usr/bin/python3", "-I", "-S", "-c"]
MiB = 1 << 20


def run(policy, code, timeout=60, **kw):
    return Sandbox(policy).run([*PY, code], timeout=timeout, **kw)


# ---- memory ----
def test_python_allocating_200mib_under_64m_is_stopped_and_the_result_says_why():
    r = run(Policy(max_memory="64M"), "bytearray(200 << 20)")
    assert not r.success and r.exit_code == 1
    assert b"MemoryError" in r.stderr
    assert r.reason is ExitReason.MEMORY and "max_memory 64.0 MiB" in r.error
    assert any(d.syscall == "mmap" and d.errno == errno.ENOMEM for d in r.denials)
    assert r.peak_memory is not None and r.peak_memory <= 64 * MiB


def test_the_same_program_under_512m_succeeds():
    r = run(Policy(max_memory="512M"), "b = bytearray(200 << 20); print(len(b))")
    assert r.success and r.stdout == b"209715200\n"
    assert r.reason is ExitReason.EXITED and 200 * MiB <= r.peak_memory <= 512 * MiB


def test_mmap_gets_enomem_that_the_program_can_handle():
    code = """
import mmap
held = []
try:
    while True:
        m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.write(b"x" * (8 << 20))
        held.append(m)
except OSError as e:
    print(e.errno, len(held))
"""
    r = run(Policy(max_memory="64M"), code)
    assert r.success
    err, n = r.stdout.split()
    assert int(err) == errno.ENOMEM and 3 <= int(n) <= 7


def test_mmap_munmap_laundering_fails(tmp_path):
    """Mapping and unmapping a big file (never charged) must not make room for more anonymous memory."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(256 * MiB)
    code = f"""
import mmap, os
a = mmap.mmap(-1, 40 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 40 << 20, 4096):
    a[i] = 1
fd = os.open({str(big)!r}, os.O_RDONLY)
for _ in range(8):
    m = mmap.mmap(fd, 256 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    m.close()
try:
    b = mmap.mmap(-1, 40 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    print("laundered")
except OSError as e:
    print("refused", e.errno)
a.close()
c = mmap.mmap(-1, 40 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # munmap credited: fits again
print("after munmap ok")
"""
    r = run(Policy(max_memory="64M"), code)
    assert r.stdout == f"refused {errno.ENOMEM}\nafter munmap ok\n".encode(), r.stderr


def test_map_unmap_pairs_far_beyond_the_limit_fit_and_what_is_held_is_bounded():
    """munmap is not notified: the ledger only grows, and near the limit the kernel's measure replaces it, so
    10,000 private 64 KiB map/unmap pairs (625 MiB in all) fit in 64M, and holding memory still stops at it."""
    code = """
import mmap
for i in range(10000):
    m = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m[0] = 1; m.close()
held = []
try:
    for i in range(100):
        m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); m[0] = 1; held.append(m)
except OSError as e:
    print(len(held), e.errno)
"""
    r = run(Policy(max_memory="64M"), code)
    n, err = r.stdout.split()
    assert 4 <= int(n) <= 7 and int(err) == errno.ENOMEM, r.stderr


def test_the_ledger_counts_every_approval_until_measured():
    """Far from the limit requests are approved on the ledger alone: it must hold all of them (40 x 1 MiB held
    shows in the peak even though statm is read at most every limit/16 of approvals)."""
    r = run(Policy(max_memory="512M"), "x = [bytearray(1 << 20) for _ in range(40)]")
    assert r.success and 40 * MiB <= r.peak_memory <= 512 * MiB, (r.peak_memory, r.stderr)


def test_many_processes_far_from_their_own_measure_still_add_up_to_the_limit():
    """Eight processes each take 4 MiB chunks while the others do too: what they report holding together never
    exceeds the limit. Each holds its chunks until every one has reported or died (a fixed sleep is not enough on
    a loaded machine: a process that let go early made room for the others and the sum went over)."""
    code = """
import mmap, os, sys
r, w = os.pipe()
release_r, release_w = os.pipe()
kids = []
for k in range(8):
    pid = os.fork()
    if pid == 0:
        os.close(release_w)
        held = []
        try:
            for i in range(20):
                m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                for j in range(0, 4 << 20, 4096):
                    m[j] = 1
                held.append(m)
        except OSError:
            pass
        os.write(w, bytes([len(held)]))
        os.close(w)
        os.read(release_r, 1)  # hold it while the others allocate: until the parent lets go (EOF)
        os._exit(0)
    kids.append(pid)
os.close(w)
os.close(release_r)
got = b""
while len(got) < 8:
    chunk = os.read(r, 8 - len(got))
    if not chunk:
        break
    got += chunk
os.close(release_w)
print(sum(got) * 4, len(got))
"""
    r = run(Policy(max_memory="256M"), code)
    held, reported = (int(x) for x in r.stdout.split())
    assert 0 < held <= 256 and reported >= 1, (r.stdout, r.stderr)


def test_brk_growth_is_limited_and_failure_returns_the_old_break():
    """sbrk over the limit fails cleanly (brk answers the current break, as the kernel does), no crash."""
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
before = libc.sbrk(0)
r = libc.sbrk(100 << 20)
print(r == ctypes.c_void_p(-1).value, ctypes.get_errno(), libc.sbrk(0) == before)
ok = libc.sbrk(1 << 20)
print(ok == before)
"""
    r = Sandbox(Policy(max_memory="64M")).run(["/usr/bin/python3", "-I", "-c", code], timeout=60)
    assert r.stdout == f"True {errno.ENOMEM} True\nTrue\n".encode(), r.stderr


def test_exec_and_exit_credit_the_ledger():
    code = """
import os, subprocess, sys
x = bytearray(40 << 20)
for i in range(4):   # each child needs 40 MiB too: only fits once the previous one exited
    assert subprocess.run([sys.executable, "-I", "-S", "-c", "bytearray(40 << 20)"]).returncode == 0
del x
os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "bytearray(50 << 20); print('exec ok')"])
"""
    r = run(Policy(max_memory="100M"), code)
    assert r.success and r.stdout == b"exec ok\n", r.stderr


def test_a_grandchild_over_the_limit_gets_memoryerror_and_its_parent_survives():
    code = """
import subprocess, sys
p = subprocess.run(["/bin/sh", "-c", sys.executable + " -I -S -c 'bytearray(300 << 20)'"], capture_output=True)
print(p.returncode, b"MemoryError" in p.stderr)
"""
    r = run(Policy(max_memory="128M"), code)
    assert r.success and r.stdout == b"1 True\n"


@pytest.fixture(scope="module")
def big_bss(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    d = tmp_path_factory.mktemp("bss")
    src = d / "big.c"
    src.write_text("#include <string.h>\nstatic char big[300 << 20];\n"
                   "int main(void) { memset(big, 1, sizeof big); return big[12345] - 1; }\n")
    subprocess.run([cc, "-O0", "-o", str(d / "big"), str(src)], check=True)
    os.chmod(d, 0o755)
    return str(d / "big")


def test_a_grandchild_that_cannot_be_refused_is_killed_and_its_parent_survives(big_bss):
    """A program whose image (300 MiB of bss, mapped by the kernel at exec) does not fit: no allocation could
    fail, so that process (only) is SIGKILLed."""
    code = f"""
import subprocess
p = subprocess.run(["/bin/sh", "-c", "{big_bss}; echo sh-saw $?"], capture_output=True)
print(p.stdout.decode().strip(), p.returncode)
"""
    r = run(Policy(max_memory="128M"), code)
    assert r.success and r.stdout == b"sh-saw 137 0\n", r.stderr
    assert any(d.syscall == "memory" and "killed" in d.detail for d in r.denials)
    bare = subprocess.run([big_bss])
    assert bare.returncode == 0


def test_memory_limit_as_an_unprivileged_user():
    code = """
from sandlock_core import Policy, Sandbox
r = Sandbox(Policy(max_memory="64M")).run(["/usr/bin/python3", "-I", "-S", "-c", "bytearray(200 << 20)"])
print(r.reason.value, r.exit_code, b"MemoryError" in r.stderr)
"""
    p = run_as_nobody(code)
    assert p.stdout == "memory 1 True\n", p.stderr


# ---- processes ----
FORKS = """
import os, time
kids, err = [], None
for i in range(20):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
print(len(kids), err)
"""


def test_concurrent_processes_are_counted_exactly():
    r = run(Policy(max_processes=10), FORKS)
    assert r.stdout == f"9 {errno.EAGAIN}\n".encode()  # the root + 9 children
    assert any(d.syscall == "fork" and d.errno == errno.EAGAIN for d in r.denials)


def test_a_fork_bomb_under_10_is_contained_and_the_sandbox_ends_cleanly():
    r = Sandbox(Policy(max_processes=10)).run(["/bin/sh", "-c", "b() { b | b & }; b; sleep 1; echo done"],
                                              timeout=60)
    assert r.reason is ExitReason.EXITED and r.success and r.stdout == b"done\n"
    assert b"Cannot fork" in r.stderr


def test_ten_sequential_short_children_under_2_all_succeed():
    r = Sandbox(Policy(max_processes=2)).run(
        ["/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/echo $i || exit 1; done"], timeout=60)
    assert r.success and r.stdout.split() == [str(i).encode() for i in range(1, 11)]
    assert r.processes == 11


def test_explicit_P_on_the_command_line_is_enforced():
    code = FORKS.replace("range(20)", "range(5)")
    r = subprocess.run([sys.executable, "-m", "sandlock_core.cli", "run", "-P", "3", "--", *PY, code],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == f"2 {errno.EAGAIN}\n", r.stderr  # the root + 2 children


def test_the_default_of_64_is_enforced_only_with_other_limits():
    """Documented choice: enforcing the default alone would put a supervisor behind every sandbox, so
    Policy() does not count processes; with max_memory or max_cpu (supervised anyway) the 64 applies."""
    code = FORKS.replace("range(20)", "range(70)")
    assert not Plan(Policy()).want_listener
    assert run(Policy(), code).stdout == b"70 None\n"
    assert run(Policy(max_memory="4G"), code).stdout == f"63 {errno.EAGAIN}\n".encode()


def test_exits_free_slots_and_threads_are_not_counted():
    code = """
import os, subprocess, sys, threading
ts = [threading.Thread(target=lambda: None) for _ in range(20)]
[t.start() for t in ts]; [t.join() for t in ts]
for _ in range(5):
    assert subprocess.run(["/bin/true"]).returncode == 0
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("ok")
"""
    r = run(Policy(max_processes=2), code)
    assert r.success and r.stdout == b"ok\n", r.stderr


def test_detached_processes_count_too():
    code = """
import os, time
if os.fork() == 0:          # a child that detaches a sleeper (session leader, reparented to the reaper)
    os.setsid()
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
os.wait()
if os.fork() == 0:          # root + sleeper + this one: 3
    time.sleep(30)
try:
    os.fork()
    print("forked")
except OSError as e:
    print(e.errno)
"""
    r = run(Policy(max_processes=3), code)
    assert r.stdout == f"{errno.EAGAIN}\n".encode()


def test_process_limit_as_an_unprivileged_user():
    code = f"""
from sandlock_core import Policy, Sandbox
r = Sandbox(Policy(max_processes=10)).run(["/usr/bin/python3", "-I", "-S", "-c", {FORKS!r}], timeout=60)
print(r.stdout.decode().strip())
"""
    p = run_as_nobody(code)
    assert p.stdout == f"9 {errno.EAGAIN}\n", p.stderr


# ---- CPU ----
BUSY = """
import time
t0 = time.monotonic(); c0 = time.process_time()
while time.monotonic() - t0 < 3:
    pass
print((time.process_time() - c0) / (time.monotonic() - t0))
"""


# isolate_pids: a pid namespace where the kernel allows it (its init is not throttled, nor counted)
@pytest.mark.parametrize("pids", [False, True], ids=["plain", "isolate_pids"])
def test_a_busy_loop_under_25_percent_gets_15_to_35_percent_of_a_core(pids):
    r = run(Policy(max_cpu=25, isolate_pids=pids), BUSY)
    share = float(r.stdout)
    assert 0.15 <= share <= 0.35, share
    assert 0.15 <= r.cpu_time / r.wall_time <= 0.35


def test_the_throttle_reaches_processes_that_left_the_group():
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    t0 = time.monotonic(); c0 = time.process_time()
    while time.monotonic() - t0 < 3:
        pass
    print(time.process_time() - c0, flush=True)
    os._exit(0)
os.wait()
"""
    r = run(Policy(max_cpu=25), code)
    assert 0.0 < float(r.stdout) <= 3 * 0.35


def _state_and_ticks(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("pids", [False, True], ids=["plain", "isolate_pids"])
@pytest.mark.parametrize("via", ["sandbox", "process"])
def test_pause_wins_over_the_cpu_throttle(via, pids):
    """The throttle SIGCONTs what it stopped every ~100 ms at 25 %: a paused sandbox must stay stopped (and
    use no CPU) over many such cycles, and run again after resume()."""
    sb = Sandbox(Policy(max_cpu=25, isolate_pids=pids))
    proc = sb.popen([*PY, "while True: pass"])
    ctl = sb if via == "sandbox" else proc
    try:
        for _ in range(200):  # until it has run (and been throttled) a little
            if _state_and_ticks(proc.pid)[1] >= 5:
                break
            time.sleep(0.02)
        ctl.pause()
        time.sleep(0.05)
        _, before = _state_and_ticks(proc.pid)
        for _ in range(30):
            time.sleep(0.05)
            state, ticks = _state_and_ticks(proc.pid)
            assert state == "T", "the throttle resumed a paused sandbox"
        assert ticks == before
        ctl.resume()
        for _ in range(250):
            if _state_and_ticks(proc.pid)[1] > before:
                break
            time.sleep(0.02)
        assert _state_and_ticks(proc.pid)[1] > before
    finally:
        proc.kill()
        proc.wait()


# ---- figures and costs ----
def test_result_figures():
    r = run(Policy(max_memory="256M", max_processes=8), "import os; os.waitpid(os.fork(), 0) if True else 0")
    assert r.success and r.processes == 2 and r.peak_memory > 0 and r.cpu_time is not None and r.wall_time > 0
    plain = run(Policy(), "sum(range(10**6))")
    assert plain.cpu_time is not None and plain.cpu_time >= 0 and plain.peak_memory is None


def test_only_the_fields_set_are_notified():
    assert not Plan(Policy()).want_listener  # the default max_processes costs nothing
    names = set(Plan(Policy(max_processes=10)).names.values())
    assert {"clone", "fork", "vfork"} <= names and "mmap" not in names
    names = set(Plan(Policy(max_memory="1G")).names.values())
    assert {"mmap", "brk", "mremap", "mprotect", "shmget", "clone"} <= names and "munmap" not in names
    assert not Plan(Policy(max_cpu=50)).names.keys() - set(Plan(Policy(max_processes=10)).names)


def test_only_memory_requests_that_can_grow_reach_the_supervisor():
    """Read-only mappings, mprotect to read-only and brk(0) are let through by the filter; a run that makes
    1000 of each is notified no more than one that makes none. A handler of another mechanism (here a user
    handler) on mmap makes every mmap notified again."""
    code = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
for i in range(int(sys.argv[1])):
    p = libc.mmap(None, 1 << 16, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    libc.mprotect(ctypes.c_void_p(p), 1 << 16, mmap.PROT_READ)
    libc.munmap(ctypes.c_void_p(p), 1 << 16)
    libc.syscall(NR_BRK, 0)  # brk(0)
""".replace("NR_BRK", str(syscalls.number("brk")))
    sb = Sandbox(Policy(max_memory="256M"))
    none, many = (sb.run([*PY, code, k]) for k in ("0", "1000"))
    assert none.success and many.success, many.stderr
    assert many.notifications - none.notifications < 50, (none.notifications, many.notifications)
    seen = []
    watched = Sandbox(Policy(max_memory="256M"), handlers={"mmap": lambda sup, n: seen.append(1)})
    assert watched.run([*PY, code, "1000"]).success and len(seen) >= 1000


def test_anonymous_shared_memory_is_measured_and_credited_at_munmap():
    """mmap.mmap(-1, n) is MAP_SHARED|MAP_ANONYMOUS (not in statm data): 10,000 map/unmap pairs fit in 64M, and
    what is held is limited."""
    code = """
import mmap
for i in range(10000):
    m = mmap.mmap(-1, 1 << 16); m[0] = 1; m.close()
held = []
try:
    for i in range(100):
        m = mmap.mmap(-1, 8 << 20); m[0] = 1; held.append(m)
except OSError as e:
    print(len(held), e.errno)
"""
    r = run(Policy(max_memory="64M"), code)
    n, err = r.stdout.split()
    assert 4 <= int(n) <= 7 and int(err) == errno.ENOMEM, r.stderr
