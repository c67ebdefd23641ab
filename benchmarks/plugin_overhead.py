"""Per-test overhead of the pytest plugin: 200 trivial tests with and without ``--sandlock-profile``.

    python benchmarks/plugin_overhead.py [--tests 200] [--rounds 5]

Each configuration runs ``rounds`` times in a fresh pytest process; the best wall time of the session
(pytest's own "in X.XXs") is kept, so interpreter start-up and collection cancel out between configurations.
Reported: the extra milliseconds per test over the unconfined run. Target: under 5 ms a test.

Configurations:
* ``plain``       no plugin options: the plugin is installed but inactive;
* ``profile``     ``--sandlock-profile`` with a profile that restricts the filesystem (fs_readable/fs_writable,
                  so Landlock rules, the built-in defaults and per-test tmp_path are in play) and records denials;
* ``no-denials``  the same with ``--sandlock-no-denials`` (no denial mirror: no supervisor round trips);
* ``seccomp-only`` a profile without filesystem rules (clean_env only);
* ``bare-fork``   no sandlock at all: a 15-line plugin that runs each call phase in a plain ``os.fork()`` child
                  and ships the report back the same way. This is the floor of any fork-per-test design in
                  this pytest process (page-table copy, copy-on-write faults, exit); sandlock's own cost is
                  the difference to it.
"""
from __future__ import annotations

import argparse
import os
import re
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


def run_session(workdir: str, args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          *args], cwd=workdir, capture_output=True, text=True)
    m = re.search(r"(\d+) passed.* in ([\d.]+)s", out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"pytest failed ({out.returncode}) for {args}:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    return float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandlock-bench-") as d:
        with open(os.path.join(d, "test_trivial.py"), "w") as f:
            f.write(TEST_FILE.format(n=a.tests))
        with open(os.path.join(d, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        sys_paths = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]
        fs_prof = os.path.join(d, "fs.toml")
        with open(fs_prof, "w") as f:
            f.write("fs_readable = [" + ", ".join(f'"{p}"' for p in sys_paths) + "]\n")
        with open(os.path.join(d, "bare_fork_plugin.py"), "w") as f:
            f.write(BARE_FORK)
        sc_prof = os.path.join(d, "seccomp.toml")
        with open(sc_prof, "w") as f:
            f.write("clean_env = true\n")
        configs = {
            "plain": [],
            "profile": ["--sandlock-profile", fs_prof],
            "no-denials": ["--sandlock-profile", fs_prof, "--sandlock-no-denials"],
            "seccomp-only": ["--sandlock-profile", sc_prof],
            "bare-fork": ["-p", "bare_fork_plugin"],
        }
        best = {}
        for name, args in configs.items():
            times = [run_session(d, args) for _ in range(a.rounds)]
            best[name] = min(times)
        base = best["plain"]
        print(f"{a.tests} trivial tests, best of {a.rounds} sessions (pytest's own session time)")
        print(f"{'configuration':<14} {'session s':>10} {'per test ms':>12} {'overhead ms/test':>17}")
        for name, t in best.items():
            over = (t - base) * 1000 / a.tests
            print(f"{name:<14} {t:>10.3f} {t * 1000 / a.tests:>12.2f} {over:>17.2f}")
        worst = max((best[k] - base) * 1000 / a.tests for k in best if k not in ("plain", "bare-fork"))
        floor = (best["bare-fork"] - base) * 1000 / a.tests
        print(f"target < 5 ms/test: {'met' if worst < 5 else 'NOT met'} (worst {worst:.2f} ms; a bare fork per "
              f"test alone costs {floor:.2f} ms here, sandlock adds {worst - floor:.2f} ms on top)")


if __name__ == "__main__":
    main()
