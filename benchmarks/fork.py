"""COW fork: 1,000 clones of a confined template, from the fork() call until every clone is reaped and its
output collected (each clone prints one line into its own pipe).

Interleaved with a bare reference: the same n children made with os.fork() from this (unconfined) process,
each with its own stdout pipe, read and reaped here. Rounds alternate (bare, ours, bare, ours, ...), medians
are reported with the load average, and ``faults/clone`` (minor page faults per clone, from the template's
reaped-children counter) shows how much of the template each clone copies.

Usage: .venv/bin/python benchmarks/fork.py [CLONES] [ROUNDS]     (median of ROUNDS, after one warm-up)
"""
import os
import statistics
import sys
import time

from sandlock_core import Policy, Sandbox

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 7
RO = ["/usr", "/lib", "/lib64", "/bin", "/etc"]


def init():
    global table
    table = list(range(10_000))


def work(i):
    print(i, table[i % len(table)])


def bare(n: int) -> bytes:
    """os.fork() n children of this process, each printing into its own pipe; read and reap them all."""
    reads, pids = [], []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(w, 1)
                work(i)
                sys.stdout.flush()
                code = 0
            finally:
                os._exit(code)  # a child never returns into the benchmark
        os.close(w)
        reads.append(r)
        pids.append(pid)
    out = []
    for r in reads:
        chunks = []
        while True:
            data = os.read(r, 1 << 16)
            if not data:
                break
            chunks.append(data)
        os.close(r)
        out.append(b"".join(chunks))
    for pid in pids:
        os.waitpid(pid, 0)
    return b"".join(out)


def children_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[8])  # cminflt


def main():
    init()  # for the bare reference (the template runs its own)
    with Sandbox(Policy(fs_readable=RO), init_fn=init, work_fn=work) as sb:
        t = time.perf_counter()
        sb.fork(1)
        first = (time.perf_counter() - t) * 1000
        bare(1)
        ours, ref, faults, loads = [], [], [], []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            out = bare(N)
            ref.append((time.perf_counter() - t) * 1000)
            assert out.count(b"\n") == N
            before = children_faults(sb._template.pid)
            t = time.perf_counter()
            res = sb.fork(N)
            ours.append((time.perf_counter() - t) * 1000)
            faults.append((children_faults(sb._template.pid) - before) / N)
            assert len(res) == N and res.success, res
            assert res.stdout.count(b"\n") == N
            loads.append(os.getloadavg()[0])
    med, ref_med = statistics.median(ours), statistics.median(ref)
    print(f"template start + fork(1): {first:.1f} ms")
    print(f"fork({N}) start to all reaped: median {med:.1f} ms over {ROUNDS} (min {min(ours):.1f}, "
          f"max {max(ours):.1f}); {med * 1000 / N:.0f} us/clone, {N / med * 1000:.0f} clones/s, "
          f"{statistics.median(faults):.0f} faults/clone")
    print(f"bare os.fork x{N} with pipes, unconfined: median {ref_med:.1f} ms (min {min(ref):.1f}); "
          f"ratio ours/bare {med / ref_med:.2f}")
    print(f"load average (1 min) during the rounds: {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
