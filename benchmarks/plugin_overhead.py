"""Per-test overhead of the pytest plugin: 200 trivial tests with and without ``--sandlock-profile``.

    python benchmarks/plugin_overhead.py [--tests 200] [--rounds 5] [--with-faker]

Each configuration runs ``rounds`` times in a fresh pytest process, interleaved (plain, bare-fork, profile, ...,
plain, bare-fork, ...) so a load change on a shared machine hits every configuration alike; the median is kept.
Two figures per configuration, both as extra milliseconds per test over the unconfined run:

* wall: pytest's own session time ("in X.XXs"), so interpreter start-up and collection cancel out;
* CPU:  user + system time of the whole process tree (pytest, the reapers, the confined children), from
        ``RUSAGE_CHILDREN``; less sensitive to what else runs on the machine. It includes start-up and
        collection, which cancel out too.

The load average before and after is printed with the figures: compare figures only at a similar load.

Configurations:
* ``plain``        no plugin options: the plugin is installed but inactive;
* ``bare-fork``    no sandlock at all: a 15-line plugin that runs each call phase in a plain ``os.fork()`` child
                   and ships the report back the same way. The floor of any fork-per-test design in this pytest
                   process (page-table copy, copy-on-write faults in parent and child, exit); sandlock's own
                   cost is the difference to it;
* ``bare-fork2``   the same with sandlock's process structure: the child forks again, the test body runs in
                   the grandchild and the child waits for it (where sandlock's reaper sits). Its difference to
                   ``bare-fork`` is what the second full copy of pytest costs;
* ``profile``      ``--sandlock-profile`` with a profile that restricts the filesystem (fs_readable, so
                   Landlock rules, the built-in defaults and the per-session scratch TMPDIR are in play) and
                   records denials (a supervisor thread per test);
* ``worker``       the same profile with ``--sandlock-worker``: the tests run in one long-lived confined worker
                   (one fork per session, not per test), denials recorded;
* ``no-denials``   the same as ``profile`` with ``--sandlock-no-denials`` (only the metadata guard is supervised);
* ``seccomp-only`` a profile without filesystem rules (clean_env only) and ``--sandlock-no-denials``: no
                   supervisor at all.

Faker's pytest plugin, when installed, keeps ~18 MB of the ~100 MB it allocates at start-up, which doubles the
anonymous memory of a small pytest process; every fork copies and tears down the page tables of that memory, so
it adds to every fork-per-test figure. It is disabled in every configuration (``-p no:faker``) unless
``--with-faker`` is given; so are hypothesis's plugin (it imports hypothesis at the end of the session, inside
pytest's timing) and the cache provider.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

TEST_FILE = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_trivial(i):
    assert i >= 0
"""


BARE_FORK = """
import json, os, pytest
from _pytest.runner import call_and_report

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    if call_and_report(item, "setup", True).passed:
        fd = os.memfd_create("report")
        pid = os.fork()
        if pid == 0:
            rep = call_and_report(item, "call", False)
            os.write(fd, json.dumps(item.config.hook.pytest_report_to_serializable(config=item.config,
                                                                                report=rep)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        data = json.loads(os.pread(fd, 1 << 24, 0))
        os.close(fd)
        item.ihook.pytest_runtest_logreport(
            report=item.config.hook.pytest_report_from_serializable(config=item.config, data=data))
    call_and_report(item, "teardown", True, nextitem=nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
"""


# The process structure sandlock uses, without any confinement: the forked child forks the test body again and
# stays as its parent (the reaper's place) until it exits.
BARE_DOUBLE_FORK = BARE_FORK.replace("""        pid = os.fork()
        if pid == 0:
            rep""", """        pid = os.fork()
        if pid == 0 and os.fork() != 0:
            os.wait()
            os._exit(0)
        if pid == 0:
            rep""")
assert BARE_DOUBLE_FORK != BARE_FORK


def run_session(workdir: str, args: list[str], common: list[str]) -> tuple[float, float]:
    """(pytest's session seconds, CPU seconds of the whole process tree) of one pytest run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", *common, *args], cwd=workdir,
                         capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"(\d+) passed.* in ([\d.]+)s", out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"pytest failed ({out.returncode}) for {args}:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(m.group(2)), cpu


def write_project(d: str, n: int) -> dict[str, list[str]]:
    with open(os.path.join(d, "test_trivial.py"), "w") as f:
        f.write(TEST_FILE.format(n=n))
    with open(os.path.join(d, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")
    with open(os.path.join(d, "bare_fork_plugin.py"), "w") as f:
        f.write(BARE_FORK)
    with open(os.path.join(d, "bare_double_fork_plugin.py"), "w") as f:
        f.write(BARE_DOUBLE_FORK)
    sys_paths = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]
    fs_prof = os.path.join(d, "fs.toml")
    with open(fs_prof, "w") as f:
        f.write("fs_readable = [" + ", ".join(f'"{p}"' for p in sys_paths) + "]\n")
    sc_prof = os.path.join(d, "seccomp.toml")
    with open(sc_prof, "w") as f:
        f.write("clean_env = true\n")
    return {
        "plain": [],
        "bare-fork": ["-p", "bare_fork_plugin"],
        "bare-fork2": ["-p", "bare_double_fork_plugin"],
        "profile": ["--sandlock-profile", fs_prof],
        "worker": ["--sandlock-profile", fs_prof, "--sandlock-worker"],
        "no-denials": ["--sandlock-profile", fs_prof, "--sandlock-no-denials"],
        "seccomp-only": ["--sandlock-profile", sc_prof, "--sandlock-no-denials"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--with-faker", action="store_true", help="leave Faker's pytest plugin on (if installed)")
    ap.add_argument("--only", metavar="NAME,...", help="run only these configurations (plain is always run)")
    a = ap.parse_args()
    common = ["-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:hypothesispytest"]
    if not a.with_faker:
        common += ["-p", "no:faker"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sandlock-bench-") as d:
        configs = write_project(d, a.tests)
        if a.only:
            keep = {"plain", *a.only.split(",")}
            configs = {k: v for k, v in configs.items() if k in keep}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(a.rounds):
            for name, args in configs.items():
                runs[name].append(run_session(d, args, common))
    load_after = os.getloadavg()
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    per = 1000 / a.tests
    print(f"{a.tests} trivial tests, median of {a.rounds} interleaved sessions; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'configuration':<14} {'session s':>10} {'wall ms/test':>13} {'CPU ms/test':>12}   (over plain)")
    for name in configs:
        print(f"{name:<14} {wall[name]:>10.3f} {(wall[name] - wall['plain']) * per:>13.2f} "
              f"{(cpu[name] - cpu['plain']) * per:>12.2f}")
    over = {k: (wall[k] - wall["plain"]) * per for k in configs}
    fork_mode = [k for k in configs if k not in ("plain", "bare-fork", "bare-fork2", "worker")]
    if "worker" in over:
        print(f"worker mode: {over['worker']:.2f} ms/test wall, target < 5 ms/test: "
              f"{'met' if over['worker'] < 5 else 'NOT met'}")
    if fork_mode and "bare-fork" in over and "bare-fork2" in over:
        worst = max(over[k] for k in fork_mode)
        floor, floor2 = over["bare-fork"], over["bare-fork2"]
        print(f"fork mode: worst {worst:.2f} ms/test wall; a bare fork per test alone costs {floor:.2f} ms here, "
              f"{floor2:.2f} ms with sandlock's second fork; sandlock adds {worst - floor:.2f} ms over the first, "
              f"{worst - floor2:.2f} ms over the second (no fork-per-test design can go under the first)")


if __name__ == "__main__":
    main()
