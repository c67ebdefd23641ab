"""TOML profiles: location, load/save/list/delete, name validation, type errors naming file and key, dumps_toml."""
import os
import pathlib

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from sandlock_core.errors import PolicyError
from sandlock_core.policy import BranchAction, FsIsolation, Policy
from sandlock_core.profile import (delete_profile, dumps_toml, list_profiles, load_profile, load_profile_file,
                                   profile_dict, profile_dir, profile_path, save_profile)

README_PROFILE = """\
# ~/.config/sandlock/profiles/build.toml
fs_writable = ["/tmp/work"]
fs_readable = ["/usr", "/lib", "/lib64", "/bin", "/etc"]
clean_env = true
isolate_ipc = true
max_memory = "512M"
max_processes = 50

[env]
CC = "gcc"
LANG = "C.UTF-8"
"""


@pytest.fixture
def pdir(tmp_path, monkeypatch):
    """A fresh XDG_CONFIG_HOME; returns the (not yet created) profile directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "sandlock" / "profiles"


def write(pdir, name, text):
    pdir.mkdir(parents=True, exist_ok=True)
    path = pdir / f"{name}.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- location


def test_profile_dir_follows_xdg_config_home(pdir, tmp_path):
    assert profile_dir() == pdir
    assert profile_path("build") == pdir / "build.toml"


@pytest.mark.parametrize("value", [None, "", "relative/dir"])
def test_profile_dir_defaults_to_home_config(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if value is None:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", value)  # empty or relative: ignored, as the XDG spec says
    assert profile_dir() == tmp_path / "home" / ".config" / "sandlock" / "profiles"


# ---------------------------------------------------------------- loading


def test_readme_profile_loads(pdir):
    write(pdir, "build", README_PROFILE)
    p = load_profile("build")
    assert p.fs_writable == ("/tmp/work",) and p.fs_readable == ("/usr", "/lib", "/lib64", "/bin", "/etc")
    assert p.clean_env is True and p.isolate_ipc is True
    assert p.max_memory == 512 << 20 and p.max_processes == 50
    assert dict(p.env) == {"CC": "gcc", "LANG": "C.UTF-8"}


def test_profile_dict_gives_raw_values_for_the_cli_to_override(pdir):
    path = write(pdir, "build", README_PROFILE)
    raw = profile_dict("build")
    assert raw["max_memory"] == "512M" and raw["env"] == {"CC": "gcc", "LANG": "C.UTF-8"}
    # the CLI's merge: flags win over the profile
    merged = {**raw, "max_processes": 10}
    assert Policy.from_dict(merged).max_processes == 10
    assert profile_dict(str(path)) == raw  # a path works too
    assert profile_dict(path) == raw


def test_profile_dict_takes_a_toml_file_anywhere(tmp_path, monkeypatch, pdir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.toml").write_text("no_udp = true\n")
    assert profile_dict("local.toml") == {"no_udp": True}
    assert profile_dict(tmp_path / "local.toml") == {"no_udp": True}
    with pytest.raises(PolicyError, match="does not exist"):
        profile_dict(str(tmp_path / "missing.toml"))


def test_load_profile_file(tmp_path):
    path = tmp_path / "any.toml"
    path.write_text('fs_isolation = "OverlayFS"\non_exit = "keep"\nnet_bind = ["80", 443, "8000-8001"]\n'
                    'time_start = 2000-01-01T00:00:00Z\ncpu_cores = "0,2-3"\n')
    p = load_profile_file(path)
    assert p.fs_isolation is FsIsolation.OVERLAYFS and p.on_exit is BranchAction.KEEP
    assert p.net_bind == (80, 443, 8000, 8001) and p.time_start == 946684800.0 and p.cpu_cores == (0, 2, 3)
    assert load_profile_file(str(path)) == p
    with pytest.raises(PolicyError, match="does not exist"):
        load_profile_file(tmp_path / "nope.toml")
    with pytest.raises(PolicyError, match="does not exist"):
        load_profile_file(tmp_path)  # a directory is not a profile


@pytest.mark.parametrize("text", [
    "time_start = 946684800\n", "time_start = 946684800.0\n", "time_start = '2000-01-01T00:00:00'\n",
    "time_start = 2000-01-01T00:00:00\n", "time_start = 2000-01-01\n", "time_start = 2000-01-01T02:00:00+02:00\n",
])
def test_time_start_in_every_toml_spelling(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert load_profile_file(path).time_start == 946684800.0


def test_empty_profile_is_the_default_policy(pdir):
    write(pdir, "empty", "")
    assert load_profile("empty") == Policy()


# ---------------------------------------------------------------- errors name the file and the key


@pytest.mark.parametrize("text, needle", [
    ("max_processes = 'ten'\n", "max_processes: expected an integer, got 'ten' (str)"),
    ("max_processes = 1.5\n", "max_processes: expected an integer, got 1.5 (float)"),
    ("max_cpu = true\n", "max_cpu: expected an integer, got True (bool)"),
    ("random_seed = '42'\n", "random_seed: expected an integer"),
    ("fs_readable = 3\n", "fs_readable: expected a list of strings, got 3 (int)"),
    ("fs_writable = [1, 2]\n", "fs_writable: expected a list of strings"),
    ("net_allow_hosts = [true]\n", "net_allow_hosts: expected a list of strings"),
    ("deny_syscalls = 7\n", "deny_syscalls: expected a list of strings"),
    ("net_bind = 1.5\n", "net_bind: expected a port"),
    ("net_connect = [true]\n", "net_connect: expected a port"),
    ("net_bind = true\n", "net_bind: expected a port"),
    ("no_udp = 'yes'\n", "no_udp: expected true or false, got 'yes' (str)"),
    ("clean_env = 1\n", "clean_env: expected true or false, got 1 (int)"),
    ("max_memory = 1.5\n", "max_memory: expected a size"),
    ("max_memory = true\n", "max_memory: expected a size"),
    ("hostname = 5\n", "hostname: expected a string"),
    ("fs_isolation = 1\n", "fs_isolation: expected a string"),
    ("workdir = ['/a']\n", "workdir: expected a string"),
    ("time_start = true\n", "time_start: expected a time"),
    ("cpu_cores = 1.5\n", "cpu_cores: expected a CPU list"),
    ("cpu_cores = [true]\n", "cpu_cores: expected a CPU list"),
    ("env = 'A=1'\n", "env: expected a table of strings"),
    ("[env]\nA = 1\n", "env: expected a table of strings"),
    ("[env.sub]\nA = '1'\n", "env: expected a table of strings"),
])
def test_wrong_toml_types_name_file_key_and_type(pdir, text, needle):
    path = write(pdir, "p", text)
    for load in (lambda: load_profile("p"), lambda: profile_dict("p"), lambda: load_profile_file(path)):
        with pytest.raises(PolicyError) as exc:
            load()
        assert str(exc.value) == f"{path}: {str(exc.value).split(': ', 1)[1]}"
        assert str(exc.value).startswith(f"{path}: ") and needle in str(exc.value)


def test_the_documented_message(pdir):
    path = write(pdir, "build", "max_processes = 'ten'\n")
    with pytest.raises(PolicyError) as exc:
        load_profile("build")
    assert str(exc.value) == f"{path}: max_processes: expected an integer, got 'ten' (str)"


@pytest.mark.parametrize("text, needle", [
    ("max_memory = '5X'\n", "max_memory: '5X' is not a size"),
    ("max_processes = 0\n", "max_processes: 0 is out of range"),
    ("net_bind = 70000\n", "net_bind: '70000' is outside 0..65535"),
    ("fs_isolation = 'zfs'\n", "fs_isolation: 'zfs' is not one of none, overlayfs, branchfs"),
    ("hostname = 'bad host'\n", "hostname: 'bad host'"),
    ("[env]\n'A=B' = 'x'\n", "env: 'A=B'"),
    ("deny_syscalls = ['mount']\nallow_syscalls = ['read']\n", "exclusive"),
])
def test_bad_values_name_file_and_field(pdir, text, needle):
    path = write(pdir, "p", text)
    with pytest.raises(PolicyError) as exc:
        load_profile("p")
    assert str(exc.value).startswith(f"{path}: ") and needle in str(exc.value)


def test_unknown_key_names_file_key_and_suggestion(pdir):
    path = write(pdir, "p", "fs_readabel = ['/usr']\n")
    with pytest.raises(PolicyError) as exc:
        load_profile("p")
    assert str(exc.value) == f"{path}: unknown policy field 'fs_readabel' (did you mean 'fs_readable'?)"
    write(pdir, "q", "[network]\nbind = 80\n")
    with pytest.raises(PolicyError, match="unknown policy field 'network'"):
        profile_dict("q")


@pytest.mark.parametrize("text", ["max_memory = \n", "fs_readable = ['/usr'\n", "a = 1\na = 2\n", "= 3\n"])
def test_toml_syntax_error_names_the_file(pdir, text):
    path = write(pdir, "p", text)
    with pytest.raises(PolicyError) as exc:
        load_profile("p")
    msg = str(exc.value)
    assert msg.startswith(f"{path}: not valid TOML: ")
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        assert str(e) in msg  # tomllib's own words, with line and column


def test_non_utf8_profile(pdir):
    pdir.mkdir(parents=True)
    (pdir / "p.toml").write_bytes(b"hostname = '\xff'\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_profile("p")


def test_unreadable_profile(pdir):
    """A profile that cannot be read (for root too: a directory where the file should be) is a PolicyError."""
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "p.toml").mkdir()
    with pytest.raises(PolicyError) as exc:
        load_profile_file(pdir / "p.toml")
    assert "p.toml" in str(exc.value)


def test_unreadable_profile_as_an_unprivileged_user():
    import shutil
    import tempfile
    from pathlib import Path
    from support import run_as_nobody
    tmp_path = Path(tempfile.mkdtemp())  # pytest's tmp_path sits under a 0700 directory uid 65534 cannot enter
    d = tmp_path / "cfg" / "sandlock" / "profiles"
    d.mkdir(parents=True)
    for x in (tmp_path, tmp_path / "cfg", tmp_path / "cfg" / "sandlock", d):
        x.chmod(0o755)
    (d / "p.toml").write_text("no_udp = true\n")
    (d / "p.toml").chmod(0)
    code = ("import os; os.environ['XDG_CONFIG_HOME'] = %r\n"
            "from sandlock_core.profile import load_profile\n"
            "from sandlock_core.errors import PolicyError\n"
            "try:\n    load_profile('p'); print('loaded')\n"
            "except PolicyError as e:\n    print('PolicyError', e)\n") % str(tmp_path / "cfg")
    try:
        res = run_as_nobody(code)
    finally:
        shutil.rmtree(tmp_path)
    assert res.stdout.startswith("PolicyError") and "cannot read the profile" in res.stdout, res


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "-x", "a b", "a\0", "é", "_x", None, 3])
def test_profile_names_are_validated(pdir, name):
    for fn in (profile_path, load_profile, delete_profile, lambda n: save_profile(n, Policy())):
        with pytest.raises(PolicyError) as exc:
            fn(name)
        assert f"profile name {name!r} is not valid" in str(exc.value)
    assert not pdir.exists()  # nothing was written


@pytest.mark.parametrize("name", ["build", "a", "py3.11", "my_profile-2", "X"])
def test_good_names(pdir, name):
    assert profile_path(name).name == f"{name}.toml"
    save_profile(name, Policy(no_udp=True))
    assert name in list_profiles() and load_profile(name).no_udp is True


# ---------------------------------------------------------------- list / save / delete


def test_list_profiles(pdir):
    assert list_profiles() == []  # the directory does not exist
    write(pdir, "zeta", "")
    write(pdir, "alpha", "")
    write(pdir, "Beta", "")
    (pdir / "notes.txt").write_text("")
    (pdir / ".hidden.toml").write_text("")
    (pdir / "dir.toml").mkdir()
    assert list_profiles() == ["Beta", "alpha", "zeta"]


def test_save_load_delete(pdir):
    p = Policy(fs_readable=["/usr"], max_memory="512M", env={"CC": "gcc", "LANG": "C.UTF-8"}, clean_env=True,
               on_error="keep", net_bind=[8080])
    path = save_profile("build", p)
    assert path == pdir / "build.toml" and path.is_file()
    assert list_profiles() == ["build"] and load_profile("build") == p
    assert [f.name for f in pdir.iterdir()] == ["build.toml"]  # no temporary file left behind
    with pytest.raises(PolicyError, match=r"profile 'build' exists already .*overwrite=True"):
        save_profile("build", Policy())
    assert load_profile("build") == p  # untouched
    save_profile("build", Policy(no_udp=True), overwrite=True)
    assert load_profile("build") == Policy(no_udp=True)
    delete_profile("build")
    assert list_profiles() == []
    with pytest.raises(PolicyError) as exc:
        delete_profile("build")
    assert str(exc.value) == f"profile 'build' does not exist (looked for {pdir / 'build.toml'})"
    with pytest.raises(PolicyError, match="profile 'build' does not exist"):
        load_profile("build")
    with pytest.raises(PolicyError, match="profile 'build' does not exist"):
        profile_dict("build")


def test_save_a_dict_keeps_readable_spellings(pdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_profile("d", {"max_memory": "512M", "net_bind": ("80", 443), "fs_readable": "rel",
                              "on_exit": BranchAction.KEEP, "fs_isolation": "OverlayFS", "hostname": None,
                              "env": {"A": "1"}})
    data = tomllib.loads(path.read_text())
    assert data == {"max_memory": "512M", "net_bind": ["80", 443], "fs_readable": [str(tmp_path / "rel")],
                    "on_exit": "keep", "fs_isolation": "OverlayFS", "env": {"A": "1"}}
    assert load_profile("d") == Policy(max_memory=512 << 20, net_bind=[80, 443], fs_readable=[tmp_path / "rel"],
                                       on_exit="keep", fs_isolation=FsIsolation.OVERLAYFS, env={"A": "1"})


def test_save_validates_before_writing(pdir):
    with pytest.raises(PolicyError, match="max_memory: '12Q' is not a size"):
        save_profile("bad", {"max_memory": "12Q"})
    with pytest.raises(PolicyError, match="did you mean 'no_udp'"):
        save_profile("bad", {"no_udpp": True})
    with pytest.raises(PolicyError, match="expected a Policy or a dict"):
        save_profile("bad", ["no_udp"])
    assert list_profiles() == []


def test_round_trip_of_every_field(pdir, tmp_path):
    """to_dict -> dumps_toml -> load_profile_file gives an equal Policy, for every field at once."""
    p = Policy(
        fs_writable=[tmp_path / "w"], fs_readable=["/usr", "/lib"], fs_denied=["/proc/kcore"],
        allow_syscalls=["read", "write"], net_allow_hosts=["api.example.com", "10.0.0.1"], net_bind=[8080],
        net_connect="443,8000-8002", no_raw_sockets=False, no_udp=True, isolate_ipc=True, isolate_signals=True,
        isolate_pids=True, max_memory="1.5G", max_processes=10, max_cpu=50, max_open_files=256, port_remap=True,
        time_start="2000-01-01T00:00:00.25Z", time_freeze=True, random_seed=2 ** 64 - 1, no_randomize_memory=True,
        no_huge_pages=True, no_coredump=True, deterministic_dirs=True, normalize_mtime=True, hostname="box", num_cpus=2,
        cpu_cores="0-1", clean_env=True, env={"CC": "gcc", "WEIRD": 'a "quoted"\\ value\n\ttab', "X Y": ""},
        cwd="/tmp", workdir=tmp_path / "wd", fs_isolation="branchfs", fs_storage=tmp_path / "st", max_disk="10G",
        on_exit="abort", on_error="keep", chroot="/srv/root", close_fds=False, privileged=True, best_effort=True)
    for only_changed in (True, False):
        text = dumps_toml(p.to_dict(only_changed=only_changed))
        path = tmp_path / f"rt{only_changed}.toml"
        path.write_text(text)
        assert load_profile_file(path) == p
    d = p.to_dict()
    assert set(d) == set(Policy.field_names()) - {"deny_syscalls"}  # exclusive with allow_syscalls
    save_profile("all", p)
    assert load_profile("all") == p


def test_round_trip_of_deny_syscalls_and_sizes(tmp_path):
    p = Policy(deny_syscalls=["mount", "ptrace"], max_memory=12345)
    path = tmp_path / "p.toml"
    path.write_text(dumps_toml(p.to_dict()))
    assert load_profile_file(path) == p


# ---------------------------------------------------------------- dumps_toml


def test_dumps_toml_value_types():
    data = {"s": "plain", "i": -3, "big": 2 ** 64 - 1, "f": 1.5, "e": 1e-7, "t": True, "n": False, "l": ["a", 1],
            "empty": [], "none": None, "env": {"A": "1", "with space": "2", "dotted.key": "3", "ünï": "4"}}
    text = dumps_toml(data)
    back = tomllib.loads(text)
    expected = {k: v for k, v in data.items() if v is not None}
    assert back == expected
    assert text.index("[env]") > text.index("l = ")  # top-level keys come before the table


@pytest.mark.parametrize("s", ['"', "\\", "a\\nb", "\n", "\t", "\r", "\x00", "\x1f", "\x7f", "é ☃ 😀", "'''", '"""',
                               "#not a comment", "[env]", "a = b"])
def test_dumps_toml_escapes_strings(s):
    data = {"hostname": s, "l": [s, s], "env": {s or "k": s}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_dumps_toml_special_floats():
    back = tomllib.loads(dumps_toml({"a": float("inf"), "b": float("-inf")}))
    assert back == {"a": float("inf"), "b": float("-inf")}


def test_dumps_toml_empty():
    assert dumps_toml({}) == "" and tomllib.loads(dumps_toml({})) == {}
    assert dumps_toml({"env": {}}) == ""
    assert tomllib.loads(dumps_toml({"env": {"A": "1"}})) == {"env": {"A": "1"}}


@pytest.mark.parametrize("data", [{"x": {"nested": 1}}, {"x": object()}, {"x": pathlib.Path("/a")},
                                  {"env": {"A": 1}}, {"env": "A=1"}, {"": 1}, {"x": "\udcff"}])
def test_dumps_toml_refuses_what_it_cannot_write(data):
    with pytest.raises(PolicyError):
        dumps_toml(data)
