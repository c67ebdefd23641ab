"""Start a confined process: fill ``struct sl_cfg``, fork the reaper, take the listener, release the child.

The C side (csrc/native.c) does everything between fork and exec; this module only prepares the inputs and
runs the parent half of the hand-off. See docs/DESIGN.md for the sequence.
"""
from __future__ import annotations

import errno as _errno
import os
import sys
import _signal as signal  # the C module: signal.py adds enums, ~0.6 ms of CLI start-up
import _thread  # the C module: threading.py pulls in functools and collections (CLI start-up)

from . import _sys
from ._native import ffi, lib
from .errors import ChildError, NotifError

# The C side's messages, native byte order, decoded by hand (struct costs ~0.2 ms of CLI start-up):
MSG_SIZE = 12     # struct sl_msg    { char kind; uint8_t step; uint16_t pad; int32_t val; int32_t pid; }
REPORT_SIZE = 8   # struct sl_report { char kind; char pad[3]; int32_t val; }


def _i32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 4], sys.byteorder, signed=True)


def _msg(data: bytes) -> tuple[bytes, int, int, int]:
    """(kind, step, val, pid) of a ``struct sl_msg``."""
    return data[:1], data[1], _i32(data, 4), _i32(data, 8)


class ChildSetupError(ChildError):
    """The child failed before exec; ``step`` and ``errno`` say where and why (exit status 127)."""

    def __init__(self, step: str, err: int):
        self.step, self.errno = step, err
        msg = f"sandlock: {step}: {os.strerror(err)}"
        if step == "seccomp" and err == _errno.EBUSY:
            msg += (" (this process already runs under a sandlock supervisor: the kernel allows one seccomp "
                    "listener per process tree, so a nested sandbox must use a policy that needs no "
                    "supervisor, e.g. no fs_denied/limits/network allowlist)")
        if step.startswith("namespaces"):
            from .namespaces import hint
            msg += hint(step, err)
        super().__init__(msg)


def exec_candidates(argv0: str, env: dict[bytes, bytes] | None) -> list[bytes]:
    """Paths to try for argv[0], like execvp over the *sandbox's* PATH (resolved in the parent)."""
    name = os.fsencode(argv0)
    if b"/" in name:
        return [name]
    path = (env or {}).get(b"PATH") if env is not None else os.environb.get(b"PATH")
    dirs = (path or os.fsencode(os.defpath)).split(b":")
    return [os.path.join(d or b".", name) for d in dirs]


def _cstr_array(items: list[bytes], keep: list):
    arr = ffi.new("char *[]", len(items) + 1)
    for i, item in enumerate(items):
        c = ffi.new("char[]", item)
        keep.append(c)
        arr[i] = c
    arr[len(items)] = ffi.NULL
    keep.append(arr)
    return arr


HANDOFF_TIMEOUT = 10.0  # seconds from fork to the listener's hand-off


def _readable_within(fd: int, seconds: float) -> bool:
    import select
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        try:
            return bool(p.poll(int(seconds * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries poll already
            continue


class Spawned:
    """A running sandbox: its reaper, its root process, and (if any) the supervisor's listener."""

    def __init__(self, reaper: int, reaper_pidfd: int, report_fd: int, sock: int):
        self.reaper = reaper
        self.reaper_pidfd = reaper_pidfd
        self.report_fd = report_fd
        self.sock = sock
        self.root_pid = 0
        self.listener = -1
        self.status: int | None = None      # raw wait status of the root process
        self.killed_by: int | None = None   # signal the reaper got asked to kill with
        self.exec_error: ChildSetupError | None = None
        self.plan = None                    # the Plan it was started with (set by spawn/fork_confined)
        self.cpu_ms: int | None = None      # reported by the reaper under a pid namespace

    # ---- hand-off ----
    def take_listener(self, use_pidfd: bool) -> None:
        """Receive the child's hand-off message (and the listener). Raises ChildSetupError on failure."""
        if not _readable_within(self.sock, HANDOFF_TIMEOUT):
            # Confinement is a few syscalls: a child stuck this long is blocked on one that nobody serves
            # yet (e.g. a handler registered for a syscall it makes before the hand-off). Never hang.
            raise ChildError(f"sandlock: the child did not finish confinement within {HANDOFF_TIMEOUT:g} s")
        data, fd = _sys.recv_msg_fd(self.sock, MSG_SIZE)
        if len(data) < MSG_SIZE:
            if fd >= 0:
                os.close(fd)
            raise ChildError("sandlock: the child exited before confinement was complete")
        kind, step, val, pid = _msg(data)
        self.root_pid = pid if pid > 1 else 0  # never 1 or below: os.killpg/os.kill would reach the host
        if kind == b"E":
            raise ChildSetupError(ffi.string(lib.sl_step_name(step)).decode(), val)
        if kind == b"L":
            if fd < 0:
                raise NotifError("the seccomp listener did not arrive over SCM_RIGHTS")
            self.listener = fd
        elif kind == b"N":
            pidfd = _sys.pidfd_open(pid)
            try:
                self.listener = _sys.pidfd_getfd(pidfd, val)
            except OSError as exc:
                raise NotifError(f"pidfd_getfd of the seccomp listener failed: {exc.strerror} "
                                 "(a container seccomp profile may block it; see `sandlock check`)") from exc
            finally:
                os.close(pidfd)

    def release(self) -> None:
        """Tell the child the supervisor is ready: it closes its fds and execs. Only a child that handed over a
        listener waits for this; without one it goes on at once."""
        os.write(self.sock, b"G")

    def read_exec_result(self) -> None:
        """After release: EOF means exec succeeded (the socket is close-on-exec); a message means it failed."""
        try:
            data, fd = _sys.recv_msg_fd(self.sock, MSG_SIZE)
        except ConnectionResetError:
            # killed before it read our "G" (unread data makes its close a reset): no exec result to report,
            # the reaper's status says how it ended
            return
        if fd >= 0:
            os.close(fd)
        if len(data) == MSG_SIZE:
            kind, step, val, _pid = _msg(data)
            if kind == b"E":
                self.exec_error = ChildSetupError(ffi.string(lib.sl_step_name(step)).decode(), val)

    # ---- lifetime ----
    def read_report(self) -> bool:
        """Consume reaper messages; True once the sandbox is over (status or kill known)."""
        try:
            data = os.read(self.report_fd, REPORT_SIZE * 4)
        except BlockingIOError:
            return False
        if not data:
            if self.status is None and self.killed_by is None:
                self.killed_by = signal.SIGKILL  # the reaper itself died
            return True
        done = False
        for off in range(0, len(data) - len(data) % REPORT_SIZE, REPORT_SIZE):
            kind, val = data[off:off + 1], _i32(data, off + 4)
            if kind == b"P":
                self.root_pid = self.root_pid or val
            elif kind == b"C":  # the CPU time of the sandbox, in ms (pid namespace: its init reaped it all)
                self.cpu_ms = val
            elif kind == b"X":
                self.status = val
                done = True
            elif kind == b"K":
                self.killed_by = val
                done = True
        return done

    def kill(self) -> None:
        """Kill the whole sandbox: the reaper SIGKILLs every process of it, detached ones included."""
        try:
            _sys.pidfd_send_signal(self.reaper_pidfd, signal.SIGUSR1)
        except OSError:
            pass

    def signal_group(self, sig: int) -> None:
        if self.root_pid:
            try:
                os.killpg(self.root_pid, sig)
            except OSError:
                pass

    def reap(self) -> None:
        """Collect the reaper (or leave it to finish its exit off the critical path) and close our fds.

        The reaper has already killed everything and reported; tearing down its copy of our address space
        takes a fraction of a millisecond, so a reaper that is still exiting is reaped later
        (``reap_pending``: at the next spawn, at ``Sandbox.close()``, at interpreter exit)."""
        if self.reaper:
            try:
                pid, _ = os.waitpid(self.reaper, os.WNOHANG)
                if pid == 0:
                    with _pending_lock:
                        _pending.append(self.reaper)
            except ChildProcessError:
                pass
            self.reaper = 0
        for name in ("reaper_pidfd", "report_fd", "sock"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


_pending: list[int] = []
_pending_lock = _thread.allocate_lock()


def reap_pending(block: bool = False) -> None:
    """Collect reapers that were still exiting when their sandbox ended (safe from several threads: each
    pid is taken off the list by exactly one of them)."""
    while True:
        with _pending_lock:
            if not _pending:
                return
            pid = _pending.pop(0)
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if not done:
            with _pending_lock:
                _pending.append(pid)
            return


def _reap_at_exit() -> None:
    reap_pending(block=True)


import atexit  # noqa: E402

atexit.register(_reap_at_exit)


def spawn(plan, argv: list[str], *, stdio=(-1, -1, -1), cwd: str | None = None, new_pgrp: bool = True) -> Spawned:
    """Fork the reaper and the confined root child for ``argv``; returns before exec (see Spawned.release)."""
    if _pending:
        reap_pending()
    keep: list = []
    cfg = ffi.new("struct sl_cfg *")
    keep.append(cfg)
    plan.fill_cfg(cfg, keep)
    cfg.parent_pid = 0  # the root's parent is the reaper; it checks its own parent
    cfg.new_pgrp = int(new_pgrp)
    cfg.stdio = list(stdio)
    cwd = cwd if cwd is not None else plan.cwd
    if cwd is not None:
        c = ffi.new("char[]", os.fsencode(cwd))
        keep.append(c)
        cfg.cwd = c
    env = plan.environ()
    cands = exec_candidates(argv[0], env)
    cfg.exec_paths = _cstr_array(cands, keep)
    cfg.n_exec_paths = len(cands)
    cfg.argv = _cstr_array([os.fsencode(a) for a in argv], keep)
    envp = plan.envp_cache
    if envp is None:  # built once per plan: the environment does not change between runs
        plan.envp_keep = []
        envp = plan.envp_cache = _cstr_array([k + b"=" + v for k, v in env.items()], plan.envp_keep)
    cfg.envp = envp

    sv = ffi.new("int[2]")
    r = lib.sl_socketpair(sv)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    sock_parent, sock_child = sv[0], sv[1]
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    cfg.sock_fd = sock_child
    cfg.report_fd = report_w
    try:
        pid = lib.sl_spawn(cfg)
    finally:
        os.close(sock_child)
        os.close(report_w)
    if pid < 0:
        os.close(sock_parent)
        os.close(report_r)
        raise OSError(-pid, os.strerror(-pid))
    try:
        pidfd = _sys.pidfd_open(pid)
    except OSError:
        pidfd = -1
    handle = Spawned(pid, pidfd, report_r, sock_parent)
    handle.plan = plan
    return handle


def fork_confined(plan) -> tuple[int, Spawned | None]:
    """Fork a Python child that confines itself under ``plan`` and goes on running Python.

    Returns ``(0, None)`` in the confined child (after the supervisor released it) and ``(reaper_pid, handle)``
    in the parent, which must then take the listener and release the child like ``spawn``. The fork goes
    through ``os.fork`` (Python's own fork handling), then the C reaper forks once more; nothing else runs
    between the second fork and confinement.
    """
    keep: list = []
    cfg = ffi.new("struct sl_cfg *")
    keep.append(cfg)
    plan.fill_cfg(cfg, keep)
    cfg.new_pgrp = 1
    cfg.reset_signals = 0
    cfg.close_fds = 0  # the function needs the caller's fds (pytest's capture files, report pipes)
    cfg.stdio = [-1, -1, -1]
    if plan.cwd is not None:
        c = ffi.new("char[]", os.fsencode(plan.cwd))
        keep.append(c)
        cfg.cwd = c
    sv = ffi.new("int[2]")
    r = lib.sl_socketpair(sv)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    sock_parent, sock_child = sv[0], sv[1]
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    cfg.sock_fd, cfg.report_fd = sock_child, report_w
    pid = os.fork()
    if pid == 0:  # the future reaper
        try:
            os.close(sock_parent)
            os.close(report_r)
            if lib.sl_fork_with_reaper(cfg) != 0:
                os._exit(127)
            # the confined child
            os.close(report_w)
            if lib.sl_confine(cfg) != 0:
                os._exit(127)
            os.close(sock_child)
            return 0, None
        except BaseException:
            os._exit(127)
    os.close(sock_child)
    os.close(report_w)
    try:
        pidfd = _sys.pidfd_open(pid)
    except OSError:
        pidfd = -1
    handle = Spawned(pid, pidfd, report_r, sock_parent)
    handle.plan = plan
    return pid, handle


def describe_status(status: int) -> tuple[int, int | None]:
    """(exit_code, signal) from a raw wait status; exit_code is -N for death by signal N."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return -sig, sig
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return -_errno.ECHILD, None
