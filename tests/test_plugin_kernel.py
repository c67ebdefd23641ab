"""The plugin on a kernel without Landlock: skip by default, fail under --sandlock-strict, run with what the
kernel has under --sandlock-best-effort.

No mock: the inner pytest runs under a seccomp filter that answers ENOSYS to every landlock_* syscall, which
is what an older kernel or a container runtime's seccomp profile gives. ``NO_LANDLOCK`` installs it with
sandlock_core's own BPF assembler and then execs the command.
"""
from __future__ import annotations

import os
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

import sandlock_core

pytestmark = pytest.mark.skipif(sandlock_core.landlock_abi_version() < 1,
                                reason="Landlock is not available (these tests take it away)")

NO_LANDLOCK = textwrap.dedent("""
    import errno, os, sys
    from sandlock_core import _sys, bpf, syscalls

    arch = syscalls.native_arch()
    p = bpf.Program()
    p.ld_abs(4)                                              # seccomp_data.arch
    p.jeq(syscalls.AUDIT_ARCH[arch], jf="allow")
    p.ld_abs(0)                                              # seccomp_data.nr
    for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
        p.jeq(syscalls.number(name, arch), jt="enosys")
    p.label("allow")
    p.ret(0x7FFF0000)                                        # SECCOMP_RET_ALLOW
    p.label("enosys")
    p.ret(0x00050000 | errno.ENOSYS)                         # SECCOMP_RET_ERRNO
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    _sys.seccomp_set_filter(p.assemble())
    os.execv(sys.argv[1], sys.argv[1:])
""")

SYS = [p for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p)]

TESTS = textwrap.dedent(f"""
    import ctypes
    import pytest

    @pytest.mark.sandbox(fs_readable={SYS!r})
    def test_needs_landlock():
        print("BODY RAN")
        assert ctypes.CDLL(None).prctl(21, 0, 0, 0, 0) == 2      # still under sandlock's seccomp filter
        with open("/etc/hostname", "rb"):                        # outside fs_readable: not in force here
            pass
""")


def run_without_landlock(pytester, *args):
    pytester.makepyfile(TESTS)
    launcher = pytester.makefile(".py", no_landlock=NO_LANDLOCK)
    return pytester.run(sys.executable, str(launcher), sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        "-rA", "-s", *args)


def test_the_launcher_really_takes_landlock_away(pytester):
    launcher = pytester.makefile(".py", no_landlock=NO_LANDLOCK)
    result = pytester.run(sys.executable, str(launcher), sys.executable, "-c",
                          "import sandlock_core; print('ABI', sandlock_core.landlock_abi_version())")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["ABI 0"])


def test_missing_feature_skips_naming_it(pytester):
    result = run_without_landlock(pytester)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*sandlock: this kernel cannot enforce the policy: fs_readable needs "
                                 "Landlock ABI 1*"])
    assert "BODY RAN" not in result.stdout.str()


def test_strict_fails_the_test(pytester):
    result = run_without_landlock(pytester, "--sandlock-strict")
    assert result.ret == 1
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["sandlock: *Landlock unavailable*",
                                 "*sandlock (--sandlock-strict): this kernel cannot enforce the policy: "
                                 "fs_readable needs Landlock ABI 1*"])
    out = result.stdout.str()
    assert "BODY RAN" not in out
    assert "During handling of the above exception" not in out


def test_best_effort_runs_and_says_what_is_not_in_force(pytester):
    result = run_without_landlock(pytester, "--sandlock-best-effort", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "sandlock: *Landlock unavailable*",
        "sandlock: best effort: this kernel lacks Landlock (filesystem rules, TCP port rules, IPC scopes)*",
        "*BODY RAN*",
        "not in force on this kernel (best effort): *fs_readable needs Landlock ABI 1*"])
    props = {p.get("name"): p.get("value") for p in ET.parse(pytester.path / "out.xml").iter("property")}
    assert "fs_readable needs Landlock ABI 1" in props["sandlock_missing"]


def test_best_effort_with_a_profile_names_its_gaps_in_the_header(pytester):
    pytester.makefile(".toml", prof=f"fs_readable = {SYS!r}\n".replace("'", '"'))
    result = run_without_landlock(pytester, "--sandlock-best-effort", "--sandlock-profile", "prof.toml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandlock: best effort: not in force on this kernel: fs_readable needs "
                                 "Landlock ABI 1*"])
