"""Policy: validation and normalisation of every field, the parse_* helpers, and the dict helpers.

Pure Python: no kernel features needed.
"""
import dataclasses
import datetime
import os
import pathlib
import types

import pytest

from sandlock_core import errors
from sandlock_core.errors import PolicyError
from sandlock_core.policy import (BranchAction, FsIsolation, Policy, parse_cpu_list, parse_ports, parse_size,
                                  parse_time)

EPOCH_2000 = 946684800.0


# ---------------------------------------------------------------- errors


def test_exception_tree():
    assert issubclass(errors.PolicyError, errors.SandlockError)
    assert issubclass(errors.PolicyError, ValueError)
    assert issubclass(errors.SandboxError, errors.SandlockError)
    assert issubclass(errors.ConfinementError, errors.SandboxError)
    assert issubclass(errors.LandlockUnavailableError, errors.ConfinementError)
    assert issubclass(errors.SeccompError, errors.ConfinementError)
    assert issubclass(errors.NotifError, errors.SeccompError)
    assert issubclass(errors.ChildError, errors.SandboxError)
    assert issubclass(errors.BranchError, errors.SandboxError)
    assert issubclass(errors.BranchConflictError, errors.BranchError)
    assert not issubclass(errors.SandboxError, ValueError)
    assert issubclass(errors.SandlockError, Exception)


# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize("value, expected", [
    (0, 0), (100, 100), ("100", 100), ("0", 0), ("100B", 100), ("100b", 100),
    ("64k", 64 << 10), ("64K", 64 << 10), ("512M", 512 << 20), ("1.5G", 3 << 29), ("2GiB", 2 << 30),
    ("10MB", 10 << 20), ("1T", 1 << 40), ("1tib", 1 << 40), (" 512 M ", 512 << 20), ("0.5k", 512),
    (".5K", 512), ("1.K", 1024), (1.9, 1), ("99999999999999999999T", 99999999999999999999 << 40),
])
def test_parse_size(value, expected):
    result = parse_size(value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value", ["12Q", "", "M", "1.2.3M", "1e3", "-1", "-5M", "1 iB", "1iB", "5KK", "0x10",
                                   -1, -0.5, True, None, [], float("inf"), float("nan"), "٣M"])
def test_parse_size_rejects(value):
    with pytest.raises(PolicyError) as exc:
        parse_size(value, "max_memory")
    assert str(exc.value).startswith(f"max_memory: {value!r} ")


def test_parse_size_message_matches_the_documented_one():
    with pytest.raises(PolicyError) as exc:
        parse_size("12Q", "max_memory")
    assert str(exc.value) == ("max_memory: '12Q' is not a size (expected a number with an optional K, M, G or T "
                              "suffix, e.g. '512M')")
    with pytest.raises(PolicyError, match=r"^size: -3 is negative"):
        parse_size(-3)


# ---------------------------------------------------------------- parse_ports


@pytest.mark.parametrize("value, expected", [
    (80, (80,)), ("80", (80,)), (0, (0,)), (65535, (65535,)), ("8000-8003", (8000, 8001, 8002, 8003)),
    ("80,443,9000-9002", (80, 443, 9000, 9001, 9002)), ([443, "80", "1000-1001"], (80, 443, 1000, 1001)),
    ((443, 80, 443), (80, 443)), ({22, 21}, (21, 22)), ("5-5", (5,)), (" 80 , 81 - 82 ", (80, 81, 82)),
    ("80,,81", (80, 81)), ([], ()), ((), ()), (None, ()), (["1-3", "2-4", "10", 4], (1, 2, 3, 4, 10)),
])
def test_parse_ports(value, expected):
    assert parse_ports(value) == expected


def test_parse_ports_full_range_and_repeats_stay_bounded():
    everything = parse_ports("0-65535")
    assert len(everything) == 65536 and everything[0] == 0 and everything[-1] == 65535
    assert parse_ports(["0-65535"] * 1000 + [80]) == everything


@pytest.mark.parametrize("value, why", [
    (70000, "outside 0..65535"), ("65536", "outside 0..65535"), ("1-70000", "outside 0..65535"),
    ("9-1", "start is above its end"), ("http", "is not a port"), ("", "is not a port"), (",", "is not a port"),
    ("-1", "is not a port"), (-1, "outside 0..65535"), ("1-2-3", "is not a port"), (True, "is not a port"),
    (8.0, "is not a port"), ([80, None], "is not a port"), ("8_0", "is not a port"), ("+80", "is not a port"),
    ("٨٠", "is not a port"), ({"a": 1}, "is not a port"),
])
def test_parse_ports_rejects(value, why):
    with pytest.raises(PolicyError) as exc:
        parse_ports(value, "net_bind")
    assert str(exc.value).startswith("net_bind: ") and why in str(exc.value)


# ---------------------------------------------------------------- parse_time


@pytest.mark.parametrize("value", [
    EPOCH_2000, int(EPOCH_2000), "946684800", "946684800.0", " 946684800 ",
    "2000-01-01T00:00:00Z", "2000-01-01T00:00:00z", "2000-01-01T00:00:00", "2000-01-01T02:00:00+02:00",
    "1999-12-31T19:00:00-05:00", "2000-01-01", "2000-01-01 00:00:00",
    datetime.datetime(2000, 1, 1), datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc),
    datetime.datetime(2000, 1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
    datetime.date(2000, 1, 1),
])
def test_parse_time(value):
    result = parse_time(value)
    assert result == EPOCH_2000 and type(result) is float


def test_parse_time_keeps_fractions_and_old_dates():
    assert parse_time("2000-01-01T00:00:00.5Z") == EPOCH_2000 + 0.5
    assert parse_time(0) == 0.0
    assert parse_time("1969-12-31T23:59:59Z") == -1.0


@pytest.mark.parametrize("value", ["yesterday", "", "2000-13-01", "2000-01-01T25:00:00", "nan", "inf", "1e400",
                                   float("nan"), float("inf"), 10 ** 400, True, None, [2000]])
def test_parse_time_rejects(value):
    with pytest.raises(PolicyError) as exc:
        parse_time(value)
    assert str(exc.value).startswith(f"time_start: {value!r} ")


# ---------------------------------------------------------------- parse_cpu_list


@pytest.mark.parametrize("value, expected", [
    ("0,2-3", (0, 2, 3)), ("3", (3,)), (3, (3,)), ([2, 0, "4-5"], (0, 2, 4, 5)), ((1, 1), (1,)),
    (" 1 , 0 ", (0, 1)), ("0-0", (0,)),
])
def test_parse_cpu_list(value, expected):
    assert parse_cpu_list(value) == expected


@pytest.mark.parametrize("value", ["", ",", "a", "3-1", "-1", -1, [True], [1.5], 1.5, None, "0-99999999999",
                                   "²", [], {"a": 0}])
def test_parse_cpu_list_rejects(value):
    with pytest.raises(PolicyError, match="^cpu_cores: "):
        parse_cpu_list(value)


# ---------------------------------------------------------------- defaults


def test_defaults_match_the_contract():
    p = Policy()
    expected = dict(
        fs_writable=(), fs_readable=(), fs_denied=(), deny_syscalls=None, allow_syscalls=None, net_allow_hosts=None,
        net_bind=(), net_connect=(), no_raw_sockets=True, no_udp=False, isolate_ipc=False, isolate_signals=False,
        isolate_pids=False, max_memory=None, max_processes=64, max_cpu=None, max_open_files=None, port_remap=False,
        time_start=None, time_freeze=False, random_seed=None, no_randomize_memory=False, no_huge_pages=False,
        no_coredump=False, deterministic_dirs=False, hostname=None, num_cpus=None, cpu_cores=None, clean_env=False,
        cwd=None, workdir=None, fs_isolation=FsIsolation.NONE, fs_storage=None, max_disk=None,
        on_exit=BranchAction.COMMIT, on_error=BranchAction.ABORT, chroot=None, close_fds=True, privileged=False,
        best_effort=False)
    for name, value in expected.items():
        assert getattr(p, name) == value, name
    assert dict(p.env) == {} and isinstance(p.env, types.MappingProxyType)
    assert set(expected) | {"env"} <= set(Policy.field_names())


def test_field_names():
    names = Policy.field_names()
    assert isinstance(names, tuple) and names[:3] == ("fs_writable", "fs_readable", "fs_denied")
    assert names == tuple(f.name for f in dataclasses.fields(Policy))


def test_enums():
    assert [m.value for m in FsIsolation] == ["none", "overlayfs", "branchfs"]
    assert [m.value for m in BranchAction] == ["commit", "abort", "keep"]


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["fs_writable", "fs_readable", "fs_denied"])
def test_path_lists_are_absolute_normalised_string_tuples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = Policy(**{name: ["rel", pathlib.Path("/usr//lib/../bin/"), "~/x", "/usr/bin", b"/opt"]})
    assert getattr(p, name) == (str(tmp_path / "rel"), "/usr/bin", str(tmp_path / "home" / "x"), "/opt")
    assert Policy(**{name: "/usr"}) == Policy(**{name: ["/usr"]})  # a single str is one path, not characters
    assert getattr(Policy(**{name: pathlib.Path("/usr")}), name) == ("/usr",)
    assert getattr(Policy(**{name: ("/a", "/b")}), name) == ("/a", "/b")


@pytest.mark.parametrize("value, why", [
    ([""], "is not a valid path"), (["/a\0b"], "is not a valid path"), ([3], "is not a path"), (3, "is not a list"),
    ({"/usr": 1}, "is not a list"), ("", "is not a valid path"),
])
def test_bad_path_lists(value, why):
    with pytest.raises(PolicyError) as exc:
        Policy(fs_readable=value)
    assert str(exc.value).startswith("fs_readable: ") and why in str(exc.value)


@pytest.mark.parametrize("name", ["cwd", "workdir", "fs_storage", "chroot"])
def test_single_paths(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert getattr(Policy(**{name: "sub/../dir/"}), name) == str(tmp_path / "dir")
    assert getattr(Policy(**{name: tmp_path}), name) == str(tmp_path)
    assert getattr(Policy(), name) is None
    for bad in ("", "a\0b", 3, ["/a"]):
        with pytest.raises(PolicyError, match=f"^{name}: "):
            Policy(**{name: bad})


# ---------------------------------------------------------------- network


def test_hosts():
    assert Policy(net_allow_hosts=["api.example.com", "10.0.0.1", "::1", "api.example.com"]).net_allow_hosts == (
        "api.example.com", "10.0.0.1", "::1")
    assert Policy(net_allow_hosts="example.com").net_allow_hosts == ("example.com",)
    assert Policy(net_allow_hosts=[]).net_allow_hosts == ()  # empty: no destination at all, unlike None
    assert Policy().net_allow_hosts is None
    for bad in ([""], ["a b"], ["a\0"], [3], 3):
        with pytest.raises(PolicyError, match="^net_allow_hosts: "):
            Policy(net_allow_hosts=bad)


@pytest.mark.parametrize("name", ["net_bind", "net_connect"])
def test_port_fields(name):
    assert getattr(Policy(**{name: "443,80-81"}), name) == (80, 81, 443)
    assert getattr(Policy(**{name: 8080}), name) == (8080,)
    assert getattr(Policy(**{name: None}), name) == ()
    with pytest.raises(PolicyError, match=f"^{name}: '99999' is outside"):
        Policy(**{name: "99999"})


# ---------------------------------------------------------------- booleans

BOOLS = ["no_raw_sockets", "no_udp", "isolate_ipc", "isolate_signals", "isolate_pids", "port_remap",
         "no_randomize_memory", "no_huge_pages", "no_coredump", "deterministic_dirs", "clean_env", "close_fds",
         "privileged", "best_effort"]


@pytest.mark.parametrize("name", BOOLS)
def test_booleans_must_be_real_bools(name):
    assert getattr(Policy(**{name: True}), name) is True
    assert getattr(Policy(**{name: False}), name) is False
    for bad in ("yes", 1, 0, None, "true"):
        with pytest.raises(PolicyError) as exc:
            Policy(**{name: bad})
        assert str(exc.value) == f"{name}: {bad!r} is not a boolean (expected True or False)"


@pytest.mark.parametrize("name", ["time_freeze", "normalize_mtime"])
def test_clock_flags_are_bools_and_need_a_start(name):
    assert getattr(Policy(**{name: True}, time_start=0), name) is True
    with pytest.raises(PolicyError, match=f"^{name}: 'yes' is not a boolean"):
        Policy(**{name: "yes"}, time_start=0)
    with pytest.raises(PolicyError, match=f"^{name}: True needs time_start"):
        Policy(**{name: True})


# ---------------------------------------------------------------- resources


@pytest.mark.parametrize("name", ["max_memory", "max_disk"])
def test_sizes(name):
    assert getattr(Policy(**{name: "512M"}), name) == 512 << 20
    assert getattr(Policy(**{name: 4096}), name) == 4096
    assert getattr(Policy(), name) is None
    with pytest.raises(PolicyError, match=f"^{name}: '5X' is not a size"):
        Policy(**{name: "5X"})


@pytest.mark.parametrize("name, good, bad", [
    ("max_processes", [1, 64, "10"], [0, -1, None, "ten", 1.0, True, "²"]),
    ("max_open_files", [1, 256, None], [0, "many", 2.5, False]),
    ("max_cpu", [1, 50, 100, None], [0, 101, "half", True]),
    ("num_cpus", [1, 4, None], [0, -2, "x", True]),
    ("random_seed", [0, 42, 2 ** 64 - 1, None], [-1, 2 ** 64, True, False, "seed", 1.5]),
])
def test_integers(name, good, bad):
    for value in good:
        result = getattr(Policy(**{name: value}), name)
        assert result == (None if value is None else int(value))
        assert result is None or type(result) is int
    for value in bad:
        with pytest.raises(PolicyError) as exc:
            Policy(**{name: value})
        assert str(exc.value).startswith(f"{name}: {value!r} "), (value, str(exc.value))


def test_integer_messages_say_why():
    with pytest.raises(PolicyError, match=r"^max_processes: 'ten' is not an integer$"):
        Policy(max_processes="ten")
    with pytest.raises(PolicyError, match=r"^max_cpu: 101 is out of range \(1\.\.100\)$"):
        Policy(max_cpu=101)


def test_cpu_cores():
    assert Policy(cpu_cores="0,2-3").cpu_cores == (0, 2, 3)
    assert Policy(cpu_cores=[3, 1]).cpu_cores == (1, 3)
    assert Policy().cpu_cores is None
    with pytest.raises(PolicyError, match="^cpu_cores: "):
        Policy(cpu_cores="x")


# ---------------------------------------------------------------- determinism


def test_time_start():
    assert Policy(time_start="2000-01-01T00:00:00").time_start == EPOCH_2000
    assert Policy(time_start=datetime.datetime(2000, 1, 1)).time_start == EPOCH_2000
    assert type(Policy(time_start=0).time_start) is float
    with pytest.raises(PolicyError, match="^time_start: 'soon' is not a time"):
        Policy(time_start="soon")


@pytest.mark.parametrize("value", ["a", "host-1", "a.b.c", "x" * 64, "0"])
def test_hostname_ok(value):
    assert Policy(hostname=value).hostname == value


@pytest.mark.parametrize("value", ["", "x" * 65, "bad host", "a_b", "-x", "é", "a\0", 3, ["a"]])
def test_hostname_bad(value):
    with pytest.raises(PolicyError, match="^hostname: "):
        Policy(hostname=value)


# ---------------------------------------------------------------- syscalls


@pytest.mark.parametrize("name", ["deny_syscalls", "allow_syscalls"])
def test_syscall_lists(name):
    assert getattr(Policy(**{name: ["mount", "ptrace", "mount"]}), name) == ("mount", "ptrace")
    assert getattr(Policy(**{name: "mount"}), name) == ("mount",)
    assert getattr(Policy(**{name: ()}), name) == ()
    assert getattr(Policy(), name) is None
    for bad in (["Mount"], ["mo unt"], [""], [3], 3, ["séance"]):
        with pytest.raises(PolicyError, match=f"^{name}: "):
            Policy(**{name: bad})


def test_syscall_lists_are_exclusive():
    with pytest.raises(PolicyError, match="deny_syscalls and allow_syscalls are exclusive"):
        Policy(deny_syscalls=["mount"], allow_syscalls=["read"])
    with pytest.raises(PolicyError, match="exclusive"):
        Policy(deny_syscalls=[], allow_syscalls=[])


# ---------------------------------------------------------------- env


def test_env_is_an_immutable_copy():
    src = {"A": "1", "B": ""}
    p = Policy(env=src)
    src["C"] = "3"
    assert dict(p.env) == {"A": "1", "B": ""} and isinstance(p.env, types.MappingProxyType)
    with pytest.raises(TypeError):
        p.env["D"] = "4"
    assert Policy(env=types.MappingProxyType({"A": "1"})) == p.replace(env={"A": "1"})
    assert dict(Policy(env=None).env) == {}


@pytest.mark.parametrize("value, needle", [
    ({"": "x"}, "env: '' is not a valid variable name"), ({"A=B": "x"}, "env: 'A=B'"), ({"A\0": "x"}, "env: "),
    ({3: "x"}, "env: 3"), ({"A": 1}, "env[A]: 1 is not a string"), ({"A": "x\0"}, "env[A]: "),
    (["A=1"], "env: ['A=1'] is not a mapping"), ("A=1", "env: 'A=1' is not a mapping"),
])
def test_env_bad(value, needle):
    with pytest.raises(PolicyError) as exc:
        Policy(env=value)
    assert needle in str(exc.value)


# ---------------------------------------------------------------- enums


@pytest.mark.parametrize("name, cls", [("fs_isolation", FsIsolation), ("on_exit", BranchAction),
                                       ("on_error", BranchAction)])
def test_enum_fields(name, cls):
    for member in cls:
        assert getattr(Policy(**{name: member}), name) is member
        assert getattr(Policy(**{name: member.value.upper()}), name) is member
        assert getattr(Policy(**{name: member.value.title()}), name) is member
    choices = ", ".join(m.value for m in cls)
    for bad in ("zfs", "", 1, None, BranchAction.KEEP if cls is FsIsolation else FsIsolation.NONE):
        with pytest.raises(PolicyError) as exc:
            Policy(**{name: bad})
        assert str(exc.value) == f"{name}: {bad!r} is not one of {choices}"


# ---------------------------------------------------------------- the dataclass


def test_frozen_and_equality():
    p = Policy(fs_readable=["/usr"], env={"A": "1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.no_udp = True
    assert p == Policy(fs_readable="/usr", env={"A": "1"})
    assert p != Policy(fs_readable="/usr", env={"A": "2"})
    assert p != Policy()
    assert p != "policy"
    with pytest.raises(TypeError):
        hash(p)  # env is a mapping: documented as unhashable


def test_normalised_values_are_stable():
    """Normalising a normalised policy changes nothing (consumers never re-parse)."""
    p = Policy(fs_readable="/usr", net_bind="80-81", max_memory="1G", time_start="2000-01-01", cpu_cores="0-1",
               env={"A": "1"}, fs_isolation="overlayfs", workdir="/tmp", hostname="h", random_seed=7)
    assert dataclasses.replace(p) == p
    assert Policy(**{f: getattr(p, f) for f in Policy.field_names()}) == p


def test_replace():
    p = Policy(fs_readable=["/usr"])
    q = p.replace(no_udp=True, max_memory="1K")
    assert q.no_udp is True and q.max_memory == 1024 and q.fs_readable == ("/usr",)
    assert p.no_udp is False  # the original is untouched
    with pytest.raises(PolicyError, match=r"^unknown policy field 'no_udpp' \(did you mean 'no_udp'\?\)$"):
        p.replace(no_udpp=True)
    with pytest.raises(PolicyError, match="^max_cpu: "):
        p.replace(max_cpu=0)


def test_from_dict():
    p = Policy.from_dict({"fs_readable": ["/usr"], "max_memory": "512M", "on_exit": "ABORT"})
    assert p == Policy(fs_readable="/usr", max_memory=512 << 20, on_exit=BranchAction.ABORT)
    assert Policy.from_dict({}) == Policy()


def test_from_dict_unknown_key_suggests():
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"fs_readabel": ["/usr"]})
    assert str(exc.value) == "unknown policy field 'fs_readabel' (did you mean 'fs_readable'?)"
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"zzzzzz": 1})
    assert str(exc.value) == "unknown policy field 'zzzzzz'"


def test_from_dict_source_prefixes_messages():
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"max_memmory": "1G"}, source="/p/build.toml")
    assert str(exc.value) == "/p/build.toml: unknown policy field 'max_memmory' (did you mean 'max_memory'?)"
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"max_memory": "12Q"}, source="/p/build.toml")
    assert str(exc.value).startswith("/p/build.toml: max_memory: '12Q' is not a size")
    with pytest.raises(PolicyError, match="^/p: a policy must be a mapping"):
        Policy.from_dict(["fs_readable"], source="/p")
    with pytest.raises(PolicyError, match="field names are strings"):
        Policy.from_dict({1: 2})


def test_to_dict_only_changed():
    assert Policy().to_dict() == {}
    p = Policy(fs_readable="/usr", max_memory="1K", env={"A": "1"}, on_exit="keep", net_bind=[80],
               time_start="2000-01-01", no_raw_sockets=False, max_processes=64)
    assert p.to_dict() == {"fs_readable": ["/usr"], "max_memory": 1024, "env": {"A": "1"}, "on_exit": "keep",
                           "net_bind": [80], "time_start": EPOCH_2000, "no_raw_sockets": False}


def test_to_dict_everything_is_plain():
    full = Policy(cpu_cores="1", deny_syscalls=["mount"]).to_dict(only_changed=False)
    assert "max_memory" not in full and "hostname" not in full  # None values are left out
    assert full["fs_isolation"] == "none" and full["on_exit"] == "commit" and full["on_error"] == "abort"
    assert full["max_processes"] == 64 and full["env"] == {} and full["cpu_cores"] == [1]
    assert full["deny_syscalls"] == ["mount"]

    def plain(v):
        if isinstance(v, list):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return type(v) in (str, int, float, bool)
    assert all(plain(v) for v in full.values())
    assert Policy.from_dict(full) == Policy(cpu_cores="1", deny_syscalls=["mount"])


def test_import_is_cheap():
    """The CLI imports policy on every run: no typing, difflib or tomllib at import time."""
    import subprocess
    import sys
    code = ("import sys, sandlock_core.policy; "
            "print(','.join(m for m in ('typing', 'difflib', 'tomllib', 'tomli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert "difflib" not in out.stdout and "tomllib" not in out.stdout


# ---------------------------------------------------------------- hand scanners vs the regular expressions
# policy_spec parses by hand (``re`` costs CLI start-up); these are the expressions it replaced, as oracles.
# One deliberate difference: ``$`` let a trailing newline through ('host\n'); fullmatch does not.

import re  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from sandlock_core import policy_spec  # noqa: E402

_ORACLE_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE | re.ASCII)
_ORACLE_UINT = re.compile(r"^\s*(\d+)\s*$", re.ASCII)
_ORACLE_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$", re.ASCII)
_ORACLE_HOST = re.compile(r"[A-Za-z0-9.:_\-\[\]%]+", re.ASCII)
_ORACLE_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,63}", re.ASCII)
_ORACLE_SYSCALL = re.compile(r"[a-z0-9_]+", re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

scanner_text = st.text(alphabet=st.sampled_from("0123456789 .-,kKmMgGtTbBiI\t\n\x0b\u00a0\u0663\u2009_xZ:%[]a"),
                       max_size=12)


def _oracle_size(s):
    m = _ORACLE_SIZE.match(s)
    if not m:
        return None
    number, unit = m.group(1), _UNITS[(m.group(2) or "").lower()]
    return int(number) * unit if "." not in number else int(float(number) * unit)


@settings(max_examples=3000, deadline=None)
@given(s=scanner_text)
def test_scanners_match_the_regular_expressions(s):
    try:
        size = parse_size(s)
    except PolicyError:
        size = None
    assert size == _oracle_size(s)
    assert policy_spec._uint(s) == bool(_ORACLE_UINT.match(s))
    m = _ORACLE_RANGE.match(s)
    assert policy_spec._range(s) == (None if not m else (int(m.group(1)), m.group(2) and int(m.group(2))))
    assert policy_spec._made_of(s, policy_spec._HOST_CHARS) == bool(_ORACLE_HOST.fullmatch(s))
    assert policy_spec._hostname_ok(s) == bool(_ORACLE_HOSTNAME.fullmatch(s))
    assert policy_spec._made_of(s, policy_spec._SYSCALL_CHARS) == bool(_ORACLE_SYSCALL.fullmatch(s))


@pytest.mark.parametrize("name, value", [("hostname", "box\n"), ("net_allow_hosts", ["example.com\n"]),
                                         ("deny_syscalls", ["mount\n"])])
def test_a_trailing_newline_is_not_a_name(name, value):
    with pytest.raises(PolicyError, match=f"^{name}: "):
        Policy(**{name: value})


# ---------------------------------------------------------------- LeanPolicy (what `sandlock run` builds)

from sandlock_core.policy_spec import LeanPolicy  # noqa: E402


def test_policy_fields_come_from_the_table():
    assert Policy.field_names() == policy_spec.FIELD_NAMES
    for f in dataclasses.fields(Policy):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert default == policy_spec.defaults()[f.name]


LEAN_CASES = [
    {},
    {"fs_readable": ["/usr", "/usr/", "/lib"], "fs_writable": "/tmp", "net_bind": "8000-8002,80", "max_memory": "1.5G",
     "cpu_cores": "0,2-3", "env": {"A": "1"}, "fs_isolation": "OverlayFS", "on_exit": "keep", "max_open_files": "64",
     "time_start": "2000-01-01T00:00:00.5Z", "random_seed": 7, "hostname": "h", "deny_syscalls": ["mount"]},
    {"time_start": 12.5, "time_freeze": True, "net_allow_hosts": "example.com", "max_disk": 10},
]


@pytest.mark.parametrize("values", LEAN_CASES)
def test_lean_policy_has_the_same_values(values):
    lean, full = LeanPolicy.from_dict(values), Policy.from_dict(values)
    for name in policy_spec.FIELD_NAMES:
        assert getattr(lean, name) == getattr(full, name), name
        assert type(getattr(lean, name)) is type(getattr(full, name)), name
    assert lean.to_policy() == full
    with pytest.raises(AttributeError, match="cannot assign to field 'no_udp'"):
        lean.no_udp = True
    with pytest.raises(AttributeError):
        del lean.no_udp
    with pytest.raises(TypeError):
        lean.env["B"] = "2"


@pytest.mark.parametrize("values, source", [
    ({"max_memory": "12Q"}, None), ({"fs_readabel": ["/usr"]}, None), ({"max_memmory": "1G"}, "/p/x.toml"),
    ({"net_bind": 70000, "max_cpu": 0}, None), ({"deny_syscalls": ["mount"], "allow_syscalls": ["read"]}, None),
    ({"time_freeze": True}, "src"), ({1: 2}, None), (["fs_readable"], "/p"), ({"hostname": "bad host"}, None),
])
def test_lean_policy_raises_the_same_errors(values, source):
    with pytest.raises(PolicyError) as full:
        Policy.from_dict(values, source=source)
    with pytest.raises(PolicyError) as lean:
        LeanPolicy.from_dict(values, source=source)
    assert str(lean.value) == str(full.value)
