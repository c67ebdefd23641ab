"""Start-up cost: Sandbox.run(["/bin/echo"]) vs subprocess.run, and `sandlock run -- /bin/echo` vs /bin/echo.

Both pairs are timed in the same process, interleaved (A, B, A, B, ...) to cancel machine drift; medians.
On a busy machine wall times swing; the load average is printed, and so is a measure that load barely moves:
the sum of the CLI's import times (``-X importtime``, each module's fastest of several runs) next to that of a
bare ``python -c pass``, with the list of what the CLI imports beyond it (-X importtime leaves out the modules
loaded through importlib.import_module, i.e. plan.py's mechanisms such as metadata, though not what they import).
The CLI is the ``sandlock`` script next to the interpreter: after scripts/bootstrap.sh the launcher that starts
Python without ``site`` (sandlock_core/launcher.py), else pip's console script; the output says which.
Usage: .venv/bin/python benchmarks/startup.py [ROUNDS]
"""
import os
import re
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


def import_times(argv: list, runs: int = 7) -> dict:
    """{module: fastest self time in us} over ``runs`` runs of ``argv`` with -X importtime."""
    best: dict = {}
    for _ in range(runs):
        err = subprocess.run(argv, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}).stderr
        for us, name in re.findall(r"^import time:\s+(\d+) \|\s+\d+ \| +(\S+)$", err, re.MULTILINE):
            best[name] = min(best.get(name, 1 << 60), int(us))
    return best


def cli_argv() -> list:
    return [SANDLOCK, "run", *sum((["-r", p] for p in RO), []), "--", *ECHO]


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
                      lambda: subprocess.run(cli_argv(), stdout=subprocess.DEVNULL), n)
    rows.append(("sandlock run -r ... -- echo vs echo", bare, cli))
    python, cli = pairs(lambda: subprocess.run([sys.executable, "-c", "pass"]),
                        lambda: subprocess.run(cli_argv(), stdout=subprocess.DEVNULL), n)
    rows.append(("(for scale) sandlock run -r ... -- echo vs python -c pass", python, cli))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with open(SANDLOCK) as f:
        launcher = f.readline().rstrip().endswith(" -S")
    print(f"{SANDLOCK}: " + ("the launcher without site (scripts/bootstrap.sh, sandlock_core/launcher.py)"
                             if launcher else "pip's console script (with site; scripts/bootstrap.sh writes "
                             "the faster launcher)"))
    print(f"{'workload':58} {'bare ms':>8} {'sandlock ms':>12} {'ratio':>6} {'delta ms':>9}")
    for name, b, s in rows:
        print(f"{name:58} {b:8.2f} {s:12.2f} {s / b:6.2f} {s - b:9.2f}")
    base = import_times([sys.executable, "-c", "pass"])
    ours = import_times(cli_argv())  # the script itself: `python SCRIPT` would ignore the launcher's -S
    extra = {m: us for m, us in ours.items() if m not in base}
    print(f"imports (-X importtime, sum of self times): python -c pass {sum(base.values()) / 1000:.1f} ms, "
          f"sandlock run {sum(ours.values()) / 1000:.1f} ms: +{sum(extra.values()) / 1000:.1f} ms in "
          f"{len(extra)} modules")
    print("  " + ", ".join(f"{m} {us / 1000:.2f}" for m, us in sorted(extra.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
