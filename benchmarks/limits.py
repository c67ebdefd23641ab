"""Cost of resource limits and the virtual /proc.

1. ``python3 -c "import json, sqlite3"`` under ``-m 512M -P 64 --num-cpus 2 --isolate-pids`` vs bare
   (``Sandbox.run`` vs ``subprocess.run``), interleaved rounds, medians. Target: within 1.3x of bare.
2. 10,000 ``mmap``/``munmap`` pairs (private anonymous, 64 KiB, one page touched) under ``-m 512M`` vs bare,
   timed inside the program (the loop only), medians over rounds.

The supervised syscalls of one run are counted by name (a counting handler put in front of every chain).
``--phases`` also prints where a run's time goes: wall time and page faults of this process (the supervisor's)
between the steps of ``Sandbox.run`` (spawn, listener hand-off, supervisor set-up and release, exec, the
command's run, the end), medians over rounds, for bare ``Sandbox()``, ``--isolate-pids``, ``-m`` and all limits.

Usage: .venv/bin/python benchmarks/limits.py [ROUNDS] [--phases]
"""
import collections
import os
import resource
import statistics
import subprocess
import sys
import time

from sandlock_core import Policy, Sandbox

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
ROUNDS = int(ARGS[0]) if ARGS else 40
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


class Phases:
    """Timestamps (and this process's minor page faults) at the steps of Sandbox.run, by patching them."""

    STEPS = [("spawn", "sandbox", "_spawn.spawn"), ("listener", "spawn", "Spawned.take_listener"),
             ("released", "spawn", "Spawned.release"), ("exec", "spawn", "Spawned.read_exec_result"),
             ("child ran", "sandbox", "Sandbox._communicate"), ("reaped", "sandbox", "Sandbox._end"),
             ("concluded", "sandbox", "Sandbox._conclude")]

    def __init__(self):
        self.marks = []
        from sandlock_core import sandbox, spawn
        mods = {"sandbox": sandbox, "spawn": spawn}
        for label, mod, path in self.STEPS:
            owner = mods[mod]
            *head, attr = path.split(".")
            for h in head:
                owner = getattr(owner, h)
            setattr(owner, attr, self._after(getattr(owner, attr), label))

    def _after(self, fn, label):
        def wrapped(*a, **k):
            try:
                return fn(*a, **k)
            finally:
                self.mark(label)
        return wrapped

    def mark(self, label):
        self.marks.append((label, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    def run(self, sb, cmd):
        self.marks.clear()
        self.mark("start")
        sb.run(cmd)
        self.mark("returned")
        out, prev = [], self.marks[0]
        for m in self.marks[1:]:
            out.append((m[0], (m[1] - prev[1]) * 1000, m[2] - prev[2]))
            prev = m
        return out


def phases():
    """Where a run's time goes, per policy: medians of each step's wall time and page faults."""
    policies = {"Sandbox()": Policy(), "--isolate-pids": Policy(isolate_pids=True), "-m 512M": Policy(max_memory="512M"),
                "all limits": Policy(max_memory="512M", max_processes=64, num_cpus=2, isolate_pids=True)}
    sbs = {k: Sandbox(p) for k, p in policies.items()}
    ph = Phases()
    acc = {k: collections.defaultdict(list) for k in sbs}
    bare = []
    for _ in range(ROUNDS):
        bare.append(timed(lambda: subprocess.run(IMPORT, stdout=subprocess.DEVNULL)))
        for k, sb in sbs.items():
            total = 0.0
            for label, ms, faults in ph.run(sb, IMPORT):
                acc[k][label].append((ms, faults))
                total += ms
            acc[k]["TOTAL"].append((total, 0))
    print(f"phases (ms / page faults of the supervising process), bare {statistics.median(bare):.1f} ms:")
    for k, steps in acc.items():
        print(f"  {k:15}", "  ".join(f"{label} {statistics.median(m for m, _ in v):.2f}"
                                       + (f"/{statistics.median(f for _, f in v):.0f}" if label != "TOTAL" else "")
                                       for label, v in steps.items()))


def main():
    if "--phases" in sys.argv:
        print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        phases()
        print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        return
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
