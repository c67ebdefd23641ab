"""Copy-on-write workdir overhead: bare vs seccomp COW (dry run: the tree stays as it was).

    python benchmarks/cow.py [--repeat N]

Three workloads: ``python3 -c pass`` run in the workdir (start-up, read-only), ``git status`` of a 1,000-file
repository (read-mostly: lstat of every file, listings, an index refresh), and a write of 1,000 small files
(every create goes through the supervisor). Reports the median wall time of each and the COW/bare ratio.
Targets: read-mostly under 1.5x, the 1,000-file write under 3x.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandlock_core import Policy, Sandbox  # noqa: E402

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@e", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@e", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}
WRITE = "import os\nfor i in range(1000):\n    open(f'out/f{i}.txt', 'w').write('x' * 100)\n"


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


def timed(fn, repeat: int, setup=None) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="sandlock-cow-bench-")
    repo = os.path.join(base, "repo")
    make_repo(repo)
    env = {**os.environ, **GIT_ENV}
    sb = Sandbox(Policy(workdir=repo, cwd=repo, env=GIT_ENV))
    work = {
        "python3 -c pass": [PY, "-c", "pass"],
        "git status (1,000 files)": ["git", "status", "--short"],
        "write 1,000 small files": [PY, "-c", WRITE],
    }
    print(f"{'workload':<28}{'bare ms':>10}{'COW ms':>10}{'ratio':>8}")
    for name, cmd in work.items():
        def bare():
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)

        def reset():  # untimed: the bare write leaves its files behind
            if name.startswith("write"):
                shutil.rmtree(os.path.join(repo, "out"))
                os.makedirs(os.path.join(repo, "out"))

        def cow():
            r = sb.dry_run(cmd)
            assert r.exit_code == 0, r.stderr
        reset()
        tb, tc = timed(bare, a.repeat, reset), timed(cow, a.repeat)
        print(f"{name:<28}{tb * 1000:>10.1f}{tc * 1000:>10.1f}{tc / tb:>7.2f}x")
    sb.close()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
