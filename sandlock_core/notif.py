"""The supervisor: receives seccomp user notifications, dispatches them by syscall, answers.

One supervisor thread per sandbox. Handlers register by syscall number and form a chain: the first handler
that returns an action decides; ``None`` passes to the next; with no decision the syscall CONTINUEs, which is
only safe because Landlock stays the boundary for it. A handler that raises fails closed (EPERM, or EACCES for
path syscalls). Handlers that decided on child memory must not CONTINUE: they act on behalf of the child and
return the result (``Value``/``Errno``/``InjectFd``).
"""
from __future__ import annotations

import errno as _errno
from . import _lazylog as logging  # the real module (~5 ms of CLI start-up) at the first log call
import os
import _thread
import threading
from collections.abc import Callable  # not typing: ~3 ms of CLI start-up

from . import _sys
from ._native import ffi, lib

log = logging.getLogger("sandlock.notif")


class Action:
    __slots__ = ()


class _Continue(Action):
    __slots__ = ()

    def __repr__(self):
        return "CONTINUE"


CONTINUE = _Continue()


class Errno(Action):
    __slots__ = ("errno",)

    def __init__(self, err: int):
        self.errno = err

    def __repr__(self):
        return f"Errno({_errno.errorcode.get(self.errno, self.errno)})"


class Value(Action):
    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = value


class InjectFd(Action):
    """Install ``fd`` in the child as the syscall's result (ADDFD with SEND); our copy is closed afterwards."""

    __slots__ = ("fd", "cloexec")

    def __init__(self, fd: int, cloexec: bool = False):
        self.fd = fd
        self.cloexec = cloexec


class Kill(Action):
    """SIGKILL the calling process (its thread group only), then answer ``errno``."""

    __slots__ = ("errno",)

    def __init__(self, err: int = _errno.ENOMEM):
        self.errno = err


class Deferred(Action):
    """The handler took ownership of the notification and will answer it later through ``Supervisor.respond``."""

    __slots__ = ()


DEFERRED = Deferred()

Handler = Callable[["Supervisor", object], "Action | None"]

O_CLOEXEC = os.O_CLOEXEC
PIDFD_THREAD = os.O_EXCL  # pidfd_open flag (Linux 6.9): a pidfd for a thread, not only a group leader


class Denial:
    """One refused operation, kept for reports (the pytest plugin's 'sandlock denials' section)."""

    __slots__ = ("syscall", "pid", "errno", "detail", "hint")

    def __init__(self, syscall: str, pid: int, err: int, detail: str = "", hint: str = ""):
        self.syscall, self.pid, self.errno, self.detail, self.hint = syscall, pid, err, detail, hint

    def as_dict(self) -> dict:
        return {"syscall": self.syscall, "pid": self.pid, "errno": _errno.errorcode.get(self.errno, str(self.errno)),
                "detail": self.detail, "hint": self.hint}

    def __repr__(self):
        return f"Denial({self.as_dict()})"


class _Workers:
    """Idle supervisor threads, reused by the next run: creating and starting a thread cost ~0.4 ms of every
    run's start-up (more right after the fork of the reaper, when each page the new thread touches is copied).
    A worker runs one loop at a time; at most ``KEEP`` wait idle (one serves back-to-back runs; concurrent runs
    start threads as before, which end afterwards), the others end."""

    KEEP = 1

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._idle: list[list] = []  # [go lock, job] of waiting workers

    def run(self, job) -> None:
        """Run ``job()`` on an idle worker, or on a new one."""
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            slot = [_thread.allocate_lock(), job]
            slot[0].acquire()
            threading.Thread(target=self._work, args=(slot,), name="sandlock-supervisor", daemon=True).start()
        slot[1] = job
        slot[0].release()

    def _work(self, slot) -> None:
        go = slot[0]
        while True:
            go.acquire()
            job, slot[1] = slot[1], None
            job()  # Supervisor._loop: never raises
            with self._lock:
                if len(self._idle) >= self.KEEP:
                    return
                self._idle.append(slot)


WORKERS = _Workers()
# A forked child has none of the parent's threads: its idle list must not hand a loop to a thread that does
# not exist there (the sandbox would wait forever), nor inherit a lock held by another thread at the fork.
os.register_at_fork(after_in_child=WORKERS.__init__)


class Supervisor:
    """Serves one listener fd on its own thread until every sandboxed process is gone or ``stop()``."""

    MAX_DENIALS = 256

    def __init__(self, listener: int, handlers: dict[int, tuple[Handler, ...]], *,
                 path_syscalls: frozenset[int] = frozenset(), names: dict[int, str] | None = None):
        self.listener = listener
        self.handlers = handlers
        self.path_syscalls = path_syscalls
        self.names = names or {}
        self.denials: list[Denial] = []
        self.denials_lock = threading.Lock()  # recording (supervisor thread) vs take_denials (any thread)
        self.errors: list[str] = []
        self.state: dict = {}          # per-sandbox state that mechanisms share (ledgers, maps)
        self.root_pid = 0              # the sandbox's first process
        self.recv_fast = None          # (C receive function, its context): answers some notifications in C
        self.on_crash = None           # called if the loop itself fails: ends the sandbox (set by the Sandbox)
        self._pidfds: dict[int, int] = {}
        self._wake_r, self._wake_w = os.pipe2(O_CLOEXEC)
        self._done = None              # held while the loop runs (on a WORKERS thread)
        self._lock = threading.Lock()
        self._on_close: list = []
        self._path_cache: tuple = (None, None, None)  # (notification id, arg index, bytes)
        self.notifications = 0
        self.reaper_pid = 0            # the sandbox's reaper, when the caller knows it (Sandbox runs)
        if listener >= 0:
            self.attach(listener)

    def attach(self, listener: int) -> None:
        """Serve ``listener`` (a supervisor made before the fork gets it once the child handed it over)."""
        self.listener = listener
        if listener < 0:
            return
        try:
            lib.sl_notif_set_flags(listener, _sys.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except Exception:  # pragma: no cover - flag missing on old kernels: slower, still correct
            pass

    # ---- lifecycle ----
    def start(self) -> None:
        """Serve on a worker thread (an idle one when there is one). Returns at once: a notification that
        comes before the loop runs waits in the kernel."""
        done = self._done = _thread.allocate_lock()
        done.acquire()

        def job():
            try:
                self._loop()
            finally:
                done.release()
        WORKERS.run(job)

    def end_loop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end (the sandbox is over) and wait for it: its figures (``notifications``) are
        final afterwards, while the mechanisms' state stays available until ``close``."""
        if self.serving:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            if self._done.acquire(True, timeout):
                self._done.release()

    @property
    def serving(self) -> bool:
        """The loop is running (started and not yet returned)."""
        return self._done is not None and self._done.locked()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop and release every resource."""
        self.end_loop(timeout)
        self.close()

    def on_close(self, fn) -> None:
        """Run ``fn()`` when the supervisor shuts down (mechanisms release their threads and fds)."""
        self._on_close.append(fn)

    def close(self) -> None:
        for fn in self._on_close:
            try:
                fn()
            except Exception:  # pragma: no cover
                log.exception("sandlock: cleanup failed")
        self._on_close.clear()
        for fd in (self.listener, self._wake_r, self._wake_w, *self._pidfds.values()):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.listener = self._wake_r = self._wake_w = -1
        self._pidfds.clear()

    # ---- the loop (hot path: keep it short) ----
    def _loop(self) -> None:
        """Serve until the sandbox ends. Should the loop itself fail (not a handler: those answer EPERM), the
        sandbox must not wait forever on syscalls nobody answers: ``on_crash`` ends it (fail closed)."""
        try:
            self._serve()
        except BaseException as exc:
            self.errors.append(f"supervisor loop failed: {exc!r}; the sandbox was killed")
            log.exception("sandlock: supervisor loop failed; killing the sandbox")
            if self.on_crash is not None:
                try:
                    self.on_crash()
                except Exception:  # pragma: no cover
                    log.exception("sandlock: could not kill the sandbox after the supervisor failed")

    def _serve(self) -> None:
        n = ffi.new("struct seccomp_notif *")
        listener, wake = self.listener, self._wake_r
        handlers = self.handlers
        wait_recv, cont = lib.sl_notif_wait_recv, lib.sl_notif_continue
        if self.recv_fast is not None:  # e.g. deterministic getrandom: fn(ctx, ...) returns what it leaves to us
            from functools import partial
            wait_recv = partial(*self.recv_fast)
        count = 0
        while True:
            r = wait_recv(listener, wake, -1, n)
            if r == 1:
                count += 1
                chain = handlers.get(n.data.nr)
                if chain is None:
                    cont(listener, n.id)
                    continue
                try:
                    action = None
                    for h in chain:
                        action = h(self, n)
                        if action is not None:
                            break
                except Exception as exc:  # fail closed
                    action = self._handler_failed(n, exc)
                if action is None or action is CONTINUE:
                    cont(listener, n.id)
                elif action is not DEFERRED:
                    self.respond(n.id, action, n.pid)
            elif r == 0:
                continue
            elif r == 2 or r == 3:
                break
            else:
                self.errors.append(f"notification receive failed: {os.strerror(-r)}")
                break
        self.notifications = count

    def _handler_failed(self, n, exc: BaseException) -> Action:
        nr = n.data.nr
        err = _errno.EACCES if nr in self.path_syscalls else _errno.EPERM
        name = self.names.get(nr, str(nr))
        log.exception("sandlock: handler for %s failed; denying with %s", name, _errno.errorcode[err])
        self.errors.append(f"handler for {name} raised {exc!r}")
        self.record(name, n.pid, err, f"internal error: {exc}")
        return Errno(err)

    def respond(self, notif_id: int, action: Action, pid: int = 0) -> None:
        """Answer a notification. Failing to inject an fd fails closed (EACCES), never CONTINUE."""
        fd = self.listener
        if fd < 0:  # the sandbox is over: nobody to answer; do not leak an fd meant for the child
            if type(action) is InjectFd:
                try:
                    os.close(action.fd)
                except OSError:
                    pass
            return
        if action is None or action is CONTINUE:
            lib.sl_notif_continue(fd, notif_id)
        elif type(action) is Errno:
            lib.sl_notif_send(fd, notif_id, 0, -action.errno, 0)
        elif type(action) is Value:
            lib.sl_notif_send(fd, notif_id, action.value, 0, 0)
        elif type(action) is InjectFd:
            flags = O_CLOEXEC if action.cloexec else 0
            r = lib.sl_notif_addfd(fd, notif_id, action.fd, 0, flags, _sys.SECCOMP_ADDFD_FLAG_SEND)
            os.close(action.fd)  # the child's copy shares our file description: never use ours again
            if r < 0 and r != -_errno.ENOENT:
                lib.sl_notif_send(fd, notif_id, 0, -_errno.EACCES, 0)
        elif type(action) is Kill:
            if pid:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            lib.sl_notif_send(fd, notif_id, 0, -action.errno, 0)
        else:  # unknown action: fail closed
            lib.sl_notif_send(fd, notif_id, 0, -_errno.EPERM, 0)

    # ---- reporting ----
    def record(self, syscall: str, pid: int, err: int, detail: str = "", hint: str = "") -> None:
        with self.denials_lock:
            if len(self.denials) < self.MAX_DENIALS:
                self.denials.append(Denial(syscall, pid, err, detail, hint))

    def take_denials(self) -> list[Denial]:
        """The denials recorded since the previous take (or the start), and a new window: the deduplication of
        mirrored denials and the ``MAX_DENIALS`` cap start again. Thread-safe (the recorders hold the lock)."""
        with self.denials_lock:
            taken, self.denials = self.denials, []
            self.state.pop("denials.seen", None)
            self.state.pop("denials.dropped", None)
        return taken

    # ---- access to the child ----
    def id_valid(self, notif_id: int) -> bool:
        return lib.sl_notif_id_valid(self.listener, notif_id) == 0

    def read_mem(self, n, addr: int, size: int) -> bytes:
        """Read child memory; raises OSError if the notification went stale meanwhile (pid reuse guard)."""
        data = _sys.process_vm_readv(n.pid, addr, size)
        if not self.id_valid(n.id):
            raise OSError(_errno.ESRCH, "notification no longer valid")
        return data

    def read_cstr(self, n, addr: int, limit: int = 4096) -> bytes:
        """Read a NUL-terminated string (page by page, never across an unmapped page)."""
        if addr == 0:
            raise OSError(_errno.EFAULT, "NULL pointer")
        out = b""
        while len(out) < limit:
            chunk = 4096 - (addr % 4096)
            data = _sys.process_vm_readv(n.pid, addr, min(chunk, limit - len(out)))
            i = data.find(b"\0")
            if i >= 0:
                out += data[:i]
                break
            out += data
            addr += len(data)
        else:
            raise OSError(_errno.ENAMETOOLONG, "string too long")
        if not self.id_valid(n.id):
            raise OSError(_errno.ESRCH, "notification no longer valid")
        return out

    def write_mem(self, n, addr: int, data: bytes) -> None:
        _sys.process_vm_writev(n.pid, addr, data)

    def pidfd(self, pid: int) -> int:
        fd = self._pidfds.get(pid)
        if fd is None:
            try:
                fd = _sys.pidfd_open(pid, PIDFD_THREAD)
            except OSError:
                fd = _sys.pidfd_open(pid)
            with self._lock:
                self._pidfds[pid] = fd
        return fd

    def forget_pid(self, pid: int) -> None:
        with self._lock:
            fd = self._pidfds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def dup_child_fd(self, n, fd: int) -> int:
        """A duplicate of the child's fd (same open file description), ours to use on its behalf."""
        dup = _sys.pidfd_getfd(self.pidfd(n.pid), fd)
        if not self.id_valid(n.id):
            os.close(dup)
            raise OSError(_errno.ESRCH, "notification no longer valid")
        return dup

    # ---- shared helpers for path syscalls (several mechanisms chain on openat: read the path once) ----
    def path_arg(self, n, index: int) -> bytes:
        """The NUL-terminated path in argument ``index`` of this notification (cached per notification)."""
        nid, idx, val = self._path_cache
        if nid == n.id and idx == index:
            return val
        val = self.read_cstr(n, n.data.args[index])
        self._path_cache = (n.id, index, val)
        return val

    def resolve(self, n, dirfd: int, path: bytes) -> str:
        """An absolute, lexically normalised path for ``path`` as the child sees it (dirfd-relative or
        cwd-relative). For *deciding* on symlinks, open on behalf instead: this is a name, not an object."""
        p = os.fsdecode(path)
        if not p.startswith("/"):
            base = os.readlink(f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}")
            p = base + "/" + p
        return os.path.normpath(p) if not p.startswith("//") else os.path.normpath(p[1:])

    @staticmethod
    def memfd_with(data: bytes, name: str = "sandlock") -> int:
        """A sealed memfd holding ``data`` (read-only for whoever receives it), for virtual files."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return fd


AT_FDCWD = -100
MFD_ALLOW_SEALING = 2
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8


def s32(v: int) -> int:
    """A register value as a signed 32-bit int (dirfd, flags)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def tgid_of(tid: int) -> int:
    """The process (thread group) a notification's task id belongs to; the tid itself if it is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def serve_virtual(sup, data: bytes, flags: int, label: str) -> Action:
    """Answer an open of a synthesized file: read-only, not a directory, a sealed memfd."""
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
        return Errno(_errno.EACCES)
    if flags & os.O_DIRECTORY:
        return Errno(_errno.ENOTDIR)
    return InjectFd(sup.memfd_with(data, label), bool(flags & os.O_CLOEXEC))
