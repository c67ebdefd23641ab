"""Saved policies: TOML files in ``$XDG_CONFIG_HOME/sandlock/profiles/NAME.toml``.

Keys are Policy fields; an ``[env]`` table sets environment variables. A wrong key or type is a
``PolicyError`` naming the file, the key and the expected type.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import PolicyError
from .policy import Policy

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Expected TOML types per field (for messages that say what was expected).
_STR_LIST = ("fs_writable", "fs_readable", "fs_denied", "deny_syscalls", "allow_syscalls", "net_allow_hosts")
_PORTS = ("net_bind", "net_connect")
_BOOLS = ("no_raw_sockets", "no_udp", "isolate_ipc", "isolate_signals", "isolate_pids", "port_remap", "time_freeze",
          "no_randomize_memory", "no_huge_pages", "no_coredump", "deterministic_dirs", "clean_env", "close_fds",
          "privileged", "best_effort", "normalize_mtime")
_INTS = ("max_processes", "max_cpu", "max_open_files", "num_cpus", "random_seed")
_SIZES = ("max_memory", "max_disk")
_STRS = ("hostname", "cwd", "workdir", "fs_storage", "chroot", "fs_isolation", "on_exit", "on_error")


def _expected(key: str, value) -> str | None:
    """None if value has an acceptable TOML type for key, else a description of what was expected."""
    ok_str_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key in _STR_LIST:
        return None if ok_str_list or isinstance(value, str) else "a list of strings"
    if key in _PORTS:
        ok = isinstance(value, (int, str)) or (isinstance(value, list) and all(isinstance(v, (int, str)) for v in value))
        return None if ok and not isinstance(value, bool) else "a port, a range string or a list of them"
    if key in _BOOLS:
        return None if isinstance(value, bool) else "true or false"
    if key in _INTS:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if key in _SIZES:
        return None if isinstance(value, (int, str)) and not isinstance(value, bool) else "a size such as \"512M\""
    if key in _STRS:
        return None if isinstance(value, str) else "a string"
    if key == "time_start":
        return None if isinstance(value, (int, float, str)) and not isinstance(value, bool) else "a time"
    if key == "cpu_cores":
        return None if isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, int) for v in value)) else "a CPU list such as \"0,2-3\""
    if key == "env":
        return None if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()) \
            else "a table of strings"
    return None


def profile_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sandlock" / "profiles"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PolicyError(f"profile name {name!r} is not valid (letters, digits, '.', '_' and '-'; no slashes)")


def profile_path(name: str) -> Path:
    _check_name(name)
    return profile_dir() / f"{name}.toml"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None


def validate_dict(data: dict, source: str) -> dict:
    """Check keys and TOML types; returns the dict unchanged (Policy does the value checks)."""
    Policy.check_names(data, source)
    for key, value in data.items():
        want = _expected(key, value)
        if want is not None:
            raise PolicyError(f"{source}: {key}: expected {want}, got {value!r} ({type(value).__name__})")
    return data


def profile_dict(name_or_path) -> dict:
    """The raw, type-checked values of a profile (to merge with CLI flags, which win)."""
    path = Path(name_or_path) if os.sep in str(name_or_path) else profile_path(name_or_path)
    if not path.exists():
        raise PolicyError(f"profile {str(name_or_path)!r} does not exist (looked for {path})")
    return validate_dict(_load_toml(path), str(path))


def load_profile_file(path) -> Policy:
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"profile file {str(path)!r} does not exist")
    return Policy.from_dict(validate_dict(_load_toml(path), str(path)), source=str(path))


def load_profile(name: str) -> Policy:
    path = profile_path(name)
    if not path.exists():
        raise PolicyError(f"profile {name!r} does not exist (looked for {path})")
    return load_profile_file(path)


def list_profiles() -> list[str]:
    d = profile_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.toml") if _NAME_RE.match(p.stem))


def save_profile(name: str, policy, overwrite: bool = False) -> Path:
    data = policy.to_dict() if isinstance(policy, Policy) else dict(policy)
    Policy.from_dict(data)  # validate before writing anything
    path = profile_path(name)
    if path.exists() and not overwrite:
        raise PolicyError(f"profile {name!r} exists already ({path}); pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dumps_toml(data))
    os.replace(tmp, path)
    return path


def delete_profile(name: str) -> None:
    path = profile_path(name)
    if not path.exists():
        raise PolicyError(f"profile {name!r} does not exist (looked for {path})")
    path.unlink()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise PolicyError(f"cannot write {v!r} to TOML")


def dumps_toml(data: dict) -> str:
    """A TOML document for profile values: top-level keys, then an [env] table."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "env"]
    env = data.get("env")
    if env:
        lines += ["", "[env]"] + [f"{_toml_value(k) if not re.match(r'^[A-Za-z0-9_-]+$', k) else k} = "
                                   f"{_toml_value(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"
