"""Cost of resource limits and the virtual /proc.

1. ``python3 -c "import json, sqlite3"`` under ``-m 512M -P 64 --num-cpus 2 --isolate-pids`` vs bare
   (``Sandbox.run`` vs ``subprocess.run``), interleaved rounds, medians. Target: within 1.3x of bare.
2. 10,000 ``mmap``/``munmap`` pairs (private anonymous, 64 KiB, one page touched) under ``-m 512M`` vs bare,
   timed inside the program (the loop only), medians over rounds.

The supervised syscalls of one run are counted by name (a counting handler put in front of every chain).

Usage: .venv/bin/python benchmarks/limits.py [ROUNDS]
"""
import collections
import os
import statistics
import subprocess
import sys
import time

from sandlock_core import Policy, Sandbox

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
PY = "/usr/bin/python3"
IMPORT = [PY, "-c", "import json, sqlite3"]
LOOP = [PY, "-I", "-S", "-c", """
import mmap, time
t = time.perf_counter()
for i in range(10000):
    m = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[0] = 1
    m.close()
print((time.perf_counter() - t) * 1e6 / 10000)
"""]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def notified_by_name(policy, cmd) -> collections.Counter:
    """Which syscalls reach the supervisor in one run of ``cmd``."""
    counts = collections.Counter()
    sb = Sandbox(policy)
    plan = sb._plan

    def counter(name):
        def h(sup, n):
            counts[name] += 1
        return h
    plan.handlers = {nr: (counter(plan.names.get(nr, str(nr))), *chain) for nr, chain in plan.handlers.items()}
    r = sb.run(cmd)
    assert r.success, r.stderr
    return counts


def answered_in_c(policy, cmd) -> int:
    """How many of one run's notifications procfs's C fast path answered (never reaching Python)."""
    from sandlock_core import procfs
    seen = []
    finish = procfs.FastPath.finish

    def spy(sup, result):
        ctx = sup.state.get("procfs.fast")
        seen.append(ctx.served if ctx is not None else 0)
        finish(sup, result)
    procfs.FastPath.finish = staticmethod(spy)
    try:
        Sandbox(policy).run(cmd)
    finally:
        procfs.FastPath.finish = staticmethod(finish)
    return seen[0] if seen else 0


def main():
    policy = Policy(max_memory="512M", max_processes=64, num_cpus=2, isolate_pids=True)
    full = Sandbox(policy)
    mem = Sandbox(Policy(max_memory="512M"))
    r = full.run(IMPORT)
    assert r.success, r.stderr
    notifs = r.notifications
    by_name = notified_by_name(policy, IMPORT)
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("supervised:", ", ".join(f"{k} {v}" for k, v in by_name.most_common()),
          f"({answered_in_c(policy, IMPORT)} answered in C)")
    bare_t, sand_t = [], []
    for _ in range(ROUNDS):
        bare_t.append(timed(lambda: subprocess.run(IMPORT, stdout=subprocess.DEVNULL)))
        sand_t.append(timed(lambda: full.run(IMPORT)))
    b, s = statistics.median(bare_t), statistics.median(sand_t)
    print(f"import json, sqlite3: bare {b:.1f} ms, limits {s:.1f} ms, ratio {s / b:.2f}x "
          f"({notifs} supervised syscalls)")
    lb, ls = [], []
    for _ in range(max(5, ROUNDS // 8)):
        lb.append(float(subprocess.run(LOOP, capture_output=True, check=True).stdout))
        r = mem.run(LOOP)
        assert r.success, r.stderr
        ls.append(float(r.stdout))
    b, s = statistics.median(lb), statistics.median(ls)
    print(f"mmap+munmap pair: bare {b:.2f} us, -m 512M {s:.2f} us, ratio {s / b:.1f}x")
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
