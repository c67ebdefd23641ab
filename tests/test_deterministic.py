"""Deterministic execution end to end: real programs (date, od, ls, touch, python3, a C program)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from sandlock_core import Policy, PolicyError, Sandbox
from sandlock_core.plan import Plan
from sandlock_core import syscalls

PY = "/usr/bin/python3"
X86 = syscalls.native_arch() == "x86_64"
BASE = dict(fs_readable=["/usr", "/lib", "/lib64", "/bin", "/etc", "/dev", "/proc"], fs_writable=["/tmp"])
Y2000_06_15 = 961027200
Y2000 = 946684800
pytestmark = pytest.mark.skipif(not X86, reason="time virtualization is x86_64 only")


def sh(sb: Sandbox, script: str):
    r = sb.run(["sh", "-c", script], timeout=60)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.error)
    return r.stdout.decode()


def py(code: str) -> list[str]:
    return [PY, "-I", "-S", "-c", textwrap.dedent(code)]


@pytest.fixture(scope="module")
def cprog(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing")
    d = tmp_path_factory.mktemp("c")
    src = d / "clk.c"
    src.write_text(textwrap.dedent(r"""
        #include <stdio.h>
        #include <stdint.h>
        #include <time.h>
        #include <string.h>
        #include <sys/time.h>
        #include <sys/timerfd.h>
        #include <sys/syscall.h>
        #include <unistd.h>
        static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
        int main(int argc, char **argv) {
            struct timespec rt, co, raw, mo; struct timeval tv;
            clock_gettime(CLOCK_REALTIME, &rt);
            clock_gettime(CLOCK_REALTIME_COARSE, &co);
            clock_gettime(CLOCK_MONOTONIC, &mo);
            gettimeofday(&tv, NULL);
            time_t t = time(NULL);
            syscall(SYS_clock_gettime, CLOCK_REALTIME, &raw);
            struct timeval rtv; syscall(SYS_gettimeofday, &rtv, NULL);
            long rtime = syscall(SYS_time, NULL);
            printf("vdso %ld %ld %ld %ld\nraw %ld %ld %ld\nmono %ld\n", (long)rt.tv_sec, (long)co.tv_sec,
                   (long)tv.tv_sec, (long)t, (long)raw.tv_sec, (long)rtv.tv_sec, rtime, (long)mo.tv_sec);
            if (argc > 1) {   /* absolute realtime sleep and timerfd: one second of the sandbox clock */
                double a = now();
                struct timespec target; clock_gettime(CLOCK_REALTIME, &target); target.tv_sec += 1;
                clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &target, NULL);
                double b = now();
                int fd = timerfd_create(CLOCK_REALTIME, 0);
                struct itimerspec its; memset(&its, 0, sizeof its);
                clock_gettime(CLOCK_REALTIME, &its.it_value); its.it_value.tv_sec += 1;
                timerfd_settime(fd, TFD_TIMER_ABSTIME, &its, NULL);
                uint64_t n; read(fd, &n, sizeof n);
                printf("abs_sleep %.2f timerfd %.2f\n", b - a, now() - b);
            }
            return 0;
        }
    """))
    exe = d / "clk"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return str(exe)


# ---- time --------------------------------------------------------------------------------------------------

def test_date_prints_the_start_year():
    sb = Sandbox(Policy(**BASE, time_start="2000-06-15T00:00:00Z"))
    assert sh(sb, "date -u +%Y") == "2000\n"


def test_vdso_and_raw_syscalls_see_the_shifted_clock(cprog):
    sb = Sandbox(Policy(fs_readable=BASE["fs_readable"] + [os.path.dirname(cprog)], fs_writable=["/tmp"],
                        time_start="2000-06-15T00:00:00Z"))
    r = sb.run([cprog, "sleep"], timeout=30)
    assert r.exit_code == 0, r
    lines = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())
    for v in lines["vdso"].split() + lines["raw"].split():
        assert Y2000_06_15 - 1 <= int(v) <= Y2000_06_15 + 10, lines  # coarse clocks lag a tick
    assert int(lines["mono"]) == pytest.approx(time.monotonic(), abs=30)  # monotonic untouched
    sleep, tfd = (float(x) for x in lines["abs_sleep"].split()[0:3:2])
    assert 0.8 <= sleep <= 2.0 and 0.8 <= tfd <= 2.0, lines


def test_sleep_one_takes_a_second():
    sb = Sandbox(Policy(**BASE, time_start="2000-06-15T00:00:00Z"))
    t = time.monotonic()
    sh(sb, "sleep 1")
    assert 0.9 <= time.monotonic() - t < 3


def test_frozen_clock_does_not_advance_and_subprocesses_share_it():
    sb = Sandbox(Policy(**BASE, time_start=Y2000 + 0.25, time_freeze=True))
    out = sh(sb, f"{PY} -I -S -c 'import time; a=time.time(); time.sleep(0.2); print(a, time.time())'; date +%s")
    assert out.split() == ["946684800.25", "946684800.25", "946684800"]


def test_touch_sets_the_sandbox_now_and_normalize_mtime_shows_written_files_on_it(tmp_path):
    f = tmp_path / "touched"
    sb = Sandbox(Policy(**BASE, time_start=Y2000, time_freeze=True))
    sh(sb, f"touch {f}")
    assert os.stat(f).st_mtime == Y2000
    # a write stamps the real time: visible as such unless normalize_mtime
    g = tmp_path / "written"
    assert int(sh(sb, f"echo x > {g}; stat -c %Y {g}")) > Y2000 + 10**8
    sb = Sandbox(Policy(**BASE, time_start=Y2000, time_freeze=True, normalize_mtime=True))
    h = tmp_path / "written2"
    old = tmp_path / "old"
    old.write_text("x")
    os.utime(old, (1234567890, 1234567890))
    assert sh(sb, f"echo x > {h}; stat -c %Y {h}; stat -c %Y {old}; {PY} -I -S -c 'import os; print(int(os.stat(\"{h}\").st_mtime))'").split() == [str(Y2000), "1234567890", str(Y2000)]
    assert os.stat(h).st_mtime > Y2000 + 10**8  # the file on disk keeps its real time


def test_confined_function_sees_the_sandbox_clock(tmp_path):
    out = tmp_path / "out"

    def body():
        import subprocess as sp
        with open(out, "w") as f:
            f.write(f"{int(time.time())} {sp.run(['date', '+%Y'], capture_output=True, text=True).stdout}")

    sb = Sandbox(Policy(**BASE, time_start="2000-06-15T00:00:00Z"))
    r = sb.run_function(body, timeout=30)
    assert r.exit_code == 0, r
    t, year = out.read_text().split()
    assert Y2000_06_15 <= int(t) < Y2000_06_15 + 10 and year == "2000"


# ---- randomness, listings, host name, and the whole proof ---------------------------------------------------

PROOF = f"""
date
{PY} -I -S -c "import time,random,os,uuid; print(time.time(), random.random(), os.urandom(8).hex(), uuid.uuid4())"
od -N16 /dev/urandom
od -N16 /dev/urandom
ls -f {{d}}
{PY} -I -S -c "print(hex(id(object())), id(bytearray(100000)))"
uname -n; cat /etc/hostname
"""


def test_two_runs_are_byte_identical_and_another_seed_differs(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    for name in ("zeta", "alpha", "mid", "beta", "omega", "x1", "a2"):
        (d / name).write_text(name)
    script = PROOF.format(d=d)

    def run(seed):
        return sh(Sandbox(Policy(**BASE, time_start="2000-01-01T00:00:00Z", time_freeze=True, random_seed=seed,
                                 deterministic_dirs=True, no_randomize_memory=True, hostname="repro")), script)

    one, two, other = run(42), run(42), run(43)
    assert one == two
    assert one != other
    lines = one.splitlines()
    assert lines[0].endswith("2000") and lines[1].startswith("946684800.0 ")
    assert lines[2] != lines[4]  # each open gets its own stream
    listing = lines[6:6 + 9]
    assert listing == [".", "..", "a2", "alpha", "beta", "mid", "omega", "x1", "zeta"]
    assert lines[-2:] == ["repro", "repro"]
    # the same in the other seed's run except for the random parts
    assert other.splitlines()[6:-3] == lines[6:-3]


def test_getrandom_streams_are_per_process_and_long_reads_do_not_end():
    sb = Sandbox(Policy(**BASE, random_seed=7))
    script = f"head -c 3000000 /dev/urandom | od -A n -t x8 | tail -n 2; {PY} -I -S -c 'import os; print(os.urandom(4).hex())'; " \
             f"{PY} -I -S -c 'import os; print(os.urandom(4).hex())'"
    a, b = sh(sb, script), sh(sb, script)
    assert a == b
    lines = a.split("\n")
    assert lines[-3] != lines[-2]  # two processes, two streams


def test_uname_and_hostname_files():
    sb = Sandbox(Policy(**BASE, hostname="ci-box"))
    out = sh(sb, f"uname -n; hostname; cat /etc/hostname /proc/sys/kernel/hostname; "
                 f"{PY} -I -S -c 'import socket, os; print(socket.gethostname(), os.uname().sysname)'")
    assert out.split() == ["ci-box"] * 5 + [os.uname().sysname]


def test_sorted_listings_with_small_buffers_seek_and_rewind(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    names = [f"f{i:04d}-" + "x" * (i % 50) for i in range(700)]
    import random
    for n in random.sample(names, len(names)):
        (d / n).write_text("")
    sb = Sandbox(Policy(**BASE, deterministic_dirs=True))
    out = sh(sb, f"ls -f {d}")
    assert out.split() == [".", ".."] + sorted(names)
    code = f"""
        import os
        print(os.listdir({str(d)!r}) == sorted(os.listdir({str(d)!r})))
        fd = os.open({str(d)!r}, os.O_RDONLY)
        with os.scandir(fd) as it:
            first = [e.name for e in it]
        os.lseek(fd, 0, 0)
        with os.scandir(fd) as it:
            again = [e.name for e in it]
        print(first == again == sorted(first), len(first))
    """
    r = sb.run(py(code), timeout=30)
    assert r.stdout.decode().split() == ["True", "True", "700"], r


# ---- plumbing: what is notified, refusals, the plugin, the build example ------------------------------------

def names_of(policy):
    plan = Plan(policy)
    try:
        return set(plan.names[nr] for nr in plan.handlers)
    finally:
        plan.close()


def test_only_active_fields_are_notified():
    assert not names_of(Policy()) & {"clock_gettime", "getrandom", "getdents64", "uname", "arch_prctl"}
    assert names_of(Policy(hostname="h")) == {"uname", "open", "openat", "openat2"}
    assert names_of(Policy(deterministic_dirs=True)) == {"getdents64", "getdents"}
    assert names_of(Policy(random_seed=1)) == {"getrandom", "open", "openat", "openat2", "arch_prctl"}
    t = names_of(Policy(time_start=0))
    assert {"clock_gettime", "gettimeofday", "time", "arch_prctl", "utimensat"} <= t and "newfstatat" not in t
    assert "newfstatat" in names_of(Policy(time_start=0, normalize_mtime=True))
    with pytest.raises(PolicyError, match="normalize_mtime"):
        Policy(normalize_mtime=True)


def test_cli_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sandlock_core.cli", "run", "--time-start", "2000-06-15T00:00:00Z",
                        "--random-seed", "1", "--hostname", "h1", "-r", "/", "--", "sh", "-c",
                        "date +%Y; uname -n"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2000", "h1"]


def test_pytest_markers_time_start_and_random_seed(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import os, subprocess, time, random
        import pytest

        @pytest.mark.sandbox(fs_readable={["/usr", "/lib", "/lib64", "/bin", "/etc", "/dev", "/proc"]!r},
                             time_start="2000-06-15T00:00:00Z", random_seed=5)
        def test_body():
            assert {Y2000_06_15} <= time.time() < {Y2000_06_15} + 60
            out = subprocess.run(["date", "+%Y"], capture_output=True, text=True).stdout
            assert out == "2000\\n"
            print("RANDOM", os.urandom(8).hex(),
                  subprocess.run(["od", "-A", "n", "-N8", "-t", "x1", "/dev/urandom"], capture_output=True,
                                 text=True).stdout.strip())
    """))
    runs = [pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s") for _ in range(2)]
    for r in runs:
        r.assert_outcomes(passed=1)
    got = [[line[line.index("RANDOM"):] for line in r.stdout.lines if "RANDOM" in line] for r in runs]
    assert got[0] and got[0] == got[1]


def test_reproducible_build_example():
    if not os.path.exists("/usr/bin/python3") or subprocess.run(
            ["/usr/bin/python3", "-c", "import wheel, setuptools"], capture_output=True).returncode:
        pytest.skip("needs /usr/bin/python3 with setuptools and wheel")
    here = os.path.join(os.path.dirname(__file__), "..", "examples", "reproducible-build", "check.py")
    r = subprocess.run([sys.executable, here], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reproducible in the sandbox, not without it" in r.stdout


# ---- getrandom: the documented stream, answered in C or in Python --------------------------------------------

def documented_stream(seed: int, lineage: str, purpose: str, n: int) -> bytes:
    """The stream as the module docstring defines it (written out here, independent of the implementation)."""
    import hashlib
    out, i = b"", 0
    while len(out) < n:
        msg = seed.to_bytes(8, "little") + lineage.encode() + b"\0" + purpose.encode() + b"\0" + i.to_bytes(8, "little")
        out += hashlib.shake_256(msg).digest(4096)
        i += 1
    return out[:n]


RND_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
static void show(long r, const unsigned char *b) {
    if (r < 0) { printf("err %d\n", errno); return; }
    printf("%ld ", r);
    for (long i = 0; i < r; i++) printf("%02x", b[i]);
    printf("\n");
}
static void *in_thread(void *arg) { long n = (long)arg; unsigned char b[64]; show(syscall(SYS_getrandom, b, n, 0), b); return 0; }
int main(int argc, char **argv) {
    static unsigned char buf[1 << 17];
    void *volatile first = malloc(1); free(first);  /* glibc's malloc takes 8 bytes of getrandom for its tcache key: let it take them first */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == 't') {              /* t<n>: n bytes from another thread of this process */
            pthread_t t; pthread_create(&t, 0, in_thread, (void *)atol(a + 1)); pthread_join(t, 0);
        } else if (a[0] == 'f') {       /* f<flags>: 16 bytes with these flags */
            show(syscall(SYS_getrandom, buf, 16, strtoul(a + 1, 0, 0)), buf);
        } else if (!strcmp(a, "null")) {
            show(syscall(SYS_getrandom, NULL, 16, 0), buf);
        } else if (!strcmp(a, "readonly")) {
            unsigned char *p = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            long r = syscall(SYS_getrandom, p, 16, 0);
            printf("readonly %ld %d %d\n", r, r < 0 ? errno : 0, p[0]);
        } else if (!strcmp(a, "edge")) {  /* 16 bytes asked, the last 8 on an unmapped page */
            unsigned char *p = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            munmap(p + 4096, 4096);
            show(syscall(SYS_getrandom, p + 4088, 16, 0), p + 4088);
        } else if (a[0] == 'x') {       /* x<k>*<n>: k calls of n bytes, printed as one run */
            long k = atol(a + 1), n = atol(strchr(a, '*') + 1), total = 0;
            static unsigned char all[1 << 20];
            for (long j = 0; j < k; j++) { long r = syscall(SYS_getrandom, all + total, n, 0); if (r != n) return 3; total += r; }
            show(total, all);
        } else {
            long n = atol(a);
            show(syscall(SYS_getrandom, buf, n, 0), buf);
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def rndprog():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing")
    import tempfile
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    src, exe = os.path.join(d, "rnd.c"), os.path.join(d, "rnd")
    with open(src, "w") as f:
        f.write(RND_C)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, src], check=True)
    os.chmod(exe, 0o755)
    return exe


def rnd_run(exe, *args, seed=11):
    sb = Sandbox(Policy(fs_readable=["/usr", "/lib", "/lib64", os.path.dirname(exe)], random_seed=seed))
    r = sb.run([exe, *args], timeout=60)
    assert r.exit_code == 0, r
    return r.stdout.decode().splitlines()


def test_getrandom_bytes_are_the_documented_stream_in_every_size_and_thread(rndprog):
    # 300 x 16 bytes crosses several refills of the C slot; 5000 and 70000-byte reads go past a whole slot;
    # t16 comes from a second thread (same process, same stream); odd sizes in between
    args = ["x300*16", "1", "5000", "t16", "4095", "x7*3", "t40", "70000", "16"]
    sb = Sandbox(Policy(fs_readable=["/usr", "/lib", "/lib64", os.path.dirname(rndprog)], random_seed=11))
    r = sb.run([rndprog, *args], timeout=60)
    assert r.exit_code == 0, r
    assert r.notifications >= 300 + 9  # those answered in C are counted too
    out = r.stdout.decode().splitlines()
    assert [int(line.split()[0]) for line in out] == [4800, 1, 5000, 16, 4095, 21, 40, 70000, 16]
    got = b"".join(bytes.fromhex(line.split()[1]) for line in out)
    assert got == documented_stream(11, "r", "getrandom", 8 + len(got))[8:]  # after malloc's 8 bytes


def test_getrandom_errors_match_the_kernel(rndprog):
    args = ["f0x100", "f6", "f1", "f0x100000000", "null", "readonly", "edge", "0"]  # flags: an unsigned int
    bare = subprocess.run([rndprog, *args], capture_output=True, text=True, check=True).stdout.splitlines()
    boxed = rnd_run(rndprog, *args)
    shape = [line if line.startswith(("err", "readonly")) else line.split()[0] for line in boxed]
    assert shape == ["err 22", "err 22", "16", "16", "err 14", "readonly -1 14 0", "8", "0"]  # EINVAL, EFAULT, short
    assert shape == [line if line.startswith(("err", "readonly")) else line.split()[0] for line in bare]


def test_getrandom_stream_as_an_unprivileged_supervisor(rndprog):
    from support import run_as_nobody
    code = textwrap.dedent(f"""
        from sandlock_core import Policy, Sandbox
        r = Sandbox(Policy(fs_readable=["/usr", "/lib", "/lib64", {os.path.dirname(rndprog)!r}], random_seed=11)).run(
            [{rndprog!r}, "x300*16", "t16", "5000"], timeout=60)
        print(r.exit_code)
        print(r.stdout.decode(), end="")
    """)
    r = run_as_nobody(code)
    assert r.returncode == 0, r.stderr
    status, *lines = r.stdout.splitlines()
    assert status == "0" and [line.split()[0] for line in lines] == ["4800", "16", "5000"], r.stdout[:200]
    got = b"".join(bytes.fromhex(line.split()[1]) for line in lines)
    assert got == documented_stream(11, "r", "getrandom", 8 + len(got))[8:]


def test_fast_path_slots_are_reused_without_losing_bytes():
    """More processes than C slots: a stream that loses its slot gets its unread bytes back, in order."""
    from sandlock_core.deterministic import FastPath, Stream
    fast = FastPath(syscalls.number("getrandom"), syscalls.AUDIT_ARCH[syscalls.native_arch()])
    nslots = len(fast.owners)
    streams = [Stream(3, f"r.{i}", "getrandom") for i in range(nslots + 40)]
    got = [b""] * len(streams)
    for rnd in range(3):
        for i, s in enumerate(streams):
            fast.bind(1000 + i, s)
            fast.bind(100000 + i, s)  # a second thread of the same process
            got[i] += s.read(5 + rnd * 1000)
    for i, s in enumerate(streams):
        assert got[i] == documented_stream(3, f"r.{i}", "getrandom", len(got[i])), i
    live = {(e.tid, e.slot) for e in fast.ctx.map if e.tid not in (0, 0xFFFFFFFF)}
    want = {(tid, k) for k, tids in enumerate(fast.tids) for tid in tids}
    assert live == want and len(want) == 2 * nslots  # only the slot owners' threads are mapped
    for k, owner in enumerate(fast.owners):
        assert owner.slot is not None and fast.slot_of[id(owner)] == k


# ---- legacy "now" timestamps, through the metadata guard or on their own ------------------------------------

TOUCH_LEGACY = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
out = []
for name, nr, args in [("utimes", {utimes}, lambda p: (p, None)),
                       ("futimesat", {futimesat}, lambda p: (-100, p, None)),
                       ("futimesat_fd", {futimesat}, None),
                       ("utime", {utime}, lambda p: (p, None)),
                       ("utimensat", {utimensat}, lambda p: (-100, p, None, 0))]:
    path = os.path.join(sys.argv[1], name).encode()
    if args is None:  # futimesat(fd, NULL, NULL): the fd itself
        fd = os.open(path, os.O_RDONLY)
        r = libc.syscall(nr, fd, None, None)
        os.close(fd)
    else:
        r = libc.syscall(nr, *args(path))
    out.append(f"{{name}}={{r if r == 0 else -ctypes.get_errno()}}")
print(" ".join(out))
"""


def legacy_code():
    nums = {n: syscalls.number(n) for n in ("utimes", "futimesat", "utime", "utimensat")}
    return TOUCH_LEGACY.format(**nums)


@pytest.mark.parametrize("fs_rules", [True, False], ids=["metadata-guard", "no-fs-rules"])
def test_legacy_utimes_futimesat_utime_with_null_times_follow_the_sandbox_clock(fs_rules):
    import tempfile
    d = tempfile.mkdtemp()
    names = ("utimes", "futimesat", "futimesat_fd", "utime", "utimensat")
    for name in names:
        with open(os.path.join(d, name), "w") as f:
            f.write("x")
    fs = dict(fs_readable=BASE["fs_readable"], fs_writable=[d]) if fs_rules else {}
    sb = Sandbox(Policy(**fs, time_start=Y2000, time_freeze=True))
    r = sb.run([PY, "-I", "-S", "-c", legacy_code(), d], timeout=60)
    assert r.exit_code == 0, r
    assert r.stdout.decode().split() == [f"{n}=0" for n in names]
    for name in names:
        st = os.stat(os.path.join(d, name))
        assert st.st_mtime == Y2000 and st.st_atime == Y2000, name
    # explicit times are still the program's own (the metadata guard or the kernel sets them)
    r = sb.run([PY, "-I", "-S", "-c", f"import os; os.utime({os.path.join(d, 'utimes')!r}, (5, 7))"], timeout=60)
    assert r.exit_code == 0 and os.stat(os.path.join(d, "utimes")).st_mtime == 7, r


def test_now_timestamps_outside_the_writable_trees_are_refused_as_nobody():
    """time_start must not open a way around the metadata guard: "now" on a read-only tree is EACCES."""
    import tempfile
    from support import run_as_nobody
    ro, rw = tempfile.mkdtemp(), tempfile.mkdtemp()
    for d in (ro, rw):
        os.chmod(d, 0o777)
        for name in ("utimes", "futimesat", "futimesat_fd", "utime", "utimensat"):
            p = os.path.join(d, name)
            with open(p, "w") as f:
                f.write("x")
            os.chmod(p, 0o666)
            os.chown(p, 65534, 65534)
            os.utime(p, (1000, 1000))
    code = textwrap.dedent(f"""
        import sys
        from sandlock_core import Policy, Sandbox
        sb = Sandbox(Policy(fs_readable={BASE['fs_readable'] + [ro]!r}, fs_writable=[{rw!r}], time_start={Y2000},
                            time_freeze=True))
        for d in ({ro!r}, {rw!r}):
            r = sb.run([{PY!r}, "-I", "-S", "-c", sys.argv[1], d], timeout=60)
            print(r.exit_code, r.stdout.decode().strip())
    """)
    r = run_as_nobody(code, legacy_code())
    assert r.returncode == 0, r.stderr
    ro_line, rw_line = r.stdout.splitlines()
    assert ro_line == "0 utimes=-13 futimesat=-13 futimesat_fd=-13 utime=-13 utimensat=-13"
    assert rw_line == "0 utimes=0 futimesat=0 futimesat_fd=0 utime=0 utimensat=0"
    for name in ("utimes", "futimesat", "futimesat_fd", "utime", "utimensat"):
        assert os.stat(os.path.join(ro, name)).st_mtime == 1000
        assert os.stat(os.path.join(rw, name)).st_mtime == Y2000


LEGACY_GETDENTS = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
buf = ctypes.create_string_buffer(int(sys.argv[2]))
for rnd in range(2):  # twice: rewinding starts a fresh sorted listing
    got = []
    while True:
        r = libc.syscall({nr}, fd, buf, len(buf))
        if r < 0:
            print("err", ctypes.get_errno()); sys.exit(0)
        if r == 0:
            break
        data, off = buf.raw[:r], 0
        while off < r:
            ino, _doff, reclen = struct.unpack_from("<QQH", data, off)
            name = data[off + 18:off + reclen].split(b"\\0", 1)[0].decode()
            got.append(f"{{name}}:{{data[off + reclen - 1]}}")
            off += reclen
    print(" ".join(got))
    os.lseek(fd, 0, 0)
"""


def test_legacy_getdents_is_sorted_too(tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    names = [f"n{i:03d}" + "y" * (i % 13) for i in range(120)]
    import random
    for name in random.sample(names, len(names)):
        (d / name).write_text("")
    (d / "sub").mkdir()
    os.symlink("n000", d / "link")
    code = LEGACY_GETDENTS.format(nr=syscalls.number("getdents"))
    bare = subprocess.run([PY, "-I", "-S", "-c", code, str(d), "512"], capture_output=True, text=True, check=True)
    bare_entries = bare.stdout.split("\n")[0].split()
    assert sorted(bare_entries) != bare_entries  # the kernel's own order is not sorted here
    sb = Sandbox(Policy(**BASE, deterministic_dirs=True))
    r = sb.run([PY, "-I", "-S", "-c", code, str(d), "512"], timeout=30)
    assert r.exit_code == 0, r
    first, again = r.stdout.decode().splitlines()
    boxed = first.split()
    assert boxed == sorted(bare_entries, key=lambda e: e.split(":")[0].encode()) and again == first
    types = dict(e.split(":") for e in boxed)
    assert (types["sub"], types["link"], types["n000"]) == ("4", "10", "8")  # DT_DIR, DT_LNK, DT_REG
    r = sb.run([PY, "-I", "-S", "-c", code, str(d), "16"], timeout=30)  # too small for one record: EINVAL
    assert r.stdout.decode().split() == ["err", "22"], r


def test_pipeline_stages_of_one_sandbox_each_get_their_own_run_state(rndprog):
    """Each stage is a run with its own supervisor: its root is ``r`` of its own lineage and clock."""
    sb = Sandbox(Policy(fs_readable=["/usr", "/lib", "/lib64", "/bin", os.path.dirname(rndprog)], random_seed=11,
                        time_start=Y2000, time_freeze=True))
    r = (sb.cmd([rndprog, "16"]) | sb.cmd(["cat"])).run(timeout=60)
    assert r.exit_code == 0, r
    count, hexdata = r.stdout.decode().split()
    assert bytes.fromhex(hexdata) == documented_stream(11, "r", "getrandom", 24)[8:]


def test_c_fast_path_only_when_getrandom_has_no_other_handler():
    """Another handler on getrandom (a user's, or a mechanism's) keeps every call in the Python chain."""
    def fast_of(**kw):
        plan = Plan(Policy(random_seed=1), **kw)
        sup = plan.make_supervisor(-1, 0)
        try:
            return sup.recv_fast
        finally:
            sup.close()
            plan.close()

    assert fast_of() is not None
    assert fast_of(handlers={"getrandom": lambda sup, n: None}) is None


def test_more_processes_than_c_slots_stay_deterministic(rndprog):
    """300 processes, each reading twice: slots are taken over round robin, bytes are never lost or shared."""
    script = f"i=0; while [ $i -lt 300 ]; do {rndprog} 16 16; i=$((i+1)); done"
    sb = Sandbox(Policy(fs_readable=["/usr", "/lib", "/lib64", "/bin", os.path.dirname(rndprog)], random_seed=3))
    one, two = sh(sb, script), sh(sb, script)
    assert one == two
    lines = one.split()
    values = lines[1::2]
    assert len(values) == 600 and len(set(values)) == 600
    for k in range(300):  # the k-th child of the shell is r.k; 8 bytes go to its malloc first
        assert bytes.fromhex(values[2 * k] + values[2 * k + 1]) == documented_stream(3, f"r.{k}", "getrandom", 40)[8:]


def test_touch_inside_a_chroot_changes_the_file_the_child_names(tmp_path):
    """Without the metadata guard (mount namespaces), "now" is set on the object looked up from the child's
    root: /tmp/x inside the chroot, never the host's /tmp/x; read-only mounts still refuse."""
    import test_chroot
    if test_chroot._userns_works() is not None:
        pytest.skip(test_chroot._userns_works())
    root = test_chroot.make_root(str(tmp_path / "root"), test_chroot.PROGS)
    inside = os.path.join(root, "tmp", "stamp")
    host = "/tmp/stamp"
    for p in (inside, host):
        with open(p, "w") as f:
            f.write("x")
        os.utime(p, (1000, 1000))
    try:
        sb = Sandbox(Policy(chroot=root, fs_readable=[root], fs_writable=[os.path.join(root, "tmp")],
                            time_start=Y2000, time_freeze=True))
        r = sb.run(["/bin/sh", "-c", "touch /tmp/stamp; cd /tmp && touch ../tmp/stamp; touch /etc/marker"], timeout=60)
        assert b"touch: cannot touch '/etc/marker': Read-only file system" in r.stderr, r
        assert os.stat(inside).st_mtime == Y2000
        assert os.stat(host).st_mtime == 1000
    finally:
        os.unlink(host)
