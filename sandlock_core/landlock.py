"""Landlock: ABI probe, access rights per ABI, and the ruleset a policy compiles to.

The ruleset is built in the parent (``build_ruleset``) and applied by whoever is confined: the C child sequence
(``sl_spawn``/``sl_confine``) or, for a Python caller, :func:`confine_self`. Landlock only ever *adds* what is
allowed: a handled right is denied everywhere except beneath the paths (or on the ports) that have a rule for it.

Choices made here (they are the semantics users see):

* **Filesystem.** When ``readable`` or ``writable`` is given, every filesystem right the ABI knows is handled
  (``handled_fs(abi)``). Readable paths get ``READ_RIGHTS`` (EXECUTE|READ_FILE|READ_DIR); writable paths get every
  handled right (``write_rights(abi)``). A path in both lists gets the writable rights. Rights that only make sense
  on a directory are dropped for a non-directory (``rights_for``), otherwise the kernel answers EINVAL. Paths are
  opened with ``O_PATH|O_CLOEXEC``: no read permission is needed and a FIFO does not block.
  With neither list given, the filesystem is not handled at all (left unrestricted).
* **TCP** (ABI 4). Only the right whose list is non-empty is handled: with only ``bind_ports``, connect stays
  unrestricted, and the reverse. Port 0 in ``bind_ports`` is a rule like any other (it allows binding to an
  ephemeral port). UDP and other protocols are never covered by Landlock.
* **Scopes** (ABI 6), only when asked: ``isolate_ipc`` (abstract unix sockets created outside the domain) and
  ``isolate_signals`` (signals to processes outside the domain).
* **ABI gating.** What the kernel cannot enforce raises :class:`LandlockUnavailableError` naming the protection
  and the ABI it needs, unless ``best_effort``: then it is skipped and described in ``RulesetInfo.missing``.
  Rights a lower ABI lacks (REFER, TRUNCATE, IOCTL_DEV) are simply not handled; they are not errors
  (``describe_features`` tells the user what the kernel cannot control).
"""
from __future__ import annotations

import os
import stat
from _collections_abc import Iterable  # = collections.abc.Iterable, without importing collections (CLI start-up)

from . import _sys
from ._cache import memoize
from .errors import ConfinementError, LandlockUnavailableError, PolicyError

# ---- filesystem access rights (include/uapi/linux/landlock.h) ----
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13       # ABI 2
TRUNCATE = 1 << 14    # ABI 3
IOCTL_DEV = 1 << 15   # ABI 5

# ---- network access rights (ABI 4) ----
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1

# ---- scopes (ABI 6) ----
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

# ---- landlock_restrict_self() flags (ABI 7): audit logging of denials ----
RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1 << 0
RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1
RESTRICT_SELF_LOG_SUBDOMAINS_OFF = 1 << 2

# landlock_create_ruleset() flags
CREATE_RULESET_VERSION = 1 << 0

_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM

#: What a readable path gets.
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR

#: The rights that make sense on a non-directory; the rest are only valid on directories.
FILE_RIGHTS = (EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
               | IOCTL_DEV)

#: Newest ABI this module knows about.
MAX_KNOWN_ABI = 7

# (ABI, Linux version) of each feature, for messages.
_KERNEL_OF_ABI = {1: "5.13", 2: "5.19", 3: "6.2", 4: "6.7", 5: "6.10", 6: "6.12", 7: "6.15"}


@memoize
def abi_version() -> int:
    """The running kernel's Landlock ABI version (cached); 0 when Landlock is missing or disabled."""
    return _sys.landlock_abi_version()


def handled_fs(abi: int) -> int:
    """Every filesystem right ABI ``abi`` knows (0 for ABI 0)."""
    if abi < 1:
        return 0
    rights = _FS_ABI1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def handled_net(abi: int) -> int:
    """Every network right ABI ``abi`` knows."""
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def handled_scopes(abi: int) -> int:
    """Every scope ABI ``abi`` knows."""
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def restrict_flags(abi: int) -> int:
    """Every ``landlock_restrict_self`` flag ABI ``abi`` accepts."""
    if abi >= 7:
        return RESTRICT_SELF_LOG_SAME_EXEC_OFF | RESTRICT_SELF_LOG_NEW_EXEC_ON | RESTRICT_SELF_LOG_SUBDOMAINS_OFF
    return 0


def write_rights(abi: int) -> int:
    """What a writable path gets: everything handled (read, write, remove, make, refer, truncate, ioctl)."""
    return handled_fs(abi)


def rights_for(rights: int, is_dir: bool) -> int:
    """``rights`` as a rule on a directory (unchanged) or on any other file (directory-only rights dropped)."""
    return rights if is_dir else rights & FILE_RIGHTS


# ---- gating ----
_NEEDS = {
    # protection: (ABI, what it is)
    "fs_readable": (1, "filesystem rules"),
    "fs_writable": (1, "filesystem rules"),
    "net_bind": (4, "TCP port rules"),
    "net_connect": (4, "TCP port rules"),
    "isolate_ipc": (6, "abstract unix socket scoping"),
    "isolate_signals": (6, "signal scoping"),
}


def _need(name: str) -> str:
    abi, what = _NEEDS[name]
    return f"{name} needs Landlock ABI {abi} ({what}, Linux {_KERNEL_OF_ABI[abi]})"


def _kernel_has(abi: int) -> str:
    return f"this kernel has ABI {abi}" if abi > 0 else "this kernel has no Landlock (missing or disabled)"


class RulesetInfo:
    """A built ruleset. ``fd`` is the ruleset fd (O_CLOEXEC; -1 when nothing is left to enforce: nothing asked,
    or everything skipped under best_effort). The owner passes ``fd`` to the child and calls :meth:`close`."""

    def __init__(self, fd: int, abi: int, missing: list[str], handled_fs: int = 0, handled_net: int = 0,
                 scoped: int = 0):
        self.fd = fd
        self.abi = abi
        self.missing = missing
        self.handled_fs = handled_fs
        self.handled_net = handled_net
        self.scoped = scoped

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> RulesetInfo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a leaked ruleset fd is harmless but untidy
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"RulesetInfo(fd={self.fd}, abi={self.abi}, handled_fs={self.handled_fs:#x}, "
                f"handled_net={self.handled_net:#x}, scoped={self.scoped:#x}, missing={self.missing!r})")


class Ruleset:
    """Low-level builder: ``Ruleset(handled_fs, handled_net, scoped)``, then ``add_path``/``add_port``, then
    :meth:`finish` (or :meth:`close` on error). Raises ``ConfinementError`` when the kernel refuses."""

    def __init__(self, handled_fs: int = 0, handled_net: int = 0, scoped: int = 0, *, abi: int | None = None):
        self.abi = abi_version() if abi is None else abi
        self.handled_fs = handled_fs
        self.handled_net = handled_net
        self.scoped = scoped
        try:
            self.fd = _sys.landlock_create_ruleset(handled_fs, handled_net, scoped)
        except OSError as exc:
            raise ConfinementError(
                f"landlock_create_ruleset(fs={handled_fs:#x}, net={handled_net:#x}, scoped={scoped:#x}) "
                f"failed: {exc.strerror}") from None

    def add_path(self, path: str, rights: int, *, field: str = "path") -> None:
        """Allow ``rights`` (masked to what is handled and to the file type) beneath ``path``."""
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PolicyError(f"{field}: {path!r} does not exist") from None
        except OSError as exc:
            raise PolicyError(f"{field}: {path!r} cannot be opened: {exc.strerror}") from None
        allowed = rights & self.handled_fs
        try:
            allowed = rights_for(allowed, stat.S_ISDIR(os.fstat(pfd).st_mode))
            if allowed:
                _sys.landlock_add_path_rule(self.fd, allowed, pfd)
        except OSError as exc:
            raise ConfinementError(f"{field}: landlock_add_rule({path!r}, {allowed:#x}) failed: "
                                   f"{exc.strerror}") from None
        finally:
            os.close(pfd)

    def add_port(self, port: int, rights: int, *, field: str = "port") -> None:
        """Allow ``rights`` (masked to what is handled) on TCP ``port``."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise PolicyError(f"{field}: {port!r} is not a port (0-65535)")
        allowed = rights & self.handled_net
        if not allowed:
            return
        try:
            _sys.landlock_add_net_rule(self.fd, allowed, port)
        except OSError as exc:
            raise ConfinementError(f"{field}: landlock_add_rule(port {port}, {allowed:#x}) failed: "
                                   f"{exc.strerror}") from None

    def finish(self, missing: list[str] | None = None) -> RulesetInfo:
        fd, self.fd = self.fd, -1
        return RulesetInfo(fd, self.abi, list(missing or []), self.handled_fs, self.handled_net, self.scoped)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _as_paths(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    return [os.fsdecode(os.fspath(v)) for v in value]


def build_ruleset(*, readable: Iterable = (), writable: Iterable = (), bind_ports: Iterable[int] = (),
                  connect_ports: Iterable[int] = (), isolate_ipc: bool = False, isolate_signals: bool = False,
                  best_effort: bool = False, abi: int | None = None, carve: Iterable = ()) -> RulesetInfo:
    """Build the Landlock ruleset for these protections (see the module docstring for the semantics).

    ``abi`` overrides the probed ABI (to simulate an older kernel; the running kernel accepts the smaller
    rulesets). Raises ``PolicyError`` for a path that does not exist or a bad port, and
    ``LandlockUnavailableError`` when the ABI lacks an asked protection and ``best_effort`` is false.
    """
    kabi = abi_version()
    abi = kabi if abi is None else min(int(abi), kabi)  # a newer ABI than the kernel's cannot be simulated
    readable = _as_paths(readable)
    writable = _as_paths(writable)
    bind_ports = list(bind_ports or ())
    connect_ports = list(connect_ports or ())

    asked = [name for name, on in (("fs_readable", readable), ("fs_writable", writable),
                                   ("net_bind", bind_ports), ("net_connect", connect_ports),
                                   ("isolate_ipc", isolate_ipc), ("isolate_signals", isolate_signals)) if on]
    unavailable = [name for name in asked if abi < _NEEDS[name][0]]
    missing: list[str] = []
    if unavailable:
        if not best_effort:
            raise LandlockUnavailableError(", ".join(_need(n) for n in unavailable) + "; " + _kernel_has(abi))
        missing = [f"{_need(n)}; {_kernel_has(abi)}: not enforced" for n in unavailable]
    skip = set(unavailable)

    # Validate paths even when they will not be enforced: a wrong path is a policy error on every kernel.
    rules: dict[str, tuple[int, str]] = {}
    for field, paths, rights in (("fs_readable", readable, READ_RIGHTS), ("fs_writable", writable, -1)):
        for p in paths:
            try:
                os.close(os.open(p, os.O_PATH | os.O_CLOEXEC))
            except FileNotFoundError:
                raise PolicyError(f"{field}: {p!r} does not exist") from None
            except OSError as exc:
                raise PolicyError(f"{field}: {p!r} cannot be opened: {exc.strerror}") from None
            if field in skip:
                continue
            old = rules.get(p, (0, field))
            rules[p] = (old[0] | rights, field if rights == -1 else old[1])

    if carve and rules:
        rules = _carve_rules(rules, [os.path.realpath(d) for d in _as_paths(carve)])
    fs = handled_fs(abi) if rules else 0
    net = 0
    if "net_bind" not in skip and bind_ports:
        net |= NET_BIND_TCP
    if "net_connect" not in skip and connect_ports:
        net |= NET_CONNECT_TCP
    scoped = 0
    if "isolate_ipc" not in skip and isolate_ipc:
        scoped |= SCOPE_ABSTRACT_UNIX_SOCKET
    if "isolate_signals" not in skip and isolate_signals:
        scoped |= SCOPE_SIGNAL
    # Ports are validated even when TCP is not enforced.
    for field, ports in (("net_bind", bind_ports), ("net_connect", connect_ports)):
        for port in ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise PolicyError(f"{field}: {port!r} is not a port (0-65535)")

    if not (fs or net or scoped):
        return RulesetInfo(-1, abi, missing)

    rs = Ruleset(fs, net, scoped, abi=abi)
    try:
        for p, (rights, field) in rules.items():
            rs.add_path(p, rights & fs, field=field)
        for port in dict.fromkeys(bind_ports):
            rs.add_port(port, NET_BIND_TCP, field="net_bind")
        for port in dict.fromkeys(connect_ports):
            rs.add_port(port, NET_CONNECT_TCP, field="net_connect")
    except BaseException:
        rs.close()
        raise
    return rs.finish(missing)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _carve_rules(rules: dict, denied: list[str]) -> dict:
    """Cut ``fs_denied`` holes out of read-only rules, so the kernel itself refuses them (read and exec,
    no check-then-use window). Landlock rights only add up, so a read-only tree that contains a denied
    path is granted entry by entry around it: every sibling along the way gets the rule, the directories
    on the way get READ_DIR only (listing stays possible; opening a denied directory is refused by the
    supervisor). Symlinked entries that lead into a denied path are left out. Writable trees are not
    carved (a carved directory could not get new entries): the supervisor alone guards holes in those."""
    out: dict = {}
    inodes = set()
    for d in denied:  # Landlock rules attach to inodes: a hard link of a hole must not get a rule either
        try:
            st = os.stat(d)
            inodes.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for path, (rights, field) in rules.items():
        real = os.path.realpath(path)
        if any(_under(real, d) for d in denied):
            continue  # the whole rule is inside a hole: denial wins
        inside = [d for d in denied if d != real and _under(d, real)]
        if not inside or rights != READ_RIGHTS:
            out[path] = (rights, field)
            continue
        _carve_into(real, rights, field, inside, inodes, out)
    return out


def _carve_into(root: str, rights: int, field: str, inside: list[str], inodes: set, out: dict) -> None:
    out[root] = (READ_DIR, field)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        full = e.path
        if any(_under(full, d) for d in inside):
            continue
        target = os.path.realpath(full)
        if any(_under(target, d) or _under(d, target) for d in inside):
            if e.is_dir(follow_symlinks=False):
                _carve_into(full, rights, field, [d for d in inside if _under(d, full)], inodes, out)
            continue  # a symlink leading into (or above) a hole: left out
        try:
            st = os.stat(full)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            continue  # another name of a denied file
        out[full] = (rights, field)


def confine_self(info: RulesetInfo, flags: int = 0) -> None:
    """Apply ``info`` to the **calling thread**: ``prctl(PR_SET_NO_NEW_PRIVS, 1)`` then
    ``landlock_restrict_self(info.fd, flags)``. Irreversible.

    Landlock confines only the calling thread (and the threads and processes it creates afterwards); other
    threads of the process that already exist stay unconfined, so call this before starting threads, or in
    a freshly forked child. NO_NEW_PRIVS is likewise per thread (and inherited). ``flags`` are ``RESTRICT_SELF_LOG_*`` (ABI 7). A ruleset with ``fd == -1`` (nothing to enforce) only sets
    NO_NEW_PRIVS.
    """
    if flags & ~restrict_flags(info.abi):
        raise LandlockUnavailableError(
            f"landlock_restrict_self flags {flags:#x} need Landlock ABI 7 (audit log flags, Linux 6.15); "
            f"{_kernel_has(info.abi)}")
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    if info.fd >= 0:
        try:
            _sys.landlock_restrict_self(info.fd, flags)
        except OSError as exc:
            raise ConfinementError(f"landlock_restrict_self failed: {exc.strerror}") from None


def describe_features(abi: int) -> list[tuple[str, bool, str]]:
    """Rows for ``sandlock check``: (feature, available, note)."""
    def row(name: str, need: int, note: str) -> tuple[str, bool, str]:
        return (name, abi >= need, f"{note} (Landlock ABI {need}, Linux {_KERNEL_OF_ABI[need]})")

    return [
        row("Landlock filesystem rules", 1, "fs_readable / fs_writable"),
        row("Landlock REFER", 2, "rename/link across directories; without it such moves always fail (EXDEV)"),
        row("Landlock TRUNCATE", 3, "truncate on read-only paths is denied; without it truncate is not controlled"),
        row("Landlock TCP ports", 4, "net_bind / net_connect"),
        row("Landlock IOCTL_DEV", 5, "ioctl on device files; without it device ioctls are not controlled"),
        row("Landlock scopes", 6, "isolate_ipc (abstract unix sockets) / isolate_signals"),
        row("Landlock audit-log flags", 7, "landlock_restrict_self LOG_* flags"),
    ]
