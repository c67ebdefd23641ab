"""COW fork and map-reduce: ``Sandbox(policy, init_fn=..., work_fn=...).fork(n)`` and ``Sandbox(p).reduce``.

The template
    At the first ``fork()`` the sandbox starts a *template*: a forked Python child confined by the sandbox's
    policy (the same C confinement sequence as every sandbox, ``spawn.fork_confined``; supervised like any run
    when the policy needs a supervisor). Like a process after exec it keeps only the file descriptors that
    were inheritable (close-on-exec ones are closed), so a pipe the caller holds elsewhere never stays open in
    it. It runs ``init_fn()`` once, then serves fork requests on a SOCK_SEQPACKET socket until the sandbox is
    closed. It refuses to serve if ``init_fn`` left other threads running (a fork would copy their locks).

The clones
    For a request of n clones the template makes them in batches: one pipe per clone, then a C loop
    (``sl_fork_clones``) that calls the raw ``fork`` syscall n times. In C, clone i moves its pipe onto
    stdout, closes the batch's other write ends (one ``close_range``) and the control socket, and writes its
    number over the ``CLONE_ID`` value the template put in the C environment; back in Python it sets
    ``os.environ``'s entry to the same bytes, runs ``work_fn(i)``, flushes and exits (exit_group; status:
    work_fn's int result, 0 for None, 1 if it raised). Clones share every page of the template until one of
    them writes it (copy-on-write), inherit its Landlock domain and seccomp filter (and supervisor), and are
    children of the template, inside the sandbox's reaper: killing the sandbox kills them all. The template
    passes each batch's read ends to the caller (SCM_RIGHTS), reaps every clone and sends the wait statuses.
    Cost: a clone's fork copies the template's page tables and every page it writes is copied; everything a
    clone runs before ``work_fn`` is prepared in the template so that it touches as few pages as possible.

The caller
    ``fork(n)`` drains every clone's stdout while they run (one epoll set read in C, ``sl_fork_drain``; a clone
    printing more than a pipe holds never blocks) and returns once every clone is reaped: a ``ForkResult``
    (``success`` and ``stdout`` straight from the statuses and outputs; one ``Clone`` (id, pid, exit code,
    stdout) per clone, in clone order, made on first access). ``reduce(cmd, clones)`` runs ``cmd`` in *its*
    sandbox with the clones' outputs, concatenated in clone order, on stdin.

Python state in a clone: the fork bypasses Python's fork hooks (``os.register_at_fork``), which is what makes it
fast; the template is single-threaded so no lock can be held, but e.g. ``random`` is not reseeded: seed from
``CLONE_ID`` if clones need different random streams.
"""
from __future__ import annotations

import io
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

from . import _sys
from . import spawn as _spawn
from .errors import SandboxError

_HDR = struct.Struct("=cxxxII")   # kind, start, count; followed by count int32
_BATCH = struct.Struct("=cxxxIII")  # 'B' (from C): start, count, stride; the read ends ride along
_MAX_FDS = 250                     # SCM_RIGHTS carries at most 253 fds per message
_MSG_CAP = 1 << 16
_CLONE_BATCH = 16                  # clones per SCM_RIGHTS batch (a clone closes its batch's write ends)


class ForkError(SandboxError):
    """The template could not be started or could not fork (init_fn raised, fork failed, it died)."""


@dataclass
class Clone:
    """One finished clone: ``clone_id`` (its ``CLONE_ID``), ``pid``, ``exit_code`` (-N: killed by signal N),
    and everything it wrote to stdout."""

    clone_id: int
    pid: int
    exit_code: int
    stdout: bytes = b""
    signal: int | None = None

    @property
    def success(self) -> bool:
        return self.exit_code == 0


class ForkResult:
    """The clones of one ``fork(n)``, in clone order (iterable, indexable, ``len``). The ``Clone`` objects are
    made on first access: ``success`` and ``stdout`` are answered from the raw wait statuses and outputs."""

    def __init__(self, pids=(), statuses=(), outputs=(), wall_time: float = 0.0):
        self._pids, self._statuses, self._outputs = pids, statuses, outputs
        self._clones: list | None = None
        self.wall_time = wall_time

    @property
    def clones(self) -> list:
        if self._clones is None:
            self._clones = [_make_clone(i, pid, st, out) for i, (pid, st, out)
                            in enumerate(zip(self._pids, self._statuses, self._outputs))]
        return self._clones

    def __iter__(self):
        return iter(self.clones)

    def __len__(self):
        return len(self._pids)

    def __getitem__(self, i):
        return self.clones[i]

    def __repr__(self):
        return f"ForkResult({len(self)} clones, success={self.success}, wall_time={self.wall_time:.3f})"

    @property
    def success(self) -> bool:
        return all(st == 0 for st in self._statuses)

    @property
    def stdout(self) -> bytes:
        return b"".join(self._outputs)


def _make_clone(i: int, pid: int, status, output: bytes) -> Clone:
    if status is None or status < 0:
        code, sig = -9, 9  # never made, or its status was lost: reported as killed
    else:
        code, sig = _spawn.describe_status(status)
    return Clone(i, pid, code, output, sig)


def clone_output(clones) -> bytes:
    """The clones' stdout concatenated in clone order (what ``reduce`` feeds to the reducer)."""
    if isinstance(clones, (bytes, bytearray)):
        return bytes(clones)
    if isinstance(clones, ForkResult):
        return clones.stdout
    return b"".join(c.stdout for c in clones)


def _pack(kind: bytes, start: int, values) -> bytes:
    values = list(values)
    return _HDR.pack(kind, start, len(values)) + struct.pack(f"={len(values)}i", *values)


def _unpack(msg: bytes):
    kind, start, count = _HDR.unpack_from(msg)
    if kind == b"B":
        return kind, start, count, (), b""
    values = struct.unpack_from(f"={count}i", msg, _HDR.size) if kind in (b"P", b"S") else ()
    return kind, start, count, values, msg[_HDR.size:]


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class _OutputReader:
    """The caller's end of every clone's stdout pipe: one epoll set drained in C (sl_fork_drain reads whatever
    is ready into per-clone buffers and closes finished pipes), returning to Python only for the control
    socket or a timeout."""

    def __init__(self, n: int, ctl_fd: int):
        from ._native import ffi, lib
        self.ffi, self.lib, self.n = ffi, lib, n
        self.outs = ffi.new("struct sl_out[]", n)
        for i in range(n):
            self.outs[i].fd = -1
        self.open = 0
        self.ep = select.epoll()
        r = lib.sl_fork_watch_ctl(self.ep.fileno(), ctl_fd)
        if r < 0:
            self.ep.close()
            raise OSError(-r, f"fork: watching the control socket: {os.strerror(-r)}")

    def add(self, fds, first: int, stride: int) -> None:
        arr = self.ffi.new("int[]", fds)
        r = self.lib.sl_fork_watch(self.ep.fileno(), arr, len(fds), first, stride, self.outs, self.n)
        self.open += len(fds)
        if r < 0:
            for fd in fds:  # registered or not, none is drained now: close them all
                os.close(fd)
            for k in range(len(fds)):
                self.outs[first + k * stride].fd = -1
            self.open -= len(fds)
            raise OSError(-r, f"fork: watching the clones' pipes: {os.strerror(-r)}")

    def wait(self, timeout: float | None) -> tuple[bool, bool]:
        """(control socket readable, nothing happened within timeout)."""
        ms = -1 if timeout is None else _sys.poll_ms(timeout)
        r = self.lib.sl_fork_drain(self.ep.fileno(), ms, self.outs, self.n)
        if r < 0:
            raise OSError(-r, f"fork: reading the clones' output: {os.strerror(-r)}")
        self.open -= r & 0xFFFFFFF
        return bool(r & self.lib.SL_FORK_CTL), bool(r & self.lib.SL_FORK_IDLE)

    def outputs(self) -> list:
        unpack, outs = self.ffi.unpack, self.outs
        return [unpack(outs[i].data, outs[i].len) if outs[i].len else b"" for i in range(self.n)]

    def close(self) -> None:
        for i in range(self.n):
            if self.outs[i].fd >= 0:
                os.close(self.outs[i].fd)
                self.outs[i].fd = -1
        self.lib.sl_fork_outputs_free(self.outs, self.n)
        self.ep.close()


class Template:
    """The confined template process of a Sandbox and the caller's end of its control socket."""

    def __init__(self, sandbox):
        self._sandbox = sandbox
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        start = time.monotonic()
        theirs_fd = theirs.fileno()
        sys.stdout.flush()
        sys.stderr.flush()
        cloexec = _cloexec_fds()
        pid, child = _spawn.fork_confined(sandbox._fork_plan())
        if child is None:  # the confined template: never returns
            _template_main(sandbox.init_fn, sandbox.work_fn, theirs_fd, ours.fileno(), cloexec)
        theirs.close()
        self._sock = ours
        from .process import Process
        sup, setup_error = sandbox._launch(child)
        self._proc = Process(sandbox, child, sup, setup_error, start, -1, -1, -1)
        sandbox._procs.append(self._proc)
        if setup_error is not None:
            self.close()
            raise ForkError(f"the template could not be confined: {setup_error}")
        msg = self._recv_ctl(None)[0]
        if not msg:
            code = self._proc.wait(5)
            self.close()
            raise ForkError(f"the template exited during init_fn (exit status {code})")
        kind, _, _, _, text = _unpack(msg)
        if kind != b"R":
            self.close()
            raise ForkError(f"init_fn failed in the template:\n{text.decode(errors='replace')}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _recv_ctl(self, timeout):
        if timeout is not None:
            r, _, _ = select.select([self._sock], [], [], timeout)
            if not r:
                return None, []
        try:
            msg, fds, _, _ = socket.recv_fds(self._sock, _MSG_CAP, _MAX_FDS)
        except ConnectionResetError:
            return b"", []
        return msg, fds

    def fork(self, n: int, timeout: float | None = None) -> ForkResult:
        n = int(n)
        if n < 0:
            raise ValueError("fork(n): n must be >= 0")
        with self._lock:
            if self._proc.result is not None:
                raise ForkError("the template is gone (killed or closed)")
            return self._fork(n, timeout)

    def _fork(self, n: int, timeout) -> ForkResult:
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        if n == 0:
            return ForkResult([], [], [], 0.0)
        _raise_nofile(min(n, 4 * _MAX_FDS) + 256)
        self._sock.send(_pack(b"F", 0, [n]))
        pids: list = [0] * n
        statuses: list = [None] * n
        reader = _OutputReader(n, self._sock.fileno())
        finished = False
        error = None
        try:
            while not finished or reader.open:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ctl, idle = reader.wait(wait)
                if idle and deadline is not None and time.monotonic() >= deadline:
                    self._proc.kill()
                    self._proc.wait()
                    raise TimeoutError(f"fork({n}): clones still running after {timeout} s (the template and "
                                       "its clones were killed)")
                if not ctl or finished:
                    continue
                msg, fds = self._recv_ctl(0)
                if msg is None:
                    continue
                if not msg:
                    for f in fds:
                        os.close(f)
                    error = error or "the template died"
                    reader.ep.unregister(self._sock.fileno())
                    finished = True  # nothing more will come
                    continue
                kind, first, count, values, text = _unpack(msg)
                if kind == b"B":
                    reader.add(fds, first, _BATCH.unpack_from(msg)[3])
                elif kind == b"P":
                    pids[first:first + count] = values
                elif kind == b"S":
                    statuses[first:first + count] = values
                elif kind == b"E":
                    error = text.decode(errors="replace")
                elif kind == b"D":
                    finished = True
                    reader.ep.unregister(self._sock.fileno())
            outputs = reader.outputs()
        finally:
            reader.close()
        if error is not None and not any(pids):
            raise ForkError(f"fork({n}) failed: {error}")
        if error is not None:
            raise ForkError(f"fork({n}): {error} ({sum(1 for p in pids if p)} clones were made)")
        return ForkResult(pids, statuses, outputs, time.monotonic() - start)

    def close(self) -> None:
        """End the template and every clone (the sandbox's reaper kills them), close the socket."""
        try:
            self._sock.close()
        except OSError:
            pass
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.close()


# ---------------------------------------------------------------------------------------------------------
# Inside the template (a confined, single-threaded Python process). Nothing here returns.

def _cloexec_fds() -> tuple[list[int], int]:
    """In the caller, before the fork: the fds >= 3 marked close-on-exec, and the highest fd open."""
    import fcntl
    out, top = [], 2
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd < 3:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        top = max(top, fd)
        if flags & fcntl.FD_CLOEXEC:
            out.append(fd)
    return out, top


def _close_cloexec_fds(fds: list[int], top: int, keep: int) -> None:
    """In the template: close what an exec would have dropped (the caller's close-on-exec fds, and anything
    opened after they were listed), except ``keep``. The template cannot list /proc under Landlock."""
    for fd in fds:
        if fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
    if keep > top:
        _sys.close_range(top + 1, keep - 1) if keep > top + 1 else None
        _sys.close_range(keep + 1)
    else:
        _sys.close_range(top + 1)


def _template_main(init_fn, work_fn, sock_fd: int, parent_end: int, cloexec) -> None:
    code = 0
    try:
        os.close(parent_end)
        _close_cloexec_fds(*cloexec, sock_fd)
        _fill_std_fds()
        # Fresh standard streams on fds 1/2 (the caller's sys.stdout may be a capture object, not fd 1).
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", write_through=True)
        sock = socket.socket(fileno=sock_fd)
        try:
            if init_fn is not None:
                init_fn()
            sys.stdout.flush()
        except BaseException:
            import traceback
            sock.send(_pack(b"E", 0, []) + traceback.format_exc().encode()[-60000:])
            os._exit(1)
        if threading.active_count() > 1 or _threads() > 1:
            sock.send(_pack(b"E", 0, []) + b"init_fn left threads running; a fork would copy their locks")
            os._exit(1)
        import gc
        _bind_clone_calls()
        gc.collect()
        gc.freeze()  # the template's objects go to the permanent generation: a clone's collections skip them
        sock.send(_pack(b"R", 0, []))
        while True:
            msg = sock.recv(_MSG_CAP)
            if not msg:
                os._exit(0)
            kind, _, _, _, body = _unpack(msg)
            if kind == b"F":
                (n,) = struct.unpack_from("=i", body)
                _serve(sock, sock_fd, work_fn, n)
    except BaseException:
        code = 1
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    os._exit(code)


def _fill_std_fds() -> None:
    """A caller with fd 1 or 2 closed: the template gets a placeholder there (/dev/null, else a pipe nobody
    reads), so its streams can be made and no clone's pipe lands on a standard fd by accident."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            new = os.open("/dev/null", os.O_RDWR)
        except OSError:
            r, new = os.pipe()
            os.close(r)
        if new != fd:
            os.dup2(new, fd)
            os.close(new)


def _threads() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 1


def _serve(sock, sock_fd: int, work_fn, n: int) -> None:
    """Make n clones (C: sl_fork_clones sends each batch's read ends, forks, reaps), then report."""
    from ._native import ffi, lib
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = 1
    chunk = 4096  # clones per C call: bounds the template's per-chunk lists (copied by every fork)
    for first in range(0, n, chunk):
        cnt = min(chunk, n - first)
        pids = ffi.new("int[]", cnt)
        statuses = ffi.new("int[]", cnt)
        sys.stdout.flush()
        sys.stderr.flush()
        workers = int(os.environ.get("SANDLOCK_FORK_WORKERS", min(cpus, 8) if cnt >= 64 else 1))
        env = _clone_id_slot(lib)
        # Made here, once: each clone only picks its own (formatting in a clone copies the allocator's pages).
        ids = [b"%d" % k for k in range(first, first + cnt)] if env is not None else None
        exit_now = lib.sl_clone_exit  # looked up here: cffi builds a lib attribute on first use (in each clone)
        r = lib.sl_fork_clones(first, cnt, sock_fd, workers, _CLONE_BATCH, pids, statuses)
        if 0 <= r < cnt:
            _clone_main(work_fn, first + r, env, ids[r] if ids else None, exit_now)  # never returns
        ids = None
        if r < 0:
            sock.send(_pack(b"E", first, []) + f"fork: {os.strerror(-r)}".encode())
            break
        raw_pids, raw_statuses = ffi.buffer(pids), ffi.buffer(statuses)
        for k in range(0, cnt, 1024):
            m = min(1024, cnt - k)
            sock.send(_HDR.pack(b"P", first + k, m) + raw_pids[4 * k:4 * (k + m)])
            sock.send(_HDR.pack(b"S", first + k, m) + raw_statuses[4 * k:4 * (k + m)])
        if any(pids[k] <= 0 for k in range(cnt)):
            sock.send(_pack(b"E", first, []) + b"fork failed for some clones")
    sock.send(_pack(b"D", n, []))


def _bind_clone_calls() -> None:
    """Make, once in the template, the libc calls every clone makes (write, for its output): libraries here
    are bound lazily, and a call first made in a clone would be bound in each clone (a symbol lookup and a
    copied GOT page apiece)."""
    try:
        os.write(-1, b"")  # EBADF: bound, nothing written
    except OSError:
        pass


def _clone_id_slot(lib):
    """os.environ's backing dict when C can write each clone's CLONE_ID in place (see sl_fork_env_slot in
    native.c), else None (each clone then sets os.environ["CLONE_ID"] itself)."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict) or os.environ.get("CLONE_ID") != "0" * 10:
        os.environ["CLONE_ID"] = "0" * 10  # room for any clone number
    if not isinstance(data, dict) or data.get(b"CLONE_ID") != b"0" * 10 or lib.sl_fork_env_slot() != 10:
        return None
    return data


def _clone_main(work_fn, i: int, env, env_id, exit_now) -> None:
    code = 0
    try:
        if env is not None:
            env[b"CLONE_ID"] = env_id  # C already wrote it in the C environment
        else:
            os.environ["CLONE_ID"] = str(i)
        ret = work_fn(i)
        if ret is not None:
            code = ret if isinstance(ret, int) and not isinstance(ret, bool) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code = 1
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        exit_now(code & 0xFF)  # exit_group, nothing else (os._exit would be bound lazily in every clone)
