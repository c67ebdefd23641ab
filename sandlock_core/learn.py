"""Learn mode: watch a permissive run, then write the least-privilege profile that lets the same run pass.

Recording is a set of supervisor handlers (passed to ``Sandbox(..., handlers=...)``) that only look and
return ``None``: the learning run has no filesystem or TCP restriction, so letting every syscall CONTINUE is
exactly what the policy asks for. They see, resolved the way the kernel would (dirfd or cwd, ``/proc/self``,
symlinks followed unless ``O_NOFOLLOW``):

* ``open``/``openat``/``openat2``/``creat``: a file read, written or created, a directory listed (any open
  of a directory for reading: that is where Landlock checks ``READ_DIR``);
* ``execve``/``execveat``: the program, its ``#!`` interpreter and its ELF interpreter (the kernel opens
  those itself; Landlock checks them, no syscall names them);
* ``mkdir``/``mknod``/``symlink``/``link``/``unlink``/``rmdir``/``rename`` families, ``truncate``: a name
  created or removed (a right on the parent directory), a file written;
* ``connect``/``bind``: host, port and protocol.

Peaks (memory, processes, threads, the highest file descriptor) come from sampling ``/proc`` for every
descendant of the sandbox's reaper every :data:`SAMPLE_INTERVAL` seconds (every 5 ms for the first 0.2 s).
Memory is measured as ``resources.py`` limits it: ``/proc/PID/statm`` field 6 (private writable data + stack)
summed over the processes. A process that lives and dies between two samples is missed, so the limits get
generous headroom (:func:`_headroom`).

:func:`build_profile` turns the observations into Policy fields (see its docstring for the collapsing
rules), :func:`render` into a commented TOML profile (``profile.dumps_toml`` for the values).
"""
from __future__ import annotations

import os
import re
import stat as _stat
import struct

SAMPLE_INTERVAL = 0.05
LEARN_MAX_PROCESSES = 4096  # the learning run is not the place to hit a limit: it measures them
DEFAULT_COLLAPSE = 3

#: Read-only system trees granted whole: a program reading one file there will read others next time.
SYSTEM_TREES = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")

#: Shared temporary directories: granted writable when the run creates names directly in them.
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

#: Names that look like credentials: never granted, called out in a comment instead.
SECRET_DIRS = (".ssh", ".aws", ".gnupg", ".kube", ".docker", ".azure", ".password-store")
SECRET_FILES = (".netrc", ".pgpass", ".git-credentials", ".pypirc", ".npmrc", ".env")
SECRET_PATH_PARTS = ("/.config/gcloud", "/.config/gh/")
_SECRET_RE = re.compile(r"^(\.env\..+|id_(rsa|dsa|ecdsa|ed25519)(_sk)?)$")
# Directories not worth scanning for secrets (big, generated): collapsing over them stays cheap.
_SCAN_SKIP = frozenset({".git", "node_modules", "__pycache__", "site-packages", "dist-packages", ".tox", ".nox",
                        ".mypy_cache", ".pytest_cache", ".hg"})
_SCAN_LIMIT = 5000

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_REMOVEDIR = 0x200
O_PATH = getattr(os, "O_PATH", 0o10000000)
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def secret_reason(path: str) -> str | None:
    """Why ``path`` looks like a credential (None: it does not)."""
    parts = path.split("/")
    for part in parts[:-1]:
        if part in SECRET_DIRS:
            return f"inside {part}"
    base = parts[-1]
    if base in SECRET_DIRS:
        return f"{base} directory"
    if base in SECRET_FILES or _SECRET_RE.match(base):
        return f"{base} file"
    for part in SECRET_PATH_PARTS:
        if part in path + "/":
            return f"under {part.strip('/')}"
    return None


# ---- observations -------------------------------------------------------------------------------------

class Observations:
    """What one run (or one test) did. Paths are absolute and resolved. (Plain class, not a dataclass:
    cli.py imports this module to build its parser, and dataclasses costs milliseconds of start-up.)"""

    def __init__(self):
        self.reads: set = set()       # files read (or executed)
        self.lists: set = set()       # directories opened for reading
        self.writes: set = set()      # existing files written in place
        self.names: set = set()       # names created or removed (a right on the parent)
        self.created: set = set()     # paths that did not exist before the run made them
        self.execs: set = set()
        self.connects: set = set()    # (host, port, proto)
        self.binds: set = set()       # (host, port, proto)
        self.peak_memory = self.peak_processes = self.peak_threads = 0
        self.peak_fd = 0              # highest fd number + 1 (what RLIMIT_NOFILE limits)
        self.errors = 0

    def update(self, other: "Observations") -> None:
        for name in ("reads", "lists", "writes", "names", "created", "execs", "connects", "binds"):
            getattr(self, name).update(getattr(other, name))
        for name in ("peak_memory", "peak_processes", "peak_threads", "peak_fd"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))
        self.errors += other.errors


def _child_path(sup, n, dirfd: int, index: int, *, empty_ok: bool = False) -> str | None:
    from .denials import _child_path as cp
    return cp(sup, n, dirfd, index, empty_ok=empty_ok)


def _resolve(path: str | None, follow: bool = True) -> str | None:
    if path is None:
        return None
    from .denials import _resolve as rs
    return rs(path, follow)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def interpreters(path: str, depth: int = 0) -> list[str]:
    """The programs the kernel opens itself to run ``path``: its ``#!`` interpreter (recursively) and the
    ELF interpreter (``PT_INTERP``, the dynamic loader)."""
    out: list[str] = []
    try:
        if not _stat.S_ISREG(os.stat(path).st_mode):
            return out
        with open(path, "rb") as f:
            head = f.read(256)
            if head.startswith(b"#!"):
                words = head[2:].split(b"\n", 1)[0].split()
                if words:
                    interp = os.fsdecode(words[0])
                    out.append(interp)
                    if depth < 4:
                        out += interpreters(interp, depth + 1)
            elif head[:4] == b"\x7fELF" and len(head) >= 64 and head[4] == 2 and head[5] == 1:
                phoff = struct.unpack_from("<Q", head, 0x20)[0]
                phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
                f.seek(phoff)
                table = f.read(phentsize * min(phnum, 64))
                for i in range(len(table) // phentsize if phentsize else 0):
                    p_type = struct.unpack_from("<I", table, i * phentsize)[0]
                    if p_type == 3:  # PT_INTERP
                        off, _va, _pa, size = struct.unpack_from("<QQQQ", table, i * phentsize + 8)
                        f.seek(off)
                        out.append(os.fsdecode(f.read(min(size, 4096)).rstrip(b"\0")))
                        break
    except (OSError, struct.error, ValueError):
        pass
    return out


class Recorder:
    """Supervisor handlers that record into ``self.current`` (an :class:`Observations`; swap it to attribute
    accesses to one test). They never decide: every handler returns None."""

    def __init__(self):
        import threading
        self.current = Observations()
        self.lock = threading.Lock()

    # -- what the handlers note --
    def _read(self, path: str | None) -> None:
        if path is None or not os.path.exists(path):
            return  # ENOENT: no access happened
        (self.current.lists if os.path.isdir(path) else self.current.reads).add(path)

    def _write(self, path: str | None) -> None:
        if path is not None and os.path.exists(path):
            self.current.writes.add(path)

    def _name(self, path: str | None, create: bool) -> None:
        if path is None or not os.path.isdir(os.path.dirname(path) or "/"):
            return
        exists = os.path.lexists(path)
        if create and exists:
            return  # EEXIST
        if not create and not exists:
            return  # ENOENT
        self.current.names.add(path)
        if create:
            self.current.created.add(path)

    def _exec(self, path: str | None) -> None:
        if path is None or not os.path.exists(path):
            return
        obs = self.current
        obs.execs.add(path)
        obs.reads.add(path)
        for interp in interpreters(path):
            r = _resolve(interp)
            if r and os.path.exists(r):
                obs.execs.add(r)
                obs.reads.add(r)

    def _open(self, sup, n, syscall: str, dirfd: int, index: int, flags: int) -> None:
        if flags & O_PATH:
            return  # Landlock checks no access right on O_PATH
        path = _child_path(sup, n, dirfd, index)
        if path is None:
            return
        if (flags & O_TMPFILE) == O_TMPFILE:
            self._write(_resolve(path))  # an unnamed file in that directory: write access to it
            return
        target = _resolve(path, follow=not (flags & os.O_NOFOLLOW))
        if target is None:
            return
        acc = flags & 3
        if flags & os.O_CREAT and not os.path.lexists(target):
            self._name(target, True)
            return
        if acc in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
            self._write(target)
        if acc != os.O_WRONLY:
            self._read(target)

    def _sock(self, sup, n, table: set) -> None:
        import socket
        args = n.data.args
        size = min(int(args[2]), 128)
        if not args[1] or size < 4:
            return
        data = sup.read_mem(n, args[1], size)
        family = struct.unpack_from("=H", data)[0]
        if family == socket.AF_INET and len(data) >= 8:
            host = socket.inet_ntop(socket.AF_INET, data[4:8])
        elif family == socket.AF_INET6 and len(data) >= 24:
            host = socket.inet_ntop(socket.AF_INET6, data[8:24])
        else:
            return  # UNIX sockets: Landlock has no right for them (isolate_ipc covers abstract ones)
        port = struct.unpack_from("!H", data, 2)[0]
        dup = sup.dup_child_fd(n, _s32(args[0]))
        s = socket.socket(fileno=dup)
        try:
            proto = "tcp" if s.type == socket.SOCK_STREAM else "udp" if s.type == socket.SOCK_DGRAM else "other"
        finally:
            s.close()
        table.add((host, port, proto))

    # -- the handler table --
    def handlers(self, arch: str | None = None) -> dict:
        from . import syscalls
        arch = arch or syscalls.native_arch()
        a = lambda n, i: n.data.args[i]  # noqa: E731
        rec = self

        def h_open(sup, n):
            rec._open(sup, n, "open", AT_FDCWD, 0, a(n, 1))

        def h_creat(sup, n):
            rec._open(sup, n, "creat", AT_FDCWD, 0, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)

        def h_openat(sup, n):
            rec._open(sup, n, "openat", _s32(a(n, 0)), 1, a(n, 2))

        def h_openat2(sup, n):
            how = sup.read_mem(n, a(n, 2), 8)
            rec._open(sup, n, "openat2", _s32(a(n, 0)), 1, struct.unpack("=Q", how)[0])

        def h_execve(sup, n):
            rec._exec(_resolve(_child_path(sup, n, AT_FDCWD, 0)))

        def h_execveat(sup, n):
            empty = bool(a(n, 4) & AT_EMPTY_PATH)
            rec._exec(_resolve(_child_path(sup, n, _s32(a(n, 0)), 1, empty_ok=empty)))

        def name(dirfd_arg, path_arg, create, flags_arg=None):
            def h(sup, n):
                dirfd = AT_FDCWD if dirfd_arg is None else _s32(a(n, dirfd_arg))
                path = _child_path(sup, n, dirfd, path_arg)
                rec._name(_resolve(path, follow=False), create)
            return h

        def move(od_arg, op_arg, nd_arg, np_arg, remove_old):
            def h(sup, n):
                od = AT_FDCWD if od_arg is None else _s32(a(n, od_arg))
                nd = AT_FDCWD if nd_arg is None else _s32(a(n, nd_arg))
                src = _resolve(_child_path(sup, n, od, op_arg), follow=not remove_old)
                dst = _resolve(_child_path(sup, n, nd, np_arg), follow=False)
                if remove_old:
                    rec._name(src, False)
                else:
                    rec._read(src)
                if dst is not None:
                    if os.path.lexists(dst):
                        rec._name(dst, False)  # replaced: removed from its directory
                    else:
                        rec._name(dst, True)
            return h

        def h_unlinkat(sup, n):
            path = _child_path(sup, n, _s32(a(n, 0)), 1)
            rec._name(_resolve(path, follow=False), False)

        def h_truncate(sup, n):
            rec._write(_resolve(_child_path(sup, n, AT_FDCWD, 0)))

        def h_connect(sup, n):
            rec._sock(sup, n, rec.current.connects)

        def h_bind(sup, n):
            rec._sock(sup, n, rec.current.binds)

        table = {
            "open": h_open, "creat": h_creat, "openat": h_openat, "openat2": h_openat2,
            "execve": h_execve, "execveat": h_execveat,
            "mkdir": name(None, 0, True), "mkdirat": name(0, 1, True),
            "mknod": name(None, 0, True), "mknodat": name(0, 1, True),
            "symlink": name(None, 1, True), "symlinkat": name(1, 2, True),
            "unlink": name(None, 0, False), "unlinkat": h_unlinkat, "rmdir": name(None, 0, False),
            "rename": move(None, 0, None, 1, True), "renameat": move(0, 1, 2, 3, True),
            "renameat2": move(0, 1, 2, 3, True),
            "link": move(None, 0, None, 1, False), "linkat": move(0, 1, 2, 3, False),
            "truncate": h_truncate, "connect": h_connect, "bind": h_bind,
        }
        out = {}
        for nm, fn in table.items():
            if syscalls.number(nm, arch) is not None:
                out[nm] = self._safe(fn)
        return out

    def _safe(self, fn):
        rec = self

        def handler(sup, n):
            try:
                with rec.lock:
                    fn(sup, n)
            except Exception:  # recording must never decide anything
                rec.current.errors += 1
            return None
        return handler


# ---- peaks --------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, threads)} for every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        try:
            out[int(name)] = (int(rest[1]), int(rest[17]))
        except (IndexError, ValueError):
            continue
    return out


class Sampler:
    """Samples the peaks of every process below the reapers that ``roots()`` returns."""

    def __init__(self, roots, recorder: Recorder, interval: float = SAMPLE_INTERVAL):
        import threading
        self.roots, self.recorder, self.interval = roots, recorder, interval
        self._stop = threading.Event()
        self._thread = None
        self._threading = threading

    def start(self) -> "Sampler":
        self._thread = self._threading.Thread(target=self._loop, name="sandlock-learn-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _loop(self) -> None:
        import time
        start = time.monotonic()
        # Fast at first (short commands end within tens of milliseconds), then every ``interval``.
        while not self._stop.wait(0.005 if time.monotonic() - start < 0.2 else self.interval):
            try:
                self.sample()
            except Exception:
                pass

    def sample(self) -> None:
        roots = [r for r in self.roots() if r]
        if not roots:
            return
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _t) in table.items():
            children.setdefault(ppid, []).append(pid)
        pids, todo = [], list(roots)
        while todo:
            for c in children.get(todo.pop(), ()):
                pids.append(c)
                todo.append(c)
        if not pids:
            return
        mem = threads = fdmax = 0
        for pid in pids:
            threads += table[pid][1]
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    mem += int(f.read().split()[5]) * _PAGE  # data + stack: what max_memory limits
                fds = [int(x) for x in os.listdir(f"/proc/{pid}/fd")]
                if fds:
                    fdmax = max(fdmax, max(fds) + 1)
            except (OSError, ValueError, IndexError):
                continue
        obs = self.recorder.current
        obs.peak_memory = max(obs.peak_memory, mem)
        obs.peak_processes = max(obs.peak_processes, len(pids))
        obs.peak_threads = max(obs.peak_threads, threads)
        obs.peak_fd = max(obs.peak_fd, fdmax)


def sandbox_reapers(sb):
    """A ``roots`` callable for :class:`Sampler`: the reapers of the commands ``sb`` is running."""
    return lambda: [c.reaper for c in list(getattr(sb, "_running", ())) if getattr(c, "reaper", 0)]


# ---- from observations to rules -----------------------------------------------------------------------

def _beneath(path: str, roots) -> bool:
    for r in roots:
        if path == r or r == "/" or path.startswith(r.rstrip("/") + "/"):
            return True
    return False


def minimize(paths) -> list[str]:
    """Sorted, without entries beneath another entry."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if out and _beneath(p, [out[-1]]):
            continue
        out.append(p)
    return out


def _system_tree(path: str) -> str | None:
    for t in SYSTEM_TREES:
        if path == t or path.startswith(t + "/"):
            return os.path.realpath(t)
    return None


def _has_secret(directory: str) -> str | None:
    """A secret-looking path beneath ``directory`` (bounded scan; too big to tell counts as one)."""
    seen = 0
    for root, dirs, files in os.walk(directory):
        for nm in dirs + files:
            full = os.path.join(root, nm)
            if secret_reason(full):
                return full
        seen += len(dirs) + len(files)
        if seen > _SCAN_LIMIT:
            return directory + "/..."
        dirs[:] = [d for d in dirs if d not in _SCAN_SKIP and not os.path.islink(os.path.join(root, d))]
    return None


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def _truncate(path: str, depth: int) -> str:
    parts = [p for p in path.split("/") if p]
    return "/" + "/".join(parts[:depth])


def _home() -> str:
    return os.path.realpath(os.path.expanduser("~"))


def _read_rule(path: str, collapse: int, home: str, scanned: dict | None = None) -> str:
    """The directory (or file) granting a read of ``path``: ``path`` cut to ``collapse`` components (counted
    from $HOME for paths under it), deeper again while that directory holds a secret."""
    depth = max(collapse, 1)
    if home not in ("", "/") and _beneath(path, [home]):
        depth = _depth(home) + depth  # counted from $HOME: never $HOME itself
    scanned = {} if scanned is None else scanned
    while depth < _depth(path):
        cand = _truncate(path, depth)
        if cand not in scanned:
            scanned[cand] = _has_secret(cand)
        if scanned[cand] is None:
            return cand
        depth += 1
    return path


def _compress_ports(ports) -> list:
    """Ports as ints, runs of 3 or more as "lo-hi" strings."""
    ps = sorted(set(ports))
    out: list = []
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f"{ps[i]}-{ps[j]}")
        else:
            out.extend(ps[i:j + 1])
        i = j + 1
    return out


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
            return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


def _headroom(peak: int, *, factor: float = 2.0, floor: int = 0, step: int = 1) -> int:
    v = max(int(peak * factor), peak + floor)
    return -(-v // step) * step


class Learned:
    """A learned profile: Policy field values plus the comments that go with them."""

    def __init__(self, fields: dict, notes: list | None = None, secrets: list | None = None):
        self.fields = fields
        self.notes = notes if notes is not None else []        # header comments
        self.secrets = secrets if secrets is not None else []  # (path, reason, access): touched, not granted


def build_profile(obs: Observations, *, collapse: int = DEFAULT_COLLAPSE, home: str | None = None,
                  covered_read=(), covered_write=(), limits: bool = True) -> Learned:
    """The smallest set of rules that lets the observed run pass.

    * writes: a name created or removed needs the right on its parent directory. The rule is the nearest
      ancestor that existed *before* the run (a directory the run made itself is not there next time), e.g.
      ``/tmp/pytest-of-u`` for pytest's numbered ``pytest-N``; when that ancestor is $HOME, ``/`` or a
      top-level directory, the created path itself (it still exists) instead. A file written in place gets a
      rule for that file only.
    * reads: system trees (:data:`SYSTEM_TREES`) whole and read-only; ``/proc`` for anything in it; anything
      else cut to ``collapse`` path components (``/work/proj/.venv/...`` -> ``/work/proj/.venv`` at 3), counted
      from $HOME for paths under it (``~/src/proj/tests/...`` -> ``~/src/proj/tests``), and never a directory that holds a secret-looking path (then one
      level deeper, down to the file itself).
    * secret-looking paths (:func:`secret_reason`) are never granted: they are returned in ``secrets``.
      A writable directory that holds one gets it in ``fs_denied``.
    * ``covered_read``/``covered_write``: what the caller grants anyway (the pytest plugin's defaults): not
      repeated.
    * TCP: ports connected and bound; a loopback connect to a port in the ephemeral range (a server the run
      started on port 0) becomes the whole ephemeral range. Hosts beyond loopback: ``net_allow_hosts``.
    * limits: peaks with headroom (x2; memory x2 + 64 MiB, processes +8 at least, open files +64 at least).
    """
    home = _home() if home is None else home
    covered_read = [os.path.realpath(p) for p in covered_read]
    covered_write = [os.path.realpath(p) for p in covered_write]
    learned = Learned({})
    secrets: dict[str, tuple[str, str]] = {}

    def secret(path: str, access: str) -> bool:
        why = secret_reason(path)
        if why:
            secrets.setdefault(path, (why, access))
        return bool(why)

    # -- writes
    writable: set[str] = set()
    refused: dict[str, str] = {}
    temp_dirs = {os.path.realpath(t) for t in TEMP_DIRS}
    for name in obs.names:
        if secret(name, "create/remove"):
            continue
        d = os.path.dirname(name) or "/"
        child = name
        while d in obs.created and d != "/":
            child, d = d, os.path.dirname(d) or "/"
        if (d in ("/", home) or _depth(d) < 2) and d not in temp_dirs:
            if os.path.lexists(child) and os.path.isdir(child):
                d = child
            else:
                refused.setdefault(d, name)
                continue
        if not _beneath(d, covered_write):
            writable.add(d)
    for path in obs.writes:
        if secret(path, "write"):
            continue
        if path.startswith("/proc/"):
            path = "/proc"
        elif path.startswith("/dev/pts/"):
            path = "/dev/pts"  # the terminal's number changes from run to run
        if not _beneath(path, covered_write) and os.path.exists(path):
            writable.add(path)
    writable_l = minimize(writable)
    for d, name in sorted(refused.items()):
        if not _beneath(d, writable_l):
            learned.notes.append(f"{name}: created or removed directly in {d}; not granted (it would grant all of "
                                 f"{d}); create its directory beforehand")
    for t in sorted(temp_dirs & set(writable_l)):
        learned.notes.append(f"{t} writable: the run made files there (tempfile names are unpredictable); point "
                             f"TMPDIR at a directory of its own to narrow this")
    denied = []
    for d in writable_l:
        if os.path.isdir(d) and d != "/proc":
            s = _has_secret(d)
            if s and not s.endswith("/..."):
                denied.append(s)
    # -- reads
    readable: set[str] = set()
    scanned: dict = {}
    from .seedrand import LIBRARY  # random_seed's preload: the sandbox grants it itself (plan.py)
    for path in obs.reads | obs.lists:
        if secret(path, "read") or path == os.path.realpath(LIBRARY):
            continue
        if _beneath(path, covered_read) or _beneath(path, covered_write) or _beneath(path, writable_l):
            continue
        tree = _system_tree(path)
        if tree is not None:
            readable.add(tree)
        elif path == "/proc" or path.startswith("/proc/"):
            readable.add("/proc")
        elif path.startswith("/dev/pts/"):
            readable.add("/dev/pts")
        elif path.startswith("/dev/"):
            readable.add(path)
        elif path in (home, "/"):
            learned.notes.append(f"{path} was listed; not granted (a rule on it grants everything beneath)")
        else:
            readable.add(_read_rule(path, collapse, home, scanned))
    readable_l = [p for p in minimize(readable) if not _beneath(p, writable_l)]
    if "/proc" in readable_l:
        learned.notes.append("/proc: the run read its own /proc entries; Landlock cannot grant /proc/self alone, so "
                             "this grants all of /proc (other processes' cmdline and status too)")
    if obs.execs:
        progs = sorted(obs.execs)
        learned.notes.append("programs executed: " + ", ".join(progs[:20]) + (" ..." if len(progs) > 20 else ""))
    f = learned.fields
    if readable_l:
        f["fs_readable"] = readable_l
    if writable_l:
        f["fs_writable"] = writable_l
    if denied:
        f["fs_denied"] = sorted(set(denied))
        learned.notes.append("fs_denied: secret-looking paths inside writable directories the run needed")
    # -- network
    lo, hi = ephemeral_range()
    connect: set[int] = set()
    eph = False
    hosts: set[str] = set()
    for host, port, proto in obs.connects:
        if proto != "other":
            hosts.add(host)
        if proto != "tcp":
            continue
        if _loopback(host) and lo <= port <= hi:
            eph = True
        else:
            connect.add(port)
    ports = _compress_ports(connect)
    if eph:
        ports.append(f"{lo}-{hi}")
        learned.notes.append(f"net_connect {lo}-{hi}: loopback connects to ephemeral ports (a server the run "
                             f"started on port 0)")
    if ports:
        f["net_connect"] = ports
    binds = {port for _h, port, proto in obs.binds if proto == "tcp"}
    if binds:
        f["net_bind"] = _compress_ports(binds)
    if any(not _loopback(h) and h not in ("0.0.0.0", "::") for h in hosts):
        f["net_allow_hosts"] = sorted(hosts)
    # -- limits
    if limits:
        if obs.peak_processes:
            f["max_processes"] = _headroom(obs.peak_processes, floor=8)
        if obs.peak_fd:
            f["max_open_files"] = _headroom(obs.peak_fd, floor=64, step=64)
        if obs.peak_memory:
            # x2 + 64 MiB: max_memory charges a forked child a full copy of its parent (resources.py)
            mib = -(-(2 * obs.peak_memory + (64 << 20)) // (1 << 20))
            f["max_memory"] = f"{mib}M"
        if not (obs.peak_processes or obs.peak_memory):
            learned.notes.append("no limits: the run ended before its processes could be sampled")
        learned.notes.append(
            f"observed peaks (sampled every {SAMPLE_INTERVAL * 1000:.0f} ms; short-lived processes can be missed): "
            f"memory {obs.peak_memory >> 20} MiB (data+stack), {obs.peak_processes} processes, {obs.peak_threads} "
            f"threads, highest fd {max(obs.peak_fd - 1, 0)}")
    learned.secrets = sorted((p, why, acc) for p, (why, acc) in secrets.items())
    return learned


# ---- merging and writing ------------------------------------------------------------------------------

_PATH_KEYS = ("fs_readable", "fs_writable", "fs_denied")
_PORT_KEYS = ("net_connect", "net_bind")
_LIMIT_KEYS = ("max_processes", "max_open_files", "max_memory")


def merge(old: dict, new: dict) -> dict:
    """Widen ``old`` (a profile's values) by ``new``: union of paths, ports and hosts, larger limits. A key
    only one of them has is kept (a learned profile leaves out what the run did not need)."""
    from .policy import parse_ports, parse_size
    out = dict(old)
    for k, v in new.items():
        if k not in out:
            out[k] = v
        elif k in _PATH_KEYS:
            a = [out[k]] if isinstance(out[k], str) else list(out[k])
            b = [v] if isinstance(v, str) else list(v)
            out[k] = sorted(set(a + b)) if k == "fs_denied" else minimize(a + b)
        elif k in _PORT_KEYS:
            out[k] = _compress_ports(set(parse_ports(out[k], k)) | set(parse_ports(v, k)))
        elif k == "net_allow_hosts":
            out[k] = sorted(set(out[k]) | set(v))
        elif k == "max_memory":
            a, b = parse_size(out[k], k), parse_size(v, k)
            out[k] = out[k] if a >= b else v
        elif k in ("max_processes", "max_open_files"):
            out[k] = max(int(out[k]), int(v))
        else:
            out[k] = v
    if "fs_readable" in out and "fs_writable" in out:
        w = list(out["fs_writable"])
        out["fs_readable"] = [p for p in out["fs_readable"] if not _beneath(p, w)]
    return out


def _unsupported_fields(data: dict) -> list[str]:
    """Fields this build refuses (plan.UNSUPPORTED): written as comments, so the profile stays loadable."""
    try:
        from .plan import UNSUPPORTED
        from .policy import Policy
    except Exception:
        return []
    out = []
    for name, active in UNSUPPORTED:
        if name in data:
            try:
                if active(Policy.from_dict({name: data[name]})):
                    out.append(name)
            except Exception:
                out.append(name)
    return out


def render(learned: Learned, *, command: list[str] | None = None, extra: list[str] = ()) -> str:
    """The profile as commented TOML."""
    from .profile import dumps_toml
    data = dict(learned.fields)
    lines = ["# sandlock profile learned from a real run" + (f": {' '.join(command)}" if command else ""),
             "# Review before committing: every rule below was needed by the run it was learned from."]
    lines += [f"# note: {n}" for n in learned.notes]
    if learned.secrets:
        lines.append("# secret-looking paths the run touched, NOT granted (the run under this profile is refused "
                     "them; grant them yourself only if that is intended):")
        lines += [f"#   {p}  ({why}; {acc})" for p, why, acc in learned.secrets]
    order = ("fs_readable", "fs_writable", "fs_denied", "net_connect", "net_bind", "net_allow_hosts",
             "max_memory", "max_processes", "max_open_files")
    data = {**{k: data[k] for k in order if k in data}, **{k: v for k, v in data.items() if k not in order}}
    off = _unsupported_fields(data)
    for name in off:
        lines.append(f"# {name} = {data.pop(name)!r}  (observed; this build cannot enforce {name} yet)")
    lines.append("")
    body = dumps_toml(data) if data else ""
    lines.append(body.rstrip("\n"))
    if extra:
        lines.append("")
        lines += list(extra)
    return "\n".join(lines).rstrip("\n") + "\n"


def load_existing(path) -> dict:
    """The values of an existing profile file (for --merge); {} if it does not exist."""
    from pathlib import Path
    from .profile import _load_toml, validate_dict
    p = Path(path)
    if not p.exists():
        return {}
    return validate_dict(_load_toml(p), str(p))


def write_profile(path, text: str) -> None:
    from pathlib import Path
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


# ---- running a command ----------------------------------------------------------------------------------

def learn_command(cmd: list[str], *, timeout: float | None = None, policy=None):
    """Run ``cmd`` permissively while recording; returns (Result, Observations)."""
    from .policy import Policy
    from .sandbox import Sandbox
    rec = Recorder()
    sb = Sandbox(policy if policy is not None else Policy(max_processes=LEARN_MAX_PROCESSES),
                 handlers=rec.handlers())
    sampler = Sampler(sandbox_reapers(sb), rec)
    try:
        sampler.start()
        res = sb.run_foreground(cmd, timeout=timeout)
    finally:
        sampler.stop()
        sb.close()
    try:
        sampler.sample()
    except Exception:
        pass
    return res, rec.current


def _exit_code(res) -> int:
    from .sandbox import ExitReason
    if res.reason is ExitReason.TIMEOUT:
        return 124
    if res.reason is ExitReason.SETUP_FAILED:
        return 127
    return 128 + res.signal if res.signal else res.exit_code


def format_denials(denials) -> list[str]:
    """The denial report of a checked run: one line per refused operation, with the rule that would allow it."""
    lines = []
    for d in denials:
        item = d.as_dict()
        count = item.get("count", 1)
        what = item["syscall"] + (f" [{item['access']}]" if item.get("access") not in (None, "", item["syscall"])
                                  else "")
        line = f"  {what}  {item.get('detail', '')}  {item.get('errno', '')}"
        if item.get("comm"):
            line += f"  ({item['comm']})"
        if count and count > 1:
            line += f"  x{count}"
        if item.get("hint"):
            line += f"  -> {item['hint']}"
        lines.append(line)
    return lines


def check_command(profile_path, cmd: list[str], *, timeout: float | None = None):
    """Run ``cmd`` under the profile in ``profile_path`` with denial recording; returns the Result."""
    from .profile import load_profile_file
    from .sandbox import Sandbox
    with Sandbox(load_profile_file(profile_path), record_denials=True) as sb:
        return sb.run_foreground(cmd, timeout=timeout)


def main(a) -> int:
    """``sandlock learn`` (arguments parsed by cli.py)."""
    import signal as _signal
    import sys
    from .sandbox import ExitReason
    cmd = list(a.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        sys.stderr.write("sandlock: error: learn: no command given (sandlock learn [-o FILE] -- CMD)\n")
        return 2
    if a.check:
        from .errors import PolicyError
        try:
            res = check_command(a.check, cmd, timeout=a.timeout)
        except PolicyError as exc:
            sys.stderr.write(f"sandlock: error: {exc}\n")
            return 2
        if res.denials:
            n = sum(getattr(d, "count", 1) for d in res.denials)
            sys.stderr.write(f"sandlock: {n} operation{'s' if n != 1 else ''} refused under {a.check}:\n"
                             + "\n".join(format_denials(res.denials)) + "\n")
        else:
            sys.stderr.write(f"sandlock: nothing refused under {a.check}\n")
        return _exit_code(res)
    if a.collapse < 1:
        sys.stderr.write(f"sandlock: error: --collapse: {a.collapse} must be at least 1\n")
        return 2
    old = {}
    if a.merge:
        old = load_existing(a.merge)
    sigs = {s: _signal.signal(s, _signal.SIG_IGN) for s in (_signal.SIGINT, _signal.SIGQUIT)}
    try:
        res, obs = learn_command(cmd, timeout=a.timeout)
    finally:
        for s, h in sigs.items():
            _signal.signal(s, h)
    learned = build_profile(obs, collapse=a.collapse)
    if old:
        learned.fields = merge(old, learned.fields)
        learned.notes.insert(0, f"merged into {a.merge}")
    if res.reason is not ExitReason.EXITED or res.exit_code != 0:
        learned.notes.insert(0, f"the learning run did not succeed (exit {res.exit_code}): the profile may "
                                f"be incomplete")
    text = render(learned, command=cmd)
    out = a.output or a.merge
    if out and out != "-":
        write_profile(out, text)
        f = learned.fields
        sys.stderr.write(f"sandlock: learned {len(f.get('fs_readable', []))} readable, "
                         f"{len(f.get('fs_writable', []))} writable, {len(f.get('net_connect', []))} connect, "
                         f"{len(f.get('net_bind', []))} bind rules"
                         + (f"; {len(learned.secrets)} secret-looking paths not granted" if learned.secrets else "")
                         + f"; wrote {out}\n")
    else:
        sys.stdout.write(text)
    if obs.errors:
        sys.stderr.write(f"sandlock: learn: {obs.errors} notifications could not be recorded\n")
    return _exit_code(res)


def add_parser(sub) -> None:
    """The ``learn`` subcommand's arguments (cli.py calls this)."""
    import argparse
    p = sub.add_parser("learn", help="run a command permissively and write the least-privilege profile",
                       usage="sandlock learn [-o FILE] [--merge FILE] [--collapse N] -- CMD [ARG...]\n"
                             "       sandlock learn --check FILE -- CMD [ARG...]")
    p.add_argument("-o", "--output", metavar="FILE", help="write the profile to FILE (default: stdout)")
    p.add_argument("--merge", metavar="FILE", help="widen the profile in FILE (written back unless -o)")
    p.add_argument("--collapse", type=int, default=DEFAULT_COLLAPSE, metavar="N",
                   help=f"grant reads on directories N path components deep (default {DEFAULT_COLLAPSE})")
    p.add_argument("--check", metavar="FILE", help="learn nothing: run CMD under the profile FILE and report "
                   "every refused operation with the rule that would allow it")
    p.add_argument("-t", "--timeout", type=float, metavar="SECS", help="kill the run after SECS")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")


# ---- the pytest plugin's learn mode (pytest --sandlock-learn) ---------------------------------------------

#: Fields a learning run leaves out of the test's policy (they are what is being learned).
LEARNED_FIELDS = ("fs_readable", "fs_writable", "fs_denied", "net_bind", "net_connect", "net_allow_hosts",
                  "max_memory", "max_processes", "max_open_files")


def _covered(entry, suite_list, key) -> bool:
    if key in _PATH_KEYS:
        return _beneath(entry, suite_list)
    if key in _PORT_KEYS:
        from .policy import parse_ports
        return set(parse_ports(entry, key)) <= set(parse_ports(suite_list, key)) if suite_list else False
    return entry in suite_list


class PytestLearner:
    """Registered by pytest_sandlock.plugin under ``--sandlock-learn``: every test body runs confined by a
    permissive policy (``fs_writable = ["/"]``, so the plugin's defaults and TMPDIR apply exactly as they will
    under the learned profile) while :class:`Recorder` attributes what it does to that test. At the end it
    writes one profile for the suite; with ``per_test``, rules only one test needs stay out of it and that
    test gets a marker suggestion instead."""

    def __init__(self, path: str, *, per_test: bool = False, merge: bool = False,
                 collapse: int = DEFAULT_COLLAPSE):
        self.path, self.per_test, self.merge, self.collapse = path, per_test, merge, collapse
        self.recorder = Recorder()
        self.handlers = self.recorder.handlers()
        self.tests: dict[str, Learned] = {}
        self._sb = None
        self.sampler = Sampler(lambda: sandbox_reapers(self._sb)() if self._sb is not None else [], self.recorder)
        self.sampler.start()
        self.summary: list[str] = []

    @staticmethod
    def permissive(fields: dict) -> dict:
        out = {k: v for k, v in fields.items() if k not in LEARNED_FIELDS}
        out["fs_writable"] = ["/"]
        out["max_processes"] = LEARN_MAX_PROCESSES
        return out

    def begin(self, item, state) -> None:
        self.recorder.current = Observations()
        self._sb = state.sandbox

    def end(self, item, state) -> None:
        try:
            self.sampler.sample()
        except Exception:
            pass
        self._sb = None
        obs, self.recorder.current = self.recorder.current, Observations()
        pol = state.policy
        learned = build_profile(obs, collapse=self.collapse, covered_read=pol.fs_readable,
                                covered_write=[p for p in pol.fs_writable if p != "/"])
        prev = self.tests.get(item.nodeid)
        if prev is not None:  # reruns (pytest-rerunfailures): widen
            learned.fields = merge(prev.fields, learned.fields)
        self.tests[item.nodeid] = learned

    # -- building the suite profile --
    def suite(self) -> tuple[Learned, dict[str, dict]]:
        """(suite profile, {nodeid: extra fields}) from every test's learned fields."""
        union: dict = {}
        notes: list[str] = []
        secrets: set = set()
        for lr in self.tests.values():
            union = merge(union, lr.fields)
            notes += [n for n in lr.notes if not n.startswith(("observed peaks", "no limits")) and n not in notes]
            secrets.update(lr.secrets)
        extras: dict[str, dict] = {}
        if self.per_test and len(self.tests) > 1:
            suite: dict = {k: v for k, v in union.items() if k in _LIMIT_KEYS}
            for key in (*_PATH_KEYS, *_PORT_KEYS, "net_allow_hosts"):
                counts: dict = {}
                for lr in self.tests.values():
                    for e in lr.fields.get(key, ()):
                        counts[e] = counts.get(e, 0) + 1
                shared = [e for e, c in counts.items() if c > 1]
                if shared:
                    suite = merge(suite, {key: shared})
            for nodeid, lr in self.tests.items():
                more = {}
                for key in (*_PATH_KEYS, *_PORT_KEYS, "net_allow_hosts"):
                    have = suite.get(key, [])
                    miss = [e for e in lr.fields.get(key, ()) if not _covered(e, have, key)]
                    if miss:
                        more[key] = merge({key: list(have)}, {key: miss})[key] if have else miss
                if more:
                    extras[nodeid] = more
            union = suite
        if not union.get("fs_readable") and not union.get("fs_writable"):
            # No list at all would mean "filesystem unrestricted": name a path the plugin grants anyway.
            union["fs_readable"] = ["{rootdir}"]
            notes.append("fs_readable {rootdir}: the tests need nothing beyond the plugin's defaults; this entry "
                         "keeps the filesystem restricted")
        return Learned(union, notes, sorted(secrets)), extras

    # -- pytest hooks (pluggy matches them by name) --
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self.sampler.stop()
        if not self.tests:
            return
        learned, extras = self.suite()
        if self.merge:
            old = load_existing(self.path)
            if old:
                learned.fields = merge(old, learned.fields)
                learned.notes.insert(0, f"merged into the existing {self.path}")
        if exitstatus not in (0, 5):
            learned.notes.insert(0, f"the learning run did not pass (exit status {int(exitstatus)}): the profile "
                                    f"may be incomplete")
        extra_lines = []
        if extras:
            extra_lines.append("# Tests that need more than this profile (a marker field replaces the profile's "
                               "list, so each suggestion repeats it):")
            for nodeid, more in sorted(extras.items()):
                args = ", ".join(f"{k}={v!r}" for k, v in more.items())
                extra_lines += [f"# {nodeid}", f"#   @pytest.mark.sandbox({args})"]
        write_profile(self.path, render(learned, command=["pytest", "(suite of", f"{len(self.tests)} tests)"],
                                        extra=extra_lines))
        f = learned.fields
        self.summary = [f"learned a profile from {len(self.tests)} tests: {len(f.get('fs_readable', []))} readable, "
                        f"{len(f.get('fs_writable', []))} writable, {len(f.get('net_connect', []))} connect, "
                        f"{len(f.get('net_bind', []))} bind rules -> {self.path}"]
        if learned.secrets:
            self.summary.append(f"{len(learned.secrets)} secret-looking paths touched and NOT granted: "
                                + ", ".join(p for p, _w, _a in learned.secrets[:5]))
        if extras:
            self.summary.append(f"{len(extras)} tests need more than the suite profile: marker suggestions in "
                                f"{self.path}")
            for nodeid, more in sorted(extras.items())[:10]:
                self.summary.append(f"  {nodeid}: " + ", ".join(f"{k} += {[e for e in v if not _covered(e, f.get(k, []), k)]}"
                                                                for k, v in more.items()))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.summary:
            terminalreporter.write_sep("-", "sandlock learn")
            for line in self.summary:
                terminalreporter.write_line(line)
