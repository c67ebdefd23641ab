"""Saved policies: TOML files in ``$XDG_CONFIG_HOME/sandlock/profiles/NAME.toml``.

Keys are Policy fields; an ``[env]`` table sets environment variables. A wrong key or type is a
``PolicyError`` naming the file, the key and the expected type. ``profile_dict`` gives the type-checked raw
values (for the CLI to lay its flags over); ``load_profile`` gives a validated ``Policy``.
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
_PATH_FIELDS = ("fs_writable", "fs_readable", "fs_denied", "cwd", "workdir", "fs_storage", "chroot")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$", re.ASCII)


def _expected(key: str, value) -> str | None:
    """None if value has an acceptable TOML type for key, else a description of what was expected."""
    ok_str_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key in _STR_LIST:
        return None if ok_str_list or isinstance(value, str) else "a list of strings"
    if key in _PORTS:
        def port(v):
            return isinstance(v, (int, str)) and not isinstance(v, bool)
        ok = port(value) or (isinstance(value, list) and all(port(v) for v in value))
        return None if ok else "a port, a range string or a list of them"
    if key in _BOOLS:
        return None if isinstance(value, bool) else "true or false"
    if key in _INTS:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if key in _SIZES:
        return None if isinstance(value, (int, str)) and not isinstance(value, bool) else "a size such as \"512M\""
    if key in _STRS:
        return None if isinstance(value, str) else "a string"
    if key == "time_start":
        import datetime
        ok = isinstance(value, (int, float, str, datetime.date)) and not isinstance(value, bool)
        return None if ok else "a time (epoch seconds or an ISO 8601 date/time)"
    if key == "cpu_cores":
        ok = isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, (int, str)) and not isinstance(v, bool) for v in value))
        return None if ok else "a CPU list such as \"0,2-3\" or [0, 2]"
    if key == "env":
        return None if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()) \
            else "a table of strings"
    return None


def profile_dir() -> Path:
    """``$XDG_CONFIG_HOME/sandlock/profiles``, or ``~/.config/sandlock/profiles`` when the variable is unset,
    empty or relative (the XDG spec says to ignore relative values)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "sandlock" / "profiles"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PolicyError(f"profile name {name!r} is not valid (letters, digits, '.', '_' and '-'; no slashes)")


def profile_path(name: str) -> Path:
    """Where the profile called ``name`` lives (it need not exist)."""
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
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the profile: {exc.strerror or exc}") from None


def validate_dict(data: dict, source: str) -> dict:
    """Check keys and TOML types; returns the dict unchanged (Policy does the value checks)."""
    Policy.check_names(data, source)
    for key, value in data.items():
        want = _expected(key, value)
        if want is not None:
            raise PolicyError(f"{source}: {key}: expected {want}, got {value!r} ({type(value).__name__})")
    return data


def _resolve(name_or_path) -> Path:
    """A PathLike, or a string with a slash or ending in .toml, is a file; anything else a profile name."""
    if isinstance(name_or_path, os.PathLike):
        return Path(name_or_path)
    text = str(name_or_path)
    if os.sep in text or text.endswith(".toml"):
        return Path(os.path.expanduser(text))
    return profile_path(text)


def profile_dict(name_or_path) -> dict:
    """The raw, type-checked values of a profile (to merge with CLI flags, which win)."""
    path = _resolve(name_or_path)
    if not path.is_file():
        raise PolicyError(f"profile {str(name_or_path)!r} does not exist (looked for {path})")
    return validate_dict(_load_toml(path), str(path))


def load_profile_file(path) -> Policy:
    """A validated Policy from a TOML file anywhere; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"profile file {str(path)!r} does not exist")
    return Policy.from_dict(validate_dict(_load_toml(path), str(path)), source=str(path))


def load_profile(name: str) -> Policy:
    """The saved profile ``name`` as a validated Policy."""
    path = profile_path(name)
    if not path.exists():
        raise PolicyError(f"profile {name!r} does not exist (looked for {path})")
    return load_profile_file(path)


def list_profiles() -> list[str]:
    """Names of the saved profiles, sorted; empty when the directory does not exist."""
    d = profile_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.toml") if _NAME_RE.match(p.stem) and p.is_file())


def _toml_plain(v) -> bool:
    """Whether dumps_toml can write v as it is (a scalar or a flat list of scalars)."""
    if isinstance(v, (list, tuple)):
        return all(_toml_plain(x) and not isinstance(x, (list, tuple)) for x in v)
    return isinstance(v, (str, bool, int, float))


def _profile_values(data) -> dict:
    """What save_profile writes for a dict: validated through Policy; the user's own spelling is kept for
    scalars and lists ("512M" stays "512M"), but paths are written absolute (a relative path in a profile
    would depend on where it is later used) and anything else (enums, datetimes, mappings) normalised."""
    plain = Policy.from_dict(data).to_dict(only_changed=False)
    out = {}
    for key, raw in data.items():
        if key not in plain:  # None: the default
            continue
        if key in _PATH_FIELDS or key == "env" or not _toml_plain(raw):
            out[key] = plain[key]
        else:
            out[key] = list(raw) if isinstance(raw, tuple) else raw
    return out


def save_profile(name: str, policy, overwrite: bool = False) -> Path:
    """Write a Policy (its non-default fields) or a dict of fields as profile ``name``; returns the path.

    The values are validated before anything is written, and the file appears atomically: readers see the
    old profile or the new one. Without ``overwrite`` an existing profile is an error.
    """
    path = profile_path(name)
    if isinstance(policy, Policy):
        data = policy.to_dict()
    elif isinstance(policy, dict) or hasattr(policy, "items"):
        data = _profile_values(dict(policy))
    else:
        raise PolicyError(f"profile {name!r}: expected a Policy or a dict of fields, got {policy!r}")
    text = dumps_toml(data)
    if not overwrite and path.exists():
        raise PolicyError(f"profile {name!r} exists already ({path}); pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if someone created it meanwhile: never clobber
            except FileExistsError:
                raise PolicyError(f"profile {name!r} exists already ({path}); pass overwrite=True to replace "
                                  f"it") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def delete_profile(name: str) -> None:
    """Remove the saved profile ``name``."""
    path = profile_path(name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise PolicyError(f"profile {name!r} does not exist (looked for {path})") from None


def _toml_string(v: str) -> str:
    out = []
    for ch in v:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a surrogate-escaped byte: TOML files are UTF-8
            raise PolicyError(f"cannot write {v!r} to TOML: it is not valid UTF-8")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k) -> str:
    if not isinstance(k, str) or not k:
        raise PolicyError(f"cannot write the key {k!r} to TOML")
    return k if _BARE_KEY_RE.match(k) else _toml_string(k)


def _toml_value(v, key: str = "value") -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, key) for x in v) + "]"
    raise PolicyError(f"{key}: cannot write {v!r} ({type(v).__name__}) to TOML")


def dumps_toml(data) -> str:
    """A TOML document for profile values: top-level keys (str, int, float, bool or lists of them), then an
    ``[env]`` table of strings. None values are left out; anything else raises PolicyError."""
    lines = []
    for k, v in data.items():
        if k == "env" or v is None:
            continue
        lines.append(f"{_toml_key(k)} = {_toml_value(v, k)}")
    env = data.get("env")
    if env:
        if not hasattr(env, "items"):
            raise PolicyError(f"env: cannot write {env!r} as a TOML table")
        if lines:
            lines.append("")
        lines.append("[env]")
        for k, v in env.items():
            if not isinstance(v, str):
                raise PolicyError(f"env[{k}]: cannot write {v!r}: environment values are strings")
            lines.append(f"{_toml_key(k)} = {_toml_string(v)}")
    return "\n".join(lines) + "\n" if lines else ""
