"""COW fork: 1,000 clones of a confined template, from the fork() call until every clone is reaped and its
output collected (each clone prints one line into its own pipe).

Usage: .venv/bin/python benchmarks/fork.py [CLONES] [ROUNDS]     (median of ROUNDS, after one warm-up)
"""
import statistics
import sys
import time

from sandlock_core import Policy, Sandbox

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
RO = ["/usr", "/lib", "/lib64", "/bin", "/etc"]


def init():
    global table
    table = list(range(10_000))


def work(i):
    print(i, table[i % len(table)])


def main():
    with Sandbox(Policy(fs_readable=RO), init_fn=init, work_fn=work) as sb:
        t = time.perf_counter()
        sb.fork(1)
        first = (time.perf_counter() - t) * 1000
        times = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            res = sb.fork(N)
            times.append((time.perf_counter() - t) * 1000)
            assert len(res) == N and res.success, res
            assert res.stdout.count(b"\n") == N
    med = statistics.median(times)
    print(f"template start + fork(1): {first:.1f} ms")
    print(f"fork({N}) start to all reaped: median {med:.1f} ms over {ROUNDS} (min {min(times):.1f}, "
          f"max {max(times):.1f}); {med * 1000 / N:.0f} us/clone, {N / med * 1000:.0f} clones/s")


if __name__ == "__main__":
    main()
