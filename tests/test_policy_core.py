"""Policy construction and profiles: normalisation, clear errors naming field, value and reason."""
import datetime

import pytest

from sandlock_core import BranchAction, FsIsolation, Policy, PolicyError, parse_ports, parse_size, parse_time
from sandlock_core import profile as prof


def test_normalised_values(tmp_path):
    p = Policy(fs_readable=str(tmp_path), fs_writable=[tmp_path / "x", str(tmp_path / "x")], max_memory="1.5G",
               net_bind="8000-8002,80", time_start="2000-01-01T00:00:00Z", env={"A": "1"},
               fs_isolation="OverlayFS", on_exit="keep", cpu_cores="0,2-3")
    assert p.fs_readable == (str(tmp_path),) and p.fs_writable == (str(tmp_path / "x"),)
    assert p.max_memory == 3 << 29
    assert p.net_bind == (80, 8000, 8001, 8002)
    assert p.time_start == 946684800.0
    assert p.env["A"] == "1" and p.fs_isolation is FsIsolation.OVERLAYFS and p.on_exit is BranchAction.KEEP
    assert p.cpu_cores == (0, 2, 3)
    with pytest.raises(TypeError):
        p.env["B"] = "2"


@pytest.mark.parametrize("kw, needle", [
    ({"max_memory": "12Q"}, "max_memory: '12Q' is not a size"),
    ({"max_memory": True}, "max_memory"),
    ({"net_bind": 70000}, "net_bind: '70000' is outside 0..65535"),
    ({"net_connect": "9-1"}, "net_connect"),
    ({"max_cpu": 0}, "max_cpu: 0 is out of range"),
    ({"max_processes": "ten"}, "max_processes: 'ten' is not an integer"),
    ({"time_start": "yesterday"}, "time_start: 'yesterday' is not a time"),
    ({"random_seed": -1}, "random_seed"),
    ({"isolate_ipc": "yes"}, "isolate_ipc: 'yes' is not a boolean"),
    ({"hostname": "bad host"}, "hostname"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"fs_readable": [""]}, "fs_readable"),
    ({"fs_isolation": "zfs"}, "fs_isolation: 'zfs' is not one of none, overlayfs, branchfs"),
    ({"deny_syscalls": ["mount"], "allow_syscalls": ["read"]}, "exclusive"),
    ({"deny_syscalls": ["Mount!"]}, "deny_syscalls"),
    ({"time_freeze": True}, "time_freeze"),
])
def test_bad_values_name_the_field(kw, needle):
    with pytest.raises(PolicyError) as exc:
        Policy(**kw)
    assert needle in str(exc.value)


def test_parsers():
    assert parse_size("64k") == 65536 and parse_size(10) == 10 and parse_size("2GiB") == 2 << 30
    assert parse_ports([80, "443", "1000-1001"]) == (80, 443, 1000, 1001)
    assert parse_time(datetime.datetime(2000, 1, 1)) == 946684800.0
    assert parse_time("946684800") == 946684800.0
    assert parse_time("2000-01-01T02:00:00+02:00") == 946684800.0


def test_from_dict_and_replace_suggest_names():
    with pytest.raises(PolicyError, match="did you mean 'fs_readable'"):
        Policy.from_dict({"fs_readabel": ["/usr"]})
    with pytest.raises(PolicyError, match="unknown policy field 'nope'"):
        Policy().replace(nope=1)
    assert Policy().replace(no_udp=True).no_udp is True


def test_to_dict_round_trips_through_a_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    p = Policy(fs_readable=["/usr"], max_memory="512M", env={"CC": "gcc", "LANG": "C.UTF-8"}, clean_env=True,
               on_error="keep", net_bind=[8080])
    prof.save_profile("build", p)
    assert prof.list_profiles() == ["build"]
    assert prof.load_profile("build") == p
    with pytest.raises(PolicyError, match="exists already"):
        prof.save_profile("build", p)
    prof.delete_profile("build")
    assert prof.list_profiles() == []
    with pytest.raises(PolicyError, match="does not exist"):
        prof.load_profile("build")


@pytest.mark.parametrize("text, needle", [
    ("max_processes = 'ten'\n", "max_processes: expected an integer"),
    ("fs_readable = 3\n", "fs_readable: expected a list of strings"),
    ("fs_readabel = ['/usr']\n", "did you mean 'fs_readable'"),
    ("max_memory = \n", "not valid TOML"),
    ("[env]\nA = 1\n", "env: expected a table of strings"),
    ("max_memory = '5X'\n", "max_memory: '5X' is not a size"),
])
def test_profile_errors_name_file_and_key(tmp_path, monkeypatch, text, needle):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    d = tmp_path / "sandlock" / "profiles"
    d.mkdir(parents=True)
    (d / "p.toml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        prof.load_profile("p")
    assert str(d / "p.toml") in str(exc.value) and needle in str(exc.value)


def test_profile_names_are_validated():
    with pytest.raises(PolicyError, match="not valid"):
        prof.load_profile("../etc/passwd")
