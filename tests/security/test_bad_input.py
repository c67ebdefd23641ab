"""Bad input: every value either builds a valid policy or raises PolicyError with a message. Never another
exception. Same for TOML profiles, the CLI (exit 2 with a message) and the pytest marker."""
from __future__ import annotations

import contextlib
import io
import math
import os
import textwrap

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sandlock_core import Policy, PolicyError  # noqa: E402
from sandlock_core.policy import parse_ports, parse_size, parse_time  # noqa: E402

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["512M", "1.5G", "0", "-1", "80", "8000-9000", "80,443", "9-8", "70000", "²", "١٢",
                              "2000-01-01T00:00:00Z", "1e9", "inf", "nan", "0-3", "0,2-3", "4-", "", " ",
                              "overlayfs", "commit", "localhost", "127.0.0.1", "::1", "/tmp", "~", "\0",
                              "1" * 400, "2000-13-01", "10T", "1.5", "1e400"])
           | st.binary(max_size=10))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def built_or_policy_error(fn):
    try:
        return fn()
    except PolicyError as exc:
        assert str(exc).strip(), "PolicyError without a message"
        return exc


@SETTINGS
@given(field=st.sampled_from(Policy.field_names()), value=values)
def test_any_value_for_any_field(field, value):
    out = built_or_policy_error(lambda: Policy(**{field: value}))
    if isinstance(out, Policy):
        assert Policy.from_dict(out.to_dict()) == out  # a built policy is a valid, round-trippable one


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(Policy.field_names()) | st.text(max_size=12), values, max_size=4))
def test_any_combination_through_from_dict(fields):
    built_or_policy_error(lambda: Policy.from_dict(fields, source="fuzz"))


@SETTINGS
@given(value=values)
def test_parse_ports(value):
    out = built_or_policy_error(lambda: parse_ports(value))
    if not isinstance(out, PolicyError):
        assert all(0 <= p <= 65535 for p in out) and list(out) == sorted(set(out))


@SETTINGS
@given(value=values)
def test_parse_size(value):
    out = built_or_policy_error(lambda: parse_size(value))
    if not isinstance(out, PolicyError):
        assert isinstance(out, int) and out >= 0


@SETTINGS
@given(value=values | st.datetimes() | st.dates())
def test_parse_time(value):
    out = built_or_policy_error(lambda: parse_time(value))
    if not isinstance(out, PolicyError):
        assert isinstance(out, float)


def test_known_edge_values():
    """Pinned cases (hypothesis found or might find them)."""
    for kw in ({"max_memory": math.inf}, {"max_disk": float("inf")}, {"max_processes": "²"},
               {"max_open_files": "١٢"}, {"time_start": math.nan}, {"time_start": math.inf},
               {"cpu_cores": "0-"}, {"net_bind": "1-2-3"}):
        built_or_policy_error(lambda: Policy(**kw))


# ---- TOML profiles --------------------------------------------------------------------------------------

toml_scalars = (st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1).map(str)
                | st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf")
                                                                    .replace("nan", "nan"))
                | st.booleans().map(lambda b: "true" if b else "false")
                | st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"')
                                           .encode("unicode_escape").decode().replace('\\\\"', '\\"') + '"')
                | st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "{}", '{a = "b"}']))
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
toml_docs = st.lists(st.tuples(st.sampled_from(Policy.field_names()) | st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                               toml_values), max_size=5).map(
    lambda kvs: "\n".join(f"{k} = {v}" for k, v in dict(kvs).items()))


@SETTINGS
@given(doc=toml_docs | st.text(max_size=80) | st.binary(max_size=40))
def test_any_profile_text(doc, tmp_path_factory):
    from sandlock_core.profile import load_profile_file
    path = tmp_path_factory.mktemp("prof") / "p.toml"
    path.write_bytes(doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass"))
    built_or_policy_error(lambda: load_profile_file(path))


# ---- the CLI --------------------------------------------------------------------------------------------

OPTIONS = ["--fs-read", "--fs-write", "--fs-deny", "--cwd", "--max-disk", "--net-allow-host", "--net-bind",
           "--net-connect", "--max-memory", "--max-processes", "--cpu", "--max-open-files", "--cpu-cores",
           "--num-cpus", "--timeout", "--time-start", "--random-seed", "--hostname", "--env", "--profile",
           "--fs-isolation", "--on-exit", "--net-deny", "--net-allow", "--workdir", "--chroot"]
FLAGS = ["--isolate-ipc", "--isolate-signals", "--isolate-pids", "--port-remap", "--clean-env", "--freeze-time",
         "--normalize-mtime", "--deterministic-dirs", "--no-coredump", "--best-effort", "--privileged"]
cli_args = st.lists(st.tuples(st.sampled_from(OPTIONS), values.map(str)).map(list)
                    | st.sampled_from(FLAGS).map(lambda f: [f]), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=cli_args)
def test_cli_bad_arguments_exit_2_with_a_message(args, monkeypatch_env):
    from sandlock_core import cli
    argv = ["run", *[a for pair in args for a in pair], "--", "true"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    if code not in (0, 127):  # 0: a valid policy ran `true`; 127: it could not exec it under that policy
        assert code == 2 and "sandlock" in err.getvalue() and "Traceback" not in err.getvalue(), (argv, code, err.getvalue())


@pytest.fixture(scope="module")
def monkeypatch_env(tmp_path_factory):
    """Profiles resolve in a scratch directory (never the user's)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SANDLOCK_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
    mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
    yield
    mp.undo()


# ---- the pytest marker ----------------------------------------------------------------------------------

BAD_MARKERS = ['max_processes="lots"', 'net_bind="70000"', 'fs_readable=42', 'no_such_field=True',
               'time_start="yesterday"', 'max_memory=float("inf")', 'cpu_cores="3-1"', 'env={1: 2}']


def test_bad_marker_values_are_reported_not_crashes(pytester):
    body = "".join(textwrap.dedent(f"""
        @pytest.mark.sandbox({m})
        def test_{i}():
            pass
        """) for i, m in enumerate(BAD_MARKERS))
    pytester.makepyfile("import pytest\n" + body)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out, out
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0, out  # none of them silently ran unconfined
    for field in ("max_processes", "net_bind", "fs_readable", "no_such_field", "time_start", "max_memory",
                  "cpu_cores", "env"):
        assert field in out, (field, out)
