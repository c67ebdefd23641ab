"""``Policy``: what a sandbox may do. A frozen dataclass, validated and normalised at construction, so
every consumer reads plain values (bytes as int, ports as sorted tuples, times as epoch floats, paths as
absolute strings, enums as members). A bad value raises ``PolicyError`` naming the field, the value and why.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import os
import re
import types

Any = object  # annotations only; importing typing costs ~3 ms of CLI start-up
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import PolicyError


class FsIsolation(enum.Enum):
    NONE = "none"
    OVERLAYFS = "overlayfs"
    BRANCHFS = "branchfs"


class BranchAction(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"
    KEEP = "keep"


# A number, then an optional unit: K/M/G/T with an optional "B" or "iB", or a bare "B" (bytes).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE | re.ASCII)
_UINT_RE = re.compile(r"^\s*(\d+)\s*$", re.ASCII)
_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$", re.ASCII)
_FRACTION_RE = re.compile(r"(?<=:\d\d)\.(\d+)", re.ASCII)
MAX_CPU_NUMBER = 8191  # the kernel's largest NR_CPUS; also bounds the expansion of ranges such as '0-99999999'
_SIZE_HELP = "is not a size (expected a number with an optional K, M, G or T suffix, e.g. '512M')"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_HOST_RE = re.compile(r"^[A-Za-z0-9.:_\-\[\]%]+$", re.ASCII)
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,63}$", re.ASCII)  # HOST_NAME_MAX is 64
_SYSCALL_RE = re.compile(r"^[a-z0-9_]+$", re.ASCII)


def _fail(field_name: str, value: Any, why: str) -> PolicyError:
    return PolicyError(f"{field_name}: {value!r} {why}")


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
        m = _SIZE_RE.match(value)
        if m:
            number, unit = m.group(1), _UNITS[(m.group(2) or "").lower()]
            if "." not in number:
                return int(number) * unit  # exact, however large
            return int(float(number) * unit)
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
            m = _RANGE_RE.match(part)
            if not m:
                raise _fail(field, part.strip(), "is not a port or range (e.g. 8080 or '8000-9000')")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
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
    if isinstance(value, _dt.datetime):
        dt = value
    elif isinstance(value, _dt.date):
        dt = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        s = value.strip()
        try:
            number = float(s)
        except ValueError:
            pass
        else:
            return _finite(field, value, number)
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        # Python 3.10's fromisoformat takes only 3 or 6 fractional digits: pad or cut to 6.
        s = _FRACTION_RE.sub(lambda m: "." + (m.group(1) + "00000")[:6], s)
        try:
            dt = _dt.datetime.fromisoformat(s)
        except ValueError:
            raise _fail(field, value, "is not a time (expected ISO 8601 such as '2000-01-01T00:00:00Z' "
                                      "or epoch seconds)") from None
    else:
        raise _fail(field, value, "is not a time (expected ISO 8601 or epoch seconds)")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.timezone.utc)
    return dt.timestamp()


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
        if isinstance(item, int):
            a = b = item
            if a < 0:
                raise _fail(field, item, "is not a CPU number (expected 0 or more)")
        elif isinstance(item, str) and _RANGE_RE.match(item):
            m = _RANGE_RE.match(item)
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
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
        if isinstance(value, str) and _UINT_RE.match(value):  # CLI flags arrive as strings
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
        if not isinstance(v, str) or not _SYSCALL_RE.match(v):
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
    return types.MappingProxyType(out)


def _hosts(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _fail("net_allow_hosts", value, "is not a list of host names")
    for h in value:
        if not isinstance(h, str) or not _HOST_RE.match(h):
            raise _fail("net_allow_hosts", h, "is not a host name or address")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True, eq=True)
class Policy:
    """What a sandbox may do. Construction validates every field and normalises it in place:

    * path lists (``fs_*``) -> tuple of absolute, normalised str (a single str or PathLike is one path);
      single paths (``cwd``, ``workdir``, ``fs_storage``, ``chroot``) -> str or None
    * ``net_bind``/``net_connect`` -> sorted tuple of int; ``net_allow_hosts`` -> tuple of str or None
    * ``max_memory``/``max_disk`` -> int bytes or None; ``time_start`` -> float epoch seconds or None
    * ``cpu_cores`` -> sorted tuple of int or None; syscall lists -> tuple of str or None
    * ``env`` -> read-only mapping (``types.MappingProxyType``) of str to str
    * ``fs_isolation``/``on_exit``/``on_error`` -> enum members

    Policies compare by value (``env`` by content) but are not hashable, because ``env`` is a mapping.
    """

    # Filesystem (Landlock)
    fs_writable: tuple = ()
    fs_readable: tuple = ()
    fs_denied: tuple = ()
    # Syscall filtering (seccomp)
    deny_syscalls: Any = None
    allow_syscalls: Any = None
    # Network
    net_allow_hosts: Any = None
    net_bind: tuple = ()
    net_connect: tuple = ()
    no_raw_sockets: bool = True
    no_udp: bool = False
    # IPC and process scoping
    isolate_ipc: bool = False
    isolate_signals: bool = False
    isolate_pids: bool = False
    # Resources
    max_memory: Any = None
    max_processes: int = 64
    max_cpu: Any = None
    max_open_files: Any = None
    port_remap: bool = False
    # Deterministic execution
    time_start: Any = None
    time_freeze: bool = False
    random_seed: Any = None
    no_randomize_memory: bool = False
    no_huge_pages: bool = False
    no_coredump: bool = False
    deterministic_dirs: bool = False
    normalize_mtime: bool = False  # stat shows times stamped during the run on the sandbox clock
    hostname: Any = None
    num_cpus: Any = None
    cpu_cores: Any = None
    # Environment
    clean_env: bool = False
    env: Mapping = field(default_factory=dict)
    cwd: Any = None
    # Copy-on-write isolation
    workdir: Any = None
    fs_isolation: Any = FsIsolation.NONE
    fs_storage: Any = None
    max_disk: Any = None
    on_exit: Any = BranchAction.COMMIT
    on_error: Any = BranchAction.ABORT
    # Misc
    chroot: Any = None
    close_fds: bool = True
    privileged: bool = False
    best_effort: bool = False

    __hash__ = None  # env is a mapping: policies compare by value but are not hashable

    def __post_init__(self):
        s = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("fs_writable", "fs_readable", "fs_denied"):
            s(name, _paths(name, getattr(self, name)))
        for name in ("cwd", "workdir", "fs_storage", "chroot"):
            v = getattr(self, name)
            s(name, None if v is None else _path(name, v))
        s("deny_syscalls", _syscall_names("deny_syscalls", self.deny_syscalls))
        s("allow_syscalls", _syscall_names("allow_syscalls", self.allow_syscalls))
        if self.deny_syscalls is not None and self.allow_syscalls is not None:
            raise PolicyError("deny_syscalls and allow_syscalls are exclusive: an allowlist already denies "
                              "everything it does not list")
        s("net_allow_hosts", _hosts(self.net_allow_hosts))
        s("net_bind", parse_ports(self.net_bind, "net_bind"))
        s("net_connect", parse_ports(self.net_connect, "net_connect"))
        for name in ("no_raw_sockets", "no_udp", "isolate_ipc", "isolate_signals", "isolate_pids", "port_remap",
                     "time_freeze", "no_randomize_memory", "no_huge_pages", "no_coredump", "deterministic_dirs",
                     "normalize_mtime",
                     "clean_env", "close_fds", "privileged", "best_effort"):
            s(name, _bool(name, getattr(self, name)))
        s("max_memory", None if self.max_memory is None else parse_size(self.max_memory, "max_memory"))
        s("max_disk", None if self.max_disk is None else parse_size(self.max_disk, "max_disk"))
        s("max_processes", _int("max_processes", self.max_processes, 1, optional=False))
        s("max_cpu", _int("max_cpu", self.max_cpu, 1, 100))
        s("max_open_files", _int("max_open_files", self.max_open_files, 1, 1 << 30))
        s("num_cpus", _int("num_cpus", self.num_cpus, 1, 4096))
        s("cpu_cores", None if self.cpu_cores is None else parse_cpu_list(self.cpu_cores))
        s("time_start", None if self.time_start is None else parse_time(self.time_start))
        if self.normalize_mtime and self.time_start is None:
            raise PolicyError("normalize_mtime: True needs time_start (the sandbox clock it shows times on)")
        if self.time_freeze and self.time_start is None:
            raise PolicyError("time_freeze: True needs time_start (the instant the clock is frozen at)")
        s("random_seed", _int("random_seed", self.random_seed, 0, (1 << 64) - 1))
        if self.hostname is not None and (not isinstance(self.hostname, str)
                                          or not _HOSTNAME_RE.match(self.hostname)):
            raise _fail("hostname", self.hostname, "is not a valid host name (1-64 of A-Z a-z 0-9 . -)")
        s("env", _env(self.env))
        s("fs_isolation", _enum("fs_isolation", FsIsolation, self.fs_isolation))
        s("on_exit", _enum("on_exit", BranchAction, self.on_exit))
        s("on_error", _enum("on_error", BranchAction, self.on_error))

    def __eq__(self, other):
        if not isinstance(other, Policy):
            return NotImplemented
        return all(_plain(getattr(self, f.name)) == _plain(getattr(other, f.name)) for f in dataclasses.fields(self))

    # ---- construction helpers ----
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names, source: str | None = None) -> None:
        known = set(cls.field_names())
        for name in names:
            if not isinstance(name, str):
                prefix = f"{source}: " if source else ""
                raise PolicyError(f"{prefix}policy field names are strings, got {name!r}")
            if name not in known:
                import difflib
                near = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                prefix = f"{source}: " if source else ""
                raise PolicyError(f"{prefix}unknown policy field {name!r}{hint}")

    @classmethod
    def from_dict(cls, d: Mapping, source: str | None = None) -> "Policy":
        """A Policy from plain values (a profile, CLI flags); ``source`` prefixes every error message."""
        if not isinstance(d, Mapping):
            prefix = f"{source}: " if source else ""
            raise PolicyError(f"{prefix}a policy must be a mapping of field names to values, got {d!r}")
        cls.check_names(d, source)
        try:
            return cls(**d)
        except PolicyError as exc:
            if source:
                raise PolicyError(f"{source}: {exc}") from None
            raise

    def replace(self, **changes) -> "Policy":
        self.check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self, only_changed: bool = True) -> dict:
        """Plain TOML-friendly values (lists, strings, numbers, a table for env); None values are left out."""
        out = {}
        default = Policy() if only_changed else None
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if default is not None and _plain(v) == _plain(getattr(default, f.name)):
                continue
            out[f.name] = _plain(v)
        return out


def _plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Mapping):
        return dict(v)
    return v
