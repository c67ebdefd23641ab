"""Cost of the deterministic mechanisms: clock reads (patched vDSO) and seeded randomness (preload, supervisor).

    .venv/bin/python benchmarks/deterministic.py [--clock N] [--urandom N] [--rounds R]

Python loops run in a child Python (``/usr/bin/python3 -I -S``) that times itself, bare and inside the
sandbox (``time_start`` for the clock, ``random_seed`` for ``os.urandom(16)``: libc's getrandom, served in
the process by the preloaded ``_seedrand.so``; and the same loop started through ``env -u LD_PRELOAD``, where
every call is a supervisor round trip); the reference is one supervisor round trip: ``os.getppid`` notified
and answered CONTINUE by a Python handler, the same loop. The C rows time libc ``getrandom(buf, 16, 0)``
(preloaded) and the raw ``syscall(SYS_getrandom, buf, 16, 0)`` (supervisor, answered in C) against raw
``getppid`` notified and answered CONTINUE (as ``benchmarks/notif.py`` does), without the Python loop around
them. Runs are interleaved (bare, sandbox, round trip, ...) R times; the table gives medians, per call in
microseconds, and the load average.
Targets: clock reads under 5x bare (no supervisor round trip); ``os.urandom(16)`` no dearer than one
supervisor round trip (met by the preload: a fraction of a microsecond, cheaper than bare, whose getrandom is
a real syscall here; glibc 2.36 has no vDSO getrandom).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sandlock_core import Policy, Sandbox  # noqa: E402
from sandlock_core.notif import CONTINUE  # noqa: E402

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
LOOP = """
import time, os, sys
n = int(sys.argv[2]); what = sys.argv[1]
f = {"clock": time.time, "urandom": lambda: os.urandom(16), "getppid": os.getppid}[what]
best = None
for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
        f()
    d = time.perf_counter() - t
    best = d if best is None or d < best else best
print(best / n * 1e6)
"""
C_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]); char mode = argv[1][0];
    char buf[16]; struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (mode == 'r') syscall(SYS_getrandom, buf, 16, 0);
        else if (mode == 'l') getrandom(buf, 16, 0);
        else syscall(SYS_getppid);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.4f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1000.0);
    return 0;
}
"""
RO = ["/usr", "/lib", "/lib64", "/bin", "/etc", "/tmp"]


def run(cmd: list[str], sandbox: Sandbox | None) -> float:
    if sandbox is None:
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    r = sandbox.run(cmd, timeout=600)
    assert r.exit_code == 0, r
    return float(r.stdout)


def interleaved(rounds: int, cases: dict[str, tuple[list[str], Sandbox | None]]) -> dict[str, float]:
    got: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (cmd, sb) in cases.items():
            got[name].append(run(cmd, sb))
    return {k: statistics.median(v) for k, v in got.items()}


def c_loop() -> tuple[str, str] | None:
    if shutil.which("gcc") is None:
        return None
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    src, exe = os.path.join(d, "loop.c"), os.path.join(d, "loop")
    with open(src, "w") as f:
        f.write(C_LOOP)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return d, exe


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clock", type=int, default=1_000_000)
    ap.add_argument("--urandom", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    py = lambda what, n: [PY, "-I", "-S", "-c", LOOP, what, str(n)]  # noqa: E731
    before = load()
    clock = interleaved(a.rounds, {
        "bare": (py("clock", a.clock), None),
        "time_start": (py("clock", a.clock), Sandbox(Policy(fs_readable=RO, time_start="2000-01-01T00:00:00Z"))),
        "frozen": (py("clock", a.clock), Sandbox(Policy(fs_readable=RO, time_start="2000-01-01T00:00:00Z",
                                                        time_freeze=True))),
    })
    rt_box = Sandbox(Policy(fs_readable=RO), handlers={"getppid": lambda sup, n: CONTINUE})
    seeded = Sandbox(Policy(fs_readable=RO, random_seed=42))
    rnd = interleaved(a.rounds, {
        "bare": (py("urandom", a.urandom), None),
        "random_seed": (py("urandom", a.urandom), seeded),
        "no preload": (["/usr/bin/env", "-u", "LD_PRELOAD"] + py("urandom", a.urandom), seeded),
        "round trip": (py("getppid", a.urandom), rt_box),
    })
    built = c_loop()
    if built is not None:
        d, exe = built
        c_ro = Policy(fs_readable=RO + [d], random_seed=42)
        crnd = interleaved(a.rounds, {
            "getrandom": ([exe, "r", str(a.urandom)], Sandbox(c_ro)),
            "libc": ([exe, "l", str(a.urandom)], Sandbox(c_ro)),
            "round trip": ([exe, "p", str(a.urandom)],
                           Sandbox(Policy(fs_readable=RO + [d]), handlers={"getppid": lambda sup, n: CONTINUE})),
        })
    print(f"medians of {a.rounds} interleaved runs; {before} before, {load()} after\n")
    print("| loop | policy | bare µs/call | sandbox µs/call | ratio |")
    print("|---|---|---|---|---|")
    for pol in ("time_start", "frozen"):
        name = "time_start + time_freeze" if pol == "frozen" else pol
        print(f"| time.time() x{a.clock:,} | {name} | {clock['bare']:.3f} | {clock[pol]:.3f} | "
              f"{clock[pol] / clock['bare']:.2f}x |")
    print(f"| os.urandom(16) x{a.urandom:,} | random_seed | {rnd['bare']:.3f} | {rnd['random_seed']:.3f} | "
          f"{rnd['random_seed'] / rnd['bare']:.2f}x |")
    print(f"| os.urandom(16) x{a.urandom:,} | random_seed, without the preload | {rnd['bare']:.3f} | "
          f"{rnd['no preload']:.3f} | {rnd['no preload'] / rnd['bare']:.2f}x |")
    print(f"\none supervisor round trip (os.getppid notified, CONTINUE): {rnd['round trip']:.2f} µs; "
          f"os.urandom(16) in the sandbox: {rnd['random_seed']:.2f} µs = {rnd['random_seed'] / rnd['round trip']:.2f} "
          f"round trips (without the preload: {rnd['no preload']:.2f} µs = "
          f"{rnd['no preload'] / rnd['round trip']:.2f})")
    if built is not None:
        print(f"C loop: libc getrandom(16) {crnd['libc']:.2f} µs (preload) = "
              f"{crnd['libc'] / crnd['round trip']:.2f} round trips; raw syscall getrandom(16) "
              f"{crnd['getrandom']:.2f} µs (supervisor) = {crnd['getrandom'] / crnd['round trip']:.2f} round trips; "
              f"getppid notified (CONTINUE) {crnd['round trip']:.2f} µs")


if __name__ == "__main__":
    main()
