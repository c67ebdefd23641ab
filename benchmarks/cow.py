"""Copy-on-write workdir overhead: bare vs seccomp COW (dry run: the tree stays as it was).

    python benchmarks/cow.py [--repeat N] [--profile] [--storage DIR]

Three workloads: ``python3 -c pass`` run in the workdir (start-up, read-only), ``git status`` of a 1,000-file
repository (read-mostly: lstat of every file, listings, an index refresh), and a write of 1,000 small files
(every create goes through the supervisor). Bare and COW runs are interleaved (bare, COW, bare, COW, ...) so
that load changes hit both; the medians and the COW/bare ratio are printed with the load average, and the
number of notifications the supervisor served for one run of each workload. ``--profile`` adds, per workload,
the notifications per handler, how many were answered CONTINUE and the time spent in each handler.
Targets: read-mostly under 1.5x, the 1,000-file write under 3x.

Where the time goes (``--profile``): after the fast paths the handlers cost ~1-3 us per read-only notification;
what is left is the round trip itself (~10 us quiet, far more under load). ``git status`` makes one notified
``lstat`` per file (1,273 notifications for 1,000 files), so its floor is ~13 ms on top of a 6-11 ms bare run:
the 1.5x target needs those calls not to be notified at all (OverlayFS mode), not a faster handler.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandlock_core import BranchAction, Policy, Sandbox, cow  # noqa: E402

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@e", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@e", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}
WRITE = "import os\nfor i in range(1000):\n    open(f'out/f{i}.txt', 'w').write('x' * 100)\n"
WORK = {
    "python3 -c pass": [PY, "-c", "pass"],
    "git status (1,000 files)": ["git", "status", "--short"],
    "write 1,000 small files": [PY, "-c", WRITE],
}


def make_repo(root: str) -> None:
    for d in range(20):
        os.makedirs(f"{root}/d{d}")
        for f in range(50):
            with open(f"{root}/d{d}/f{f}.txt", "w") as fh:
                fh.write(f"{d} {f}\n")
            os.utime(f"{root}/d{d}/f{f}.txt", (time.time() - 100,) * 2)  # not "racily clean" for git
    os.makedirs(f"{root}/out")
    subprocess.run(["sh", "-c", "git init -q . && git add -A && git commit -qm base && sleep 1.1 && git status"],
                   cwd=root, stdout=subprocess.DEVNULL,
                   env={**os.environ, **GIT_ENV}, check=True)


class HandlerProfile:
    """Counts and times every COW handler call (installed before the Sandbox compiles its plan)."""

    def __init__(self):
        self.calls, self.cont, self.secs = collections.Counter(), collections.Counter(), collections.Counter()
        orig = cow._trampoline

        def trampoline(fn, read_only=False):
            handler = orig(fn, read_only)

            def timed(sup, n):
                t = time.perf_counter()
                action = handler(sup, n)
                self.secs[fn.__name__] += time.perf_counter() - t
                self.calls[fn.__name__] += 1
                self.cont[fn.__name__] += action is None
                return action
            return timed
        cow._trampoline = trampoline

    def reset(self):
        for c in (self.calls, self.cont, self.secs):
            c.clear()

    def report(self):
        for name, k in self.calls.most_common():
            print(f"      {name:<16}{k:>6} calls {self.cont[name]:>6} CONTINUE {self.secs[name] * 1000:8.1f} ms"
                  f" {self.secs[name] / k * 1e6:8.1f} us/call")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--profile", action="store_true", help="per-handler counts and times")
    ap.add_argument("--storage", help="fs_storage for the uppers (default: sandlock's default)")
    a = ap.parse_args()
    prof = HandlerProfile() if a.profile else None
    base = tempfile.mkdtemp(prefix="sandlock-cow-bench-")
    repo = os.path.join(base, "repo")
    make_repo(repo)
    env = {**os.environ, **GIT_ENV}
    kw = {"fs_storage": a.storage} if a.storage else {}
    sb = Sandbox(Policy(workdir=repo, cwd=repo, env=GIT_ENV, **kw))
    counter = Sandbox(Policy(workdir=repo, cwd=repo, env=GIT_ENV, on_exit=BranchAction.ABORT, **kw))
    print(f"load average before: {os.getloadavg()}")
    print(f"{'workload':<28}{'bare ms':>10}{'COW ms':>10}{'ratio':>8}{'notifs':>8}")
    for name, cmd in WORK.items():
        def reset():  # untimed: the bare write leaves its files behind
            if name.startswith("write"):
                shutil.rmtree(os.path.join(repo, "out"))
                os.makedirs(os.path.join(repo, "out"))

        def bare():
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)

        def run_cow():
            r = sb.dry_run(cmd)
            assert r.exit_code == 0, r.stderr
        reset()
        bare()
        run_cow()  # warm-up
        tb, tc = [], []
        for _ in range(a.repeat):
            reset()
            t = time.perf_counter()
            bare()
            tb.append(time.perf_counter() - t)
            reset()
            t = time.perf_counter()
            run_cow()
            tc.append(time.perf_counter() - t)
        reset()
        if prof:
            prof.reset()
        notifs = counter.run(cmd).notifications
        mb, mc = statistics.median(tb), statistics.median(tc)
        print(f"{name:<28}{mb * 1000:>10.1f}{mc * 1000:>10.1f}{mc / mb:>7.2f}x{notifs:>8}")
        if prof:
            prof.report()
    print(f"load average after: {os.getloadavg()}")
    sb.close()
    counter.close()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
