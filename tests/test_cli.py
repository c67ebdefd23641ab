"""The sandlock CLI: exit-code contract, usage errors, profiles, check."""
import json
import os
import subprocess
import sys

import pytest

SANDLOCK = [sys.executable, "-m", "sandlock_core.cli"]
RO = sum((["-r", p] for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)), [])


def sl(*args, env=None, **kw):
    return subprocess.run([*SANDLOCK, *args], capture_output=True, text=True, timeout=60, env=env, **kw)


def test_runs_the_command_and_returns_its_exit_code():
    r = sl("run", *RO, "--", "sh", "-c", "echo hi; exit 7")
    assert (r.returncode, r.stdout) == (7, "hi\n")


def test_exec_shell():
    r = sl("run", "-e", "echo $((6*7))")
    assert r.stdout == "42\n" and r.returncode == 0


@pytest.mark.parametrize("seconds", ["2147484", "1e9"])
def test_a_timeout_of_weeks_is_taken_as_given(seconds):
    # poll(2) takes an int of milliseconds: 2147484 s is just over it (found by hypothesis as OverflowError)
    r = sl("run", *RO, "--timeout", seconds, "--", "sh", "-c", "echo ok")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_timeout_is_124_with_message():
    r = sl("run", "-t", "0.5", "--", "sleep", "30")
    assert r.returncode == 124
    assert "sandlock: timeout after 0.5s" in r.stderr


def test_command_not_found_is_127():
    r = sl("run", "--", "/no/such/program")
    assert r.returncode == 127
    assert "sandlock: execve: No such file or directory" in r.stderr


def test_killed_by_signal_is_128_plus_n():
    r = sl("run", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


def test_read_denied_through_the_cli(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    r = sl("run", *RO, "--", "cat", str(secret))
    assert r.returncode == 1 and "Permission denied" in r.stderr
    r = sl("run", *RO, "-r", str(tmp_path), "--fs-deny", str(secret), "--", "cat", str(secret))
    assert r.returncode == 1 and "Permission denied" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["run"], "no command given"),
    (["run", "--max-open-files", "x", "--", "true"], "--max-open-files"),
    (["run", "--env", "NOEQUALS", "--", "true"], "--env"),
    (["run", "--net-bind", "99999", "--", "true"], "net_bind"),
    (["run", "-r", "/definitely/missing", "--", "true"], "fs_readable"),
    (["run", "--timeout", "-1", "--", "true"], "--timeout"),
    (["run", "--status-fd", "987", "--", "true"], "--status-fd"),
    (["run", "--bogus-flag", "--", "true"], "unrecognized"),
    (["run", "--dry-run", "--", "true"], "--dry-run requires --workdir"),
    (["run", "-p", "no-such-profile", "--", "true"], "no-such-profile"),
])
def test_usage_errors_exit_2_and_run_nothing(args, needle, tmp_path):
    marker = tmp_path / "ran"
    r = sl(*args[:-1], *(["touch", str(marker)] if args[-1] == "true" else [args[-1]]),
           env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 2, r
    assert needle in r.stderr
    assert not marker.exists()


def test_status_fd_reports_json():
    r, w = os.pipe()
    proc = subprocess.run([*SANDLOCK, "run", "--status-fd", str(w), "--", "sh", "-c", "exit 3"], pass_fds=[w],
                          capture_output=True, timeout=60)
    os.close(w)
    assert proc.returncode == 3
    assert json.loads(os.read(r, 1000)) == {"exit_code": 3}


def test_profiles_list_show_delete_and_run(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    pdir = tmp_path / "sandlock" / "profiles"
    pdir.mkdir(parents=True)
    (pdir / "build.toml").write_text('clean_env = true\nmax_open_files = 64\n[env]\nCC = "gcc"\n')
    assert sl("profile", "list", env=env).stdout == "build\n"
    assert "max_open_files = 64" in sl("profile", "show", "build", env=env).stdout
    r = sl("run", "-p", "build", "--env", "X=1", "--", "sh", "-c", "echo $CC $X; ulimit -n", env=env)
    assert r.stdout == "gcc 1\n64\n"
    r = sl("run", "-p", "build", "--max-open-files", "32", "--", "sh", "-c", "ulimit -n", env=env)
    assert r.stdout == "32\n"  # flags override the profile
    (pdir / "bad.toml").write_text("max_open_files = 'many'\n")
    r = sl("run", "-p", "bad", "--", "true", env=env)
    assert r.returncode == 2 and "bad.toml" in r.stderr and "max_open_files" in r.stderr
    assert sl("profile", "delete", "build", env=env).returncode == 0
    assert sl("profile", "list", env=env).stdout == "bad\n"


def test_check_prints_a_table():
    r = sl("check")
    assert r.returncode == 0
    assert "Landlock" in r.stdout and "seccomp user notification" in r.stdout and "pidfd_getfd" in r.stdout


def test_version_and_help():
    assert sl("--version").stdout.startswith("sandlock ")
    h = sl("run", "--help").stdout
    assert "examples:" in h and "--fs-read" in h


def test_a_field_this_build_cannot_enforce_is_refused(monkeypatch):
    from sandlock_core import Policy, PolicyError, Sandbox, plan
    monkeypatch.setattr(plan, "UNSUPPORTED", [*plan.UNSUPPORTED, ("max_cpu", lambda p: p.max_cpu is not None)])
    with pytest.raises(PolicyError, match="max_cpu: 50 is not supported by this build yet"):
        Sandbox(Policy(max_cpu=50))


# ---- the hand parser of `run` gives argparse's answer, or defers to it ----------------------------------

import contextlib  # noqa: E402
import io  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from sandlock_core import cli  # noqa: E402

_OPTIONS = sorted(cli._BY_OPTION) + ["--help", "-h", "--fs-r", "--bogus", "-ir", "-r=/x", "--clean-env=1", "-"]
_WORDS = ["--", "/usr", "x", "0", "5", "-1", "0.5", "udp", "raw", "tcp", "keep", "none", "A=1", "", "a b",
          "1_0", " 7", "nan"]
_tokens = st.lists(st.sampled_from(_OPTIONS) | st.sampled_from(_WORDS)
                   | st.sampled_from(sorted(cli._BY_OPTION)).map(lambda o: o + "=7"), max_size=8)


def _argparse_view(argv):
    """argparse's namespace as a dict (cmd without its leading "--", as cmd_run reads it), or "error"."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            ns = vars(cli.build_parser().parse_args(argv))
        except SystemExit:
            return "error"
    ns["cmd"] = ns["cmd"][1:] if ns["cmd"][:1] == ["--"] else ns["cmd"]
    return ns


@settings(max_examples=400, deadline=None)
@given(tokens=_tokens)
def test_fast_run_parser_agrees_with_argparse_or_defers(tokens):
    argv = ["run", *tokens]
    fast = cli._fast_run_args(argv)
    if fast is not None:
        assert vars(fast) == _argparse_view(argv), argv


def test_fast_run_parser_takes_the_usual_spellings():
    a = cli._fast_run_args(["run", "-r", "/usr", "--fs-read=/lib", "-t", "2.5", "--clean-env", "--", "ls", "-l"])
    assert (a.fs_read, a.timeout, a.clean_env, a.cmd) == (["/usr", "/lib"], 2.5, True, ["ls", "-l"])
    assert cli._fast_run_args(["run", "--help"]) is None and cli._fast_run_args(["check"]) is None
