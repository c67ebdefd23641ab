"""The policy's fields, defaults and validators, shared by ``Policy`` (the public frozen dataclass, in
``policy.py``) and ``LeanPolicy`` (what ``sandlock run`` builds).

Why two classes: ``sandlock run`` pays every import at every start, and ``import dataclasses`` alone costs
~10 ms (it imports ``inspect``, ``re`` and ``copy``). So this module imports nothing heavy at module level (no
``dataclasses``, ``re``, ``datetime``, ``typing``): sizes, ports, CPU lists and names are parsed by hand, and
``datetime``/``re`` are imported only when a time is given as an ISO 8601 string. Both classes run the SAME
``normalise()``, so values, defaults and ``PolicyError`` messages cannot drift apart.

Adding a field: one row in ``FIELDS`` and its step in ``normalise()``; ``Policy`` is built from the table.
"""
from __future__ import annotations

import os
import sys
from _collections_abc import Mapping  # = collections.abc.Mapping, without importing collections (CLI start-up)

from ._enum import Enum
from .errors import PolicyError

_MappingProxy = type(type.__dict__)  # = types.MappingProxyType, as types.py defines it (CLI start-up)


class FsIsolation(Enum):
    NONE = "none"
    OVERLAYFS = "overlayfs"
    BRANCHFS = "branchfs"


class BranchAction(Enum):
    COMMIT = "commit"
    ABORT = "abort"
    KEEP = "keep"


# (name, annotation, default) in the dataclass's order. ``env``'s default is a fresh empty dict.
FIELDS: tuple[tuple[str, str, object], ...] = (
    # Filesystem (Landlock)
    ("fs_writable", "tuple", ()),
    ("fs_readable", "tuple", ()),
    ("fs_denied", "tuple", ()),
    # Syscall filtering (seccomp)
    ("deny_syscalls", "Any", None),
    ("allow_syscalls", "Any", None),
    # Network
    ("net_allow_hosts", "Any", None),
    ("net_bind", "tuple", ()),
    ("net_connect", "tuple", ()),
    ("no_raw_sockets", "bool", True),
    ("no_udp", "bool", False),
    # IPC and process scoping
    ("isolate_ipc", "bool", False),
    ("isolate_signals", "bool", False),
    ("isolate_pids", "bool", False),
    # Resources
    ("max_memory", "Any", None),
    ("max_processes", "int", 64),
    ("max_cpu", "Any", None),
    ("max_open_files", "Any", None),
    ("port_remap", "bool", False),
    # Deterministic execution
    ("time_start", "Any", None),
    ("time_freeze", "bool", False),
    ("random_seed", "Any", None),
    ("no_randomize_memory", "bool", False),
    ("no_huge_pages", "bool", False),
    ("no_coredump", "bool", False),
    ("deterministic_dirs", "bool", False),
    ("normalize_mtime", "bool", False),  # stat shows times stamped during the run on the sandbox clock
    ("hostname", "Any", None),
    ("num_cpus", "Any", None),
    ("cpu_cores", "Any", None),
    # Environment
    ("clean_env", "bool", False),
    ("env", "Mapping", dict),  # a factory: every policy gets its own mapping
    ("cwd", "Any", None),
    # Copy-on-write isolation
    ("workdir", "Any", None),
    ("fs_isolation", "Any", FsIsolation.NONE),
    ("fs_storage", "Any", None),
    ("max_disk", "Any", None),
    ("on_exit", "Any", BranchAction.COMMIT),
    ("on_error", "Any", BranchAction.ABORT),
    # Misc
    ("chroot", "Any", None),
    ("close_fds", "bool", True),
    ("privileged", "bool", False),
    ("best_effort", "bool", False),
)
FIELD_NAMES: tuple[str, ...] = tuple(name for name, _, _ in FIELDS)
FACTORY_FIELDS = frozenset({"env"})
_KNOWN = frozenset(FIELD_NAMES)

_PATH_LISTS = ("fs_writable", "fs_readable", "fs_denied")
_SINGLE_PATHS = ("cwd", "workdir", "fs_storage", "chroot")
_BOOLS = ("no_raw_sockets", "no_udp", "isolate_ipc", "isolate_signals", "isolate_pids", "port_remap",
          "time_freeze", "no_randomize_memory", "no_huge_pages", "no_coredump", "deterministic_dirs",
          "normalize_mtime", "clean_env", "close_fds", "privileged", "best_effort")

MAX_CPU_NUMBER = 8191  # the kernel's largest NR_CPUS; also bounds the expansion of ranges such as '0-99999999'
_SIZE_HELP = "is not a size (expected a number with an optional K, M, G or T suffix, e.g. '512M')"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Every spelling of a unit (case-insensitive): K/M/G/T with an optional "B" or "iB", or a bare "B" (bytes).
_UNIT_SPELLINGS = {"": "", "b": ""} | {u + tail: u for u in "kmgt" for tail in ("", "b", "ib")}
_UNIT_LETTERS = frozenset("kmgtibKMGTIB")
_BLANKS = " \t\n\r\f\v"  # ASCII whitespace only: a Unicode space in a number is an error, not padding
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.:_-[]%")
_HOSTNAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_SYSCALL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _fail(field_name: str, value, why: str) -> PolicyError:
    return PolicyError(f"{field_name}: {value!r} {why}")


# ---- hand-written scanners (instead of regular expressions: ``re`` costs ~3 ms of CLI start-up) ----

def _digits(s: str) -> bool:
    """One or more ASCII digits, nothing else."""
    return s.isascii() and s.isdigit()


def _uint(s: str) -> bool:
    """ASCII digits with optional ASCII blanks around them."""
    return _digits(s.strip(_BLANKS))


def _range(s: str):
    """``(a, b)`` from 'A' (b is None) or 'A-B', ASCII digits with ASCII blanks around each; else None."""
    first, dash, second = s.partition("-")
    first = first.strip(_BLANKS)
    if not _digits(first):
        return None
    if not dash:
        return int(first), None
    second = second.strip(_BLANKS)
    return (int(first), int(second)) if _digits(second) else None


def _decimal(s: str) -> bool:
    """'12', '12.', '12.5' or '.5' (ASCII digits)."""
    whole, dot, frac = s.partition(".")
    if whole:
        return _digits(whole) and (not frac or _digits(frac))
    return bool(dot) and _digits(frac)


def _made_of(s, chars: frozenset) -> bool:
    return isinstance(s, str) and bool(s) and all(c in chars for c in s)


# ---- parsers (public through sandlock_core.policy) ----

def parse_size(value, field: str = "size") -> int:
    """Bytes from an int or a string like '512M', '1.5G', '64k', '2GiB', '10MB' (binary multiples)."""
    if isinstance(value, bool):
        raise _fail(field, value, _SIZE_HELP)
    if isinstance(value, int):
        if value < 0:
            raise _fail(field, value, "is negative (expected a number of bytes >= 0)")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _fail(field, value, _SIZE_HELP)
        if value < 0:
            raise _fail(field, value, "is negative (expected a number of bytes >= 0)")
        return int(value)
    if isinstance(value, str):
        text = value.strip(_BLANKS)
        end = len(text)
        while end and text[end - 1] in _UNIT_LETTERS:
            end -= 1
        unit = _UNIT_SPELLINGS.get(text[end:].lower())
        number = text[:end].rstrip(_BLANKS)
        if unit is not None and _decimal(number):
            if "." not in number:
                return int(number) * _UNITS[unit]  # exact, however large
            return int(float(number) * _UNITS[unit])
        if value.strip().startswith("-"):
            raise _fail(field, value, "is negative (expected a number of bytes >= 0)")
    raise _fail(field, value, _SIZE_HELP)


def parse_ports(value, field: str = "ports") -> tuple[int, ...]:
    """Ports from 80, '80', '8000-9000', '80,443,9000-9002' or a list of those: sorted, deduplicated, 0..65535.

    Ranges are merged as intervals before expansion, so the result has at most 65536 entries whatever the
    input repeats, and the work is bounded by the input's length.
    """
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    spans: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise _fail(field, item, "is not a port (expected an int or a string such as '8000-9000')")
        if isinstance(item, int):
            if not 0 <= item <= 65535:
                raise _fail(field, str(item), "is outside 0..65535")  # same spelling as in '80,70000'
            spans.append((item, item))
            continue
        if not isinstance(item, str):
            raise _fail(field, item, "is not a port (expected an int or a string such as '8000-9000')")
        parts = [p for p in item.split(",") if p.strip()]
        if not parts:
            raise _fail(field, item, "is not a port or range (e.g. 8080 or '8000-9000')")
        for part in parts:
            bounds = _range(part)
            if bounds is None:
                raise _fail(field, part.strip(), "is not a port or range (e.g. 8080 or '8000-9000')")
            a, b = bounds[0], bounds[0] if bounds[1] is None else bounds[1]
            if a > 65535 or b > 65535:
                raise _fail(field, part.strip(), "is outside 0..65535")
            if a > b:
                raise _fail(field, part.strip(), "is a range whose start is above its end")
            spans.append((a, b))
    spans.sort()
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out: list[int] = []
    for a, b in merged:
        out.extend(range(a, b + 1))
    return tuple(out)


def parse_time(value, field: str = "time_start") -> float:
    """Epoch seconds from a number, a datetime, an ISO 8601 string (naive = UTC) or a numeric string."""
    if isinstance(value, bool):
        raise _fail(field, value, "is not a time")
    if isinstance(value, (int, float)):
        return _finite(field, value)
    _dt = sys.modules.get("datetime")  # a date object exists only if its module was imported
    if _dt is not None and isinstance(value, _dt.datetime):
        dt = value
    elif _dt is not None and isinstance(value, _dt.date):
        dt = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        s = value.strip()
        try:
            number = float(s)
        except ValueError:
            pass
        else:
            return _finite(field, value, number)
        dt = _parse_iso(field, value, s)
    else:
        raise _fail(field, value, "is not a time (expected ISO 8601 or epoch seconds)")
    if dt.tzinfo is None:
        import datetime as _dt
        dt = dt.replace(tzinfo=_dt.timezone.utc)
    return dt.timestamp()


def _parse_iso(field: str, value, s: str):
    import datetime as _dt
    import re
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    # Python 3.10's fromisoformat takes only 3 or 6 fractional digits: pad or cut to 6.
    s = re.sub(r"(?<=:\d\d)\.(\d+)", lambda m: "." + (m.group(1) + "00000")[:6], s, flags=re.ASCII)
    try:
        return _dt.datetime.fromisoformat(s)
    except ValueError:
        raise _fail(field, value, "is not a time (expected ISO 8601 such as '2000-01-01T00:00:00Z' "
                                  "or epoch seconds)") from None


def _finite(field_name: str, value, number=None) -> float:
    try:
        number = float(value if number is None else number)
    except OverflowError:
        number = float("inf")
    if number != number or number in (float("inf"), float("-inf")):
        raise _fail(field_name, value, "is not a finite number of epoch seconds")
    return number


def parse_cpu_list(value, field: str = "cpu_cores") -> tuple[int, ...]:
    """CPU numbers from '0,2-3', 3 or a list such as [0, '2-3']: sorted, deduplicated, 0..MAX_CPU_NUMBER."""
    if isinstance(value, str):
        items: list = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise _fail(field, value, "is not a CPU list (e.g. '0,2-3' or [0, 2])")
    cpus: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise _fail(field, item, "is not a CPU number or range")
        bounds = _range(item) if isinstance(item, str) else None
        if isinstance(item, int):
            a = b = item
            if a < 0:
                raise _fail(field, item, "is not a CPU number (expected 0 or more)")
        elif bounds is not None:
            a, b = bounds[0], bounds[0] if bounds[1] is None else bounds[1]
            if a > b:
                raise _fail(field, item.strip(), "is a range whose start is above its end")
        else:
            raise _fail(field, item, "is not a CPU number or range (e.g. 3 or '2-5')")
        if b > MAX_CPU_NUMBER:
            raise _fail(field, item, f"is beyond CPU {MAX_CPU_NUMBER}")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise _fail(field, value, "names no CPU")
    return tuple(sorted(cpus))


# ---- per-field validators ----

def _path(field_name: str, value) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise _fail(field_name, value, "is not a path (expected a string)")
    if not value or "\0" in value:
        raise _fail(field_name, value, "is not a valid path")
    return os.path.normpath(os.path.abspath(os.path.expanduser(value)))


def _paths(field_name: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _fail(field_name, value, "is not a list of paths")
    return tuple(dict.fromkeys(_path(field_name, v) for v in value))


def _bool(field_name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _fail(field_name, value, "is not a boolean (expected True or False)")
    return value


def _int(field_name: str, value, lo: int, hi: int | None = None, *, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and _uint(value):  # CLI flags arrive as strings
            value = int(value)
        else:
            raise _fail(field_name, value, "is not an integer")
    if value < lo or (hi is not None and value > hi):
        raise _fail(field_name, value, f"is out of range ({lo}..{hi if hi is not None else 'inf'})")
    return value


def _enum(field_name: str, cls, value):
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.value, member.name.lower()):
                return member
    choices = ", ".join(m.value for m in cls)
    raise _fail(field_name, value, f"is not one of {choices}")


def _syscall_names(field_name: str, value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _fail(field_name, value, "is not a list of syscall names")
    out = []
    for v in value:
        if not _made_of(v, _SYSCALL_CHARS):
            raise _fail(field_name, v, "is not a syscall name")
        out.append(v)
    return tuple(dict.fromkeys(out))


def _env(value) -> Mapping[str, str]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail("env", value, "is not a mapping of names to values")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise _fail("env", k, "is not a valid variable name")
        if not isinstance(v, str) or "\0" in v:
            raise _fail(f"env[{k}]", v, "is not a string value")
        out[k] = v
    return _MappingProxy(out)


def _hosts(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _fail("net_allow_hosts", value, "is not a list of host names")
    for h in value:
        if not _made_of(h, _HOST_CHARS):
            raise _fail("net_allow_hosts", h, "is not a host name or address")
    return tuple(dict.fromkeys(value))


def _hostname_ok(name) -> bool:
    """1-64 of A-Z a-z 0-9 . - (HOST_NAME_MAX is 64), starting with a letter or digit."""
    return _made_of(name, _HOSTNAME_CHARS) and len(name) <= 64 and name[0] not in ".-"


# ---- the whole policy ----

def defaults() -> dict:
    """Every field at its default (a fresh ``env`` dict)."""
    return {name: default() if name in FACTORY_FIELDS else default for name, _, default in FIELDS}


def normalise(v: dict) -> dict:
    """Validate and normalise every field of ``v`` (a dict with all FIELD_NAMES), in place; returns ``v``.

    The order of the checks is part of the contract: with several bad fields, the first one here is reported.
    """
    for name in _PATH_LISTS:
        v[name] = _paths(name, v[name])
    for name in _SINGLE_PATHS:
        v[name] = None if v[name] is None else _path(name, v[name])
    v["deny_syscalls"] = _syscall_names("deny_syscalls", v["deny_syscalls"])
    v["allow_syscalls"] = _syscall_names("allow_syscalls", v["allow_syscalls"])
    if v["deny_syscalls"] is not None and v["allow_syscalls"] is not None:
        raise PolicyError("deny_syscalls and allow_syscalls are exclusive: an allowlist already denies "
                          "everything it does not list")
    v["net_allow_hosts"] = _hosts(v["net_allow_hosts"])
    v["net_bind"] = parse_ports(v["net_bind"], "net_bind")
    v["net_connect"] = parse_ports(v["net_connect"], "net_connect")
    for name in _BOOLS:
        v[name] = _bool(name, v[name])
    v["max_memory"] = None if v["max_memory"] is None else parse_size(v["max_memory"], "max_memory")
    v["max_disk"] = None if v["max_disk"] is None else parse_size(v["max_disk"], "max_disk")
    v["max_processes"] = _int("max_processes", v["max_processes"], 1, optional=False)
    v["max_cpu"] = _int("max_cpu", v["max_cpu"], 1, 100)
    v["max_open_files"] = _int("max_open_files", v["max_open_files"], 1, 1 << 30)
    v["num_cpus"] = _int("num_cpus", v["num_cpus"], 1, 4096)
    v["cpu_cores"] = None if v["cpu_cores"] is None else parse_cpu_list(v["cpu_cores"])
    v["time_start"] = None if v["time_start"] is None else parse_time(v["time_start"])
    if v["normalize_mtime"] and v["time_start"] is None:
        raise PolicyError("normalize_mtime: True needs time_start (the sandbox clock it shows times on)")
    if v["time_freeze"] and v["time_start"] is None:
        raise PolicyError("time_freeze: True needs time_start (the instant the clock is frozen at)")
    v["random_seed"] = _int("random_seed", v["random_seed"], 0, (1 << 64) - 1)
    if v["hostname"] is not None and not _hostname_ok(v["hostname"]):
        raise _fail("hostname", v["hostname"], "is not a valid host name (1-64 of A-Z a-z 0-9 . -)")
    v["env"] = _env(v["env"])
    v["fs_isolation"] = _enum("fs_isolation", FsIsolation, v["fs_isolation"])
    v["on_exit"] = _enum("on_exit", BranchAction, v["on_exit"])
    v["on_error"] = _enum("on_error", BranchAction, v["on_error"])
    return v


def check_names(names, source: str | None = None) -> None:
    """Every name a policy field, else a PolicyError suggesting the nearest one."""
    prefix = f"{source}: " if source else ""
    for name in names:
        if not isinstance(name, str):
            raise PolicyError(f"{prefix}policy field names are strings, got {name!r}")
        if name not in _KNOWN:
            import difflib  # only on the error path
            near = difflib.get_close_matches(name, sorted(_KNOWN), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PolicyError(f"{prefix}unknown policy field {name!r}{hint}")


def checked_dict(d, source: str | None = None) -> dict:
    """``d`` (field name -> value) checked for names: what ``Policy.from_dict`` and ``LeanPolicy`` accept."""
    if not isinstance(d, Mapping):
        prefix = f"{source}: " if source else ""
        raise PolicyError(f"{prefix}a policy must be a mapping of field names to values, got {d!r}")
    check_names(d, source)
    return dict(d)


class LeanPolicy:
    """The same validated, normalised, immutable values as ``Policy``, without the dataclass machinery: what
    ``sandlock run`` hands to ``Sandbox`` (everything downstream only reads attributes). ``to_policy()`` gives
    the real ``Policy`` when something needs it."""

    __slots__ = FIELD_NAMES

    def __init__(self, **values):
        merged = defaults()
        merged.update(checked_dict(values))
        for name, value in normalise(merged).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d, source: str | None = None) -> "LeanPolicy":
        """Like ``Policy.from_dict``: ``source`` prefixes every error message."""
        values = checked_dict(d, source)
        try:
            return cls(**values)
        except PolicyError as exc:
            if source:
                raise PolicyError(f"{source}: {exc}") from None
            raise

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}")

    def to_policy(self):
        from .policy import Policy
        return Policy(**{name: getattr(self, name) for name in FIELD_NAMES})

    def __repr__(self) -> str:
        changed = defaults()
        return "LeanPolicy(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in FIELD_NAMES
                                         if getattr(self, n) != changed[n]) + ")"
