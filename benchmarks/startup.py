"""Start-up cost: Sandbox.run(["/bin/echo"]) vs subprocess.run, and `sandlock run -- /bin/echo` vs /bin/echo.

Both pairs are timed in the same process, interleaved (A, B, A, B, ...) to cancel machine drift; medians.
Usage: .venv/bin/python benchmarks/startup.py [ROUNDS]
"""
import os
import statistics
import subprocess
import sys
import time

from sandlock_core import Policy, Sandbox

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ECHO = ["/bin/echo", "hi"]
SANDLOCK = os.path.join(os.path.dirname(sys.executable), "sandlock")
RO = ["/usr", "/lib", "/bin", "/etc"] + (["/lib64"] if os.path.isdir("/lib64") else [])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def pairs(a, b, rounds):
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def main():
    plain = Sandbox(Policy())
    confined = Sandbox(Policy(fs_readable=RO))
    for sb in (plain, confined):
        assert sb.run(ECHO).stdout == b"hi\n"
    rows = []
    bare, api = pairs(lambda: subprocess.run(ECHO, stdout=subprocess.DEVNULL), lambda: plain.run(ECHO), ROUNDS)
    rows.append(("Sandbox(Policy()).run(echo) vs subprocess.run", bare, api))
    bare, api = pairs(lambda: subprocess.run(ECHO, stdout=subprocess.DEVNULL), lambda: confined.run(ECHO), ROUNDS)
    rows.append(("Sandbox(fs_readable=...).run(echo) vs subprocess.run", bare, api))
    n = max(20, ROUNDS // 5)
    bare, cli = pairs(lambda: subprocess.run(ECHO, stdout=subprocess.DEVNULL),
                      lambda: subprocess.run([SANDLOCK, "run", *sum((["-r", p] for p in RO), []), "--", *ECHO],
                                             stdout=subprocess.DEVNULL), n)
    rows.append(("sandlock run -r ... -- echo vs echo", bare, cli))
    print(f"{'workload':55} {'bare ms':>8} {'sandlock ms':>12} {'ratio':>6} {'delta ms':>9}")
    for name, b, s in rows:
        print(f"{name:55} {b:8.2f} {s:12.2f} {s / b:6.2f} {s - b:9.2f}")


if __name__ == "__main__":
    main()
