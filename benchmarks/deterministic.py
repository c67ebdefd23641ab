"""Cost of the deterministic mechanisms: clock reads (patched vDSO) and seeded randomness (supervisor).

    .venv/bin/python benchmarks/deterministic.py [--clock N] [--urandom N]

The loops run in a child Python (``/usr/bin/python3 -I -S``) that times itself, bare and inside the sandbox
(``time_start`` for the clock, ``random_seed`` for ``os.urandom``); the table gives the cost per call in
microseconds and the ratio to bare. Targets: clock reads under 5x bare (no supervisor round trip),
``os.urandom(16)`` no dearer than one supervisor round trip (measured here with ``getppid`` notified).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sandlock_core import Policy, Sandbox  # noqa: E402

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


def measure(what: str, n: int, policy: Policy | None, handlers=None) -> float:
    cmd = [PY, "-I", "-S", "-c", LOOP, what, str(n)]
    if policy is None:
        import subprocess
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    r = Sandbox(policy, handlers=handlers).run(cmd, timeout=600)
    assert r.exit_code == 0, r
    return float(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clock", type=int, default=1_000_000)
    ap.add_argument("--urandom", type=int, default=100_000)
    a = ap.parse_args()
    rows = []
    clock_bare = measure("clock", a.clock, None)
    clock_box = measure("clock", a.clock, Policy(time_start="2000-01-01T00:00:00Z"))
    clock_frozen = measure("clock", a.clock, Policy(time_start="2000-01-01T00:00:00Z", time_freeze=True))
    rows.append((f"time.time() x{a.clock:,}", clock_bare, clock_box, "time_start"))
    rows.append((f"time.time() x{a.clock:,}", clock_bare, clock_frozen, "time_start + time_freeze"))
    ur_bare = measure("urandom", a.urandom, None)
    ur_box = measure("urandom", a.urandom, Policy(random_seed=42))
    rows.append((f"os.urandom(16) x{a.urandom:,}", ur_bare, ur_box, "random_seed"))
    rt = measure("getppid", a.urandom, Policy(), handlers={"getppid": lambda sup, n: None})
    print("| loop | policy | bare µs/call | sandbox µs/call | ratio |")
    print("|---|---|---|---|---|")
    for name, bare, box, pol in rows:
        print(f"| {name} | {pol} | {bare:.3f} | {box:.3f} | {box / bare:.2f}x |")
    print(f"\none supervisor round trip (notified getppid, CONTINUE): {rt:.2f} µs; "
          f"os.urandom(16) in the sandbox costs {ur_box / rt:.2f} of it")


if __name__ == "__main__":
    main()
