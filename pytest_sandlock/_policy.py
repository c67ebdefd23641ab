"""Which tests run confined, and under which policy.

Precedence, lowest to highest, field by field (a later layer replaces a field an earlier one set):

1. ``Policy()`` defaults;
2. the ini keys ``sandlock_readable``, ``sandlock_writable``, ``sandlock_denied``, ``sandlock_net_bind``,
   ``sandlock_net_connect`` and ``sandlock_policy`` (project-wide defaults);
3. the profile: ``profile=`` on the closest marker, else ``--sandlock-profile``, else ``$PYTEST_SANDLOCK_PROFILE``,
   else the ini key ``sandlock_profile``;
4. ``@pytest.mark.sandbox(**fields)`` markers, module ``pytestmark`` first, then class, then function (the
   closest marker wins for a field it names).

Then placeholders (``{tmp_path}``, ``{rootdir}``...) are expanded, and, if the policy restricts the filesystem
(some ``fs_readable``/``fs_writable`` entry) and ``sandlock_defaults`` is on, the built-in defaults are *added*
to the filesystem lists (see :func:`default_paths`).

Whether a test is confined: ``--sandlock-off`` wins over everything (nothing is confined); then the closest of
``@pytest.mark.sandbox(False)`` / ``@pytest.mark.no_sandbox`` (opt out) and ``@pytest.mark.sandbox(...)`` (opt in);
then the session: a profile (option, env or ini) or ``--sandlock`` / ini ``sandlock_all`` confines every test.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

CONFINED, OPTED_OUT, UNCONFINED = "confined", "opted-out", "unconfined"

PLACEHOLDER = re.compile(r"\{(tmp_path|rootdir|testdir|basetemp|cache_dir|worker_id|home|sys_prefix)\}")
FS_FIELDS = ("fs_readable", "fs_writable")


class MarkerError(Exception):
    """Bad marker or ini arguments: reported as the test's setup failure (never a crash)."""


@dataclass
class Session:
    """Session-wide settings, resolved once in pytest_configure."""

    off: bool = False
    confine_all: bool = False
    profile: str | None = None
    profile_source: str = ""
    ini_fields: dict = field(default_factory=dict)
    defaults: bool = True
    record_denials: bool = True
    strict: bool = False
    best_effort: bool = False
    timeout: float | None = None
    seed: int = 0
    seed_source: str = "random"
    max_shown: int = 20

    @property
    def active(self) -> bool:
        """Every test is confined unless it opts out."""
        return not self.off and (self.confine_all or self.profile is not None)


def test_seed(session_seed: int, nodeid: str) -> int:
    """A stable per-test seed: the same session seed gives every test the same seed again (replay)."""
    h = hashlib.sha256(f"{session_seed}:{nodeid}".encode()).digest()
    return int.from_bytes(h[:4], "big")


def item_mode(item, session: Session) -> str:
    """CONFINED, OPTED_OUT or UNCONFINED for one test (the closest deciding marker wins)."""
    if session.off:
        return UNCONFINED
    for mark in item.iter_markers():
        if mark.name == "no_sandbox":
            return OPTED_OUT
        if mark.name == "sandbox":
            if mark.args and mark.args[0] is False:
                return OPTED_OUT
            return CONFINED
    return CONFINED if session.active else UNCONFINED


def marker_fields(item) -> tuple[dict, str | None, list[str]]:
    """(fields, profile, sources) from every ``sandbox`` marker, the closest winning per field."""
    fields: dict = {}
    profile = None
    sources: list[str] = []
    for mark in item.iter_markers("sandbox"):  # closest first
        args = mark.args
        if args:
            if len(args) > 1 or not isinstance(args[0], (bool, str)):
                raise MarkerError(f"@pytest.mark.sandbox takes at most one positional argument (True, False or a "
                                  f"profile name), got {args!r}")
            if isinstance(args[0], str) and profile is None:
                profile = args[0]
        for k, v in mark.kwargs.items():
            if k == "profile":
                if profile is None:
                    profile = v
                continue
            fields.setdefault(k, v)
        sources.append(repr(mark))
    return fields, profile, sources


def check_field_names(fields: dict, where: str) -> None:
    from sandlock_core.errors import PolicyError
    from sandlock_core.policy import Policy
    try:
        Policy.check_names(fields, where)
    except PolicyError as exc:
        raise MarkerError(str(exc)) from None


def profile_fields(name: str) -> dict:
    """A saved profile (name) or a TOML file (path) as a dict of Policy fields (read once per session)."""
    return dict(_profile_fields(name))


@functools.lru_cache(maxsize=32)
def _profile_fields(name: str) -> dict:
    from sandlock_core.profile import profile_dict
    if name.endswith(".toml") or os.sep in name:
        name = os.path.abspath(os.path.expanduser(name))
    return dict(profile_dict(name))


def parse_policy_lines(lines: list[str]) -> dict:
    """ini ``sandlock_policy``: one ``field = value`` per line, the value in TOML syntax."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    out: dict = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.update(tomllib.loads(line))
        except Exception:
            # a bare word value (e.g. ``fs_isolation = overlayfs``): take it as a string
            if "=" not in line:
                raise MarkerError(f"ini sandlock_policy: {line!r} is not 'field = value'")
            k, v = (s.strip() for s in line.split("=", 1))
            out[k] = v
    return out


def expand(value: Any, mapping: dict[str, str], where: str) -> Any:
    """Expand placeholders in strings, recursively through lists, tuples and dicts."""
    if isinstance(value, str):
        def sub(m):
            key = m.group(1)
            if key not in mapping or mapping[key] is None:
                raise MarkerError(f"{where}: placeholder {{{key}}} is not available for this test")
            return str(mapping[key])
        return PLACEHOLDER.sub(sub, value)
    if isinstance(value, os.PathLike):
        return expand(os.fspath(value), mapping, where)
    if isinstance(value, (list, tuple)):
        return type(value)(expand(v, mapping, where) for v in value)
    if isinstance(value, dict):
        return {k: expand(v, mapping, where) for k, v in value.items()}
    return value


def needs_placeholder(value: Any, name: str) -> bool:
    if isinstance(value, str):
        return "{" + name + "}" in value
    if isinstance(value, (list, tuple)):
        return any(needs_placeholder(v, name) for v in value)
    if isinstance(value, dict):
        return any(needs_placeholder(v, name) for v in value.values())
    return False


# ---- built-in defaults ----------------------------------------------------------------------------------

_DEFAULTS_CACHE: dict = {}

DEFAULT_FILES_READABLE = ("/etc/ld.so.cache", "/etc/localtime", "/etc/locale.alias", "/dev/urandom", "/dev/random",
                          "/dev/zero")
DEFAULT_FILES_WRITABLE = ("/dev/null",)


def _minimize(paths) -> list[str]:
    """Existing real paths, without "/" and without entries beneath another entry."""
    real = set()
    for p in paths:
        if not p:
            continue
        try:
            r = os.path.realpath(p)
        except (OSError, ValueError):
            continue
        if r != "/" and os.path.exists(r):
            real.add(r)
    out: list[str] = []
    for p in sorted(real):
        if out and (p == out[-1] or p.startswith(out[-1].rstrip("/") + "/")):
            continue
        out.append(p)
    return out


def _mapped_dirs() -> set[str]:
    """Directories of every file mapped into this process (the interpreter's shared libraries)."""
    dirs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    path = parts[5].strip()
                    if path.endswith(" (deleted)") or path.startswith(("/dev/", "/memfd:", "/proc/")):
                        continue
                    dirs.add(os.path.dirname(path))
    except OSError:
        pass
    return dirs


def default_paths(rootdir: str | None, cache_dir: str | None, coverage_dir: str | None) -> tuple[list, list]:
    """(readable, writable) added to a filesystem-restricting policy unless ``sandlock_defaults = false``.

    readable: the interpreter's prefixes (``sys.prefix``, ``sys.base_prefix``, exec prefixes, the directory of
    ``sys.executable``), every existing ``sys.path`` entry (site-packages, editable installs, the project),
    the directories of the shared libraries mapped into pytest, the rootdir, and a few files every process
    touches (``/etc/ld.so.cache``, ``/etc/localtime``, ``/etc/locale.alias``, ``/dev/urandom``,
    ``/dev/random``, ``/dev/zero``).
    writable: ``/dev/null``, pytest's cache directory, and the coverage data directory when coverage is
    measuring. Per test, the plugin adds ``tmp_path`` (writable) and the test file's directory (readable).
    pytest's capture files need nothing: they are open before the test is confined, and Landlock checks at
    open time only.
    """
    key = (rootdir, cache_dir, coverage_dir, tuple(sys.path))
    hit = _DEFAULTS_CACHE.get(key)
    if hit is not None:
        return hit
    readable = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable)]
    readable += [p for p in sys.path if p]
    readable += sorted(_mapped_dirs())
    if rootdir:
        readable.append(rootdir)
    readable += DEFAULT_FILES_READABLE
    writable = list(DEFAULT_FILES_WRITABLE)
    if cache_dir:
        writable.append(cache_dir)
    if coverage_dir:
        writable.append(coverage_dir)
    writable = _minimize(writable)
    readable = [p for p in _minimize(readable)
                if not any(p == w or p.startswith(w + "/") for w in writable)]
    _DEFAULTS_CACHE[key] = (readable, writable)
    return readable, writable


def merge_paths(first, extra) -> list:
    """``first`` followed by the ``extra`` entries it does not already hold (order kept, no duplicates)."""
    out = list(first or ())
    seen = {os.fspath(p) for p in out}
    for p in extra:
        if p not in seen:
            out.append(p)
            seen.add(p)
    return out
