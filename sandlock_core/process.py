"""A running sandbox: ``Sandbox.popen(cmd)`` returns a ``Process``.

The process is confined and supervised exactly like ``Sandbox.run``; the difference is that the caller owns
its standard streams (unbuffered binary files, like ``subprocess.Popen(..., bufsize=0)``) and decides when to
wait. ``pause()``/``resume()`` stop and continue *every* process of the sandbox (found through the reaper's
descendants, so a process that left the group is included); ``kill()`` asks the reaper to SIGKILL all of them.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from . import _sys

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
INHERIT = None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def sandbox_pids(reaper: int) -> list[int]:
    """Every live process of a sandbox: the descendants of its reaper (a child subreaper, so orphans of the
    sandbox come back under it and none escapes this walk)."""
    seen: list[int] = []
    todo = _children(reaper)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def signal_all(reaper: int, sig: int) -> int:
    """Send ``sig`` to every process of the sandbox; walk again until no new process shows up (a process that
    forked while we walked is caught on the next round). Returns how many processes were signalled."""
    done: set[int] = set()
    for _ in range(16):
        new = [p for p in sandbox_pids(reaper) if p not in done]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
            done.add(pid)
    return len(done)


def _reader(fd: int):
    return os.fdopen(fd, "rb", buffering=0) if fd >= 0 else None


class Process:
    """A confined command started by ``Sandbox.popen``. ``stdin``/``stdout``/``stderr`` are unbuffered binary
    files (or None when not piped). ``wait()`` returns the exit code (``-N`` for death by signal N); the full
    ``Result`` is then in ``result``. Leaving a ``with`` block kills whatever is still running and waits."""

    def __init__(self, sandbox, child, sup, setup_error, start: float, stdin_w: int, out_r: int, err_r: int):
        self._sandbox = sandbox
        self._child = child
        self._sup = sup
        self._setup_error = setup_error
        self._start = start
        self._reaper = child.reaper
        self.stdin = os.fdopen(stdin_w, "wb", buffering=0) if stdin_w >= 0 else None
        self.stdout = _reader(out_r)
        self.stderr = _reader(err_r)
        self.result = None
        self._timed_out = False
        self._paused = False
        self._out = self._err = b""

    @property
    def pid(self) -> int:
        """The sandbox's root process (the command)."""
        return self._child.root_pid

    @property
    def returncode(self) -> int | None:
        return None if self.result is None else self.result.exit_code

    def is_running(self) -> bool:
        return self.result is None and self.poll() is None

    # ---- control ----
    def pause(self) -> None:
        """SIGSTOP every process of the sandbox."""
        self._need_running("pause")
        from .resources import mark_paused
        mark_paused(self._reaper, True)  # before the SIGSTOP: the max_cpu throttle must not undo it
        signal_all(self._reaper, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT every process of the sandbox."""
        self._need_running("resume")
        signal_all(self._reaper, signal.SIGCONT)
        from .resources import mark_paused
        mark_paused(self._reaper, False)
        self._paused = False

    def send_signal(self, sig: int) -> None:
        """Signal the root process only (like ``Popen.send_signal``)."""
        if self.result is None and self.pid:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill every process of the sandbox (no-op once it is over)."""
        if self.result is None:
            self._child.kill()

    def _need_running(self, what: str) -> None:
        if self.result is not None or self._child.status is not None or self._child.killed_by is not None:
            raise RuntimeError(f"{what}(): the sandbox is not running")

    # ---- waiting ----
    def _pump(self, timeout_ms) -> bool:
        """Wait up to timeout_ms for the reaper's report (and the exec result); True when the sandbox is over."""
        child = self._child
        if child.status is not None or child.killed_by is not None:
            return True
        fds = [child.report_fd] + ([child.sock] if child.sock >= 0 and not getattr(self, "_sock_done", False) else [])
        r, _, _ = select.select(fds, [], [], None if timeout_ms is None else timeout_ms / 1000)
        if child.sock in r:
            child.read_exec_result()
            self._sock_done = True
        if child.report_fd in r:
            return child.read_report()
        return False

    def poll(self) -> int | None:
        if self.result is not None:
            return self.result.exit_code
        if self._pump(0):
            self._finish()
            return self.result.exit_code
        return None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the sandbox to end; returns the exit code. ``TimeoutError`` if it is still running after
        ``timeout`` seconds (it keeps running: call ``kill()``)."""
        if self.result is not None:
            return self.result.exit_code
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._pump(None if left is None else _sys.poll_ms(left)):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox still running after {timeout} s")
        self._finish()
        return self.result.exit_code

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Feed ``input``, read stdout/stderr to the end, wait. On timeout the sandbox is killed and the
        result says TIMEOUT. Returns (stdout, stderr) (empty for a stream that was not piped)."""
        if self.result is not None:
            return self._out, self._err
        stdin_data = None
        if self.stdin is not None:
            w = os.dup(self.stdin.fileno())
            self.stdin.close()
            self.stdin = None
            if input:
                stdin_data = (w, memoryview(bytes(input)))
            else:
                os.close(w)
        out_r = os.dup(self.stdout.fileno()) if self.stdout is not None else -1
        err_r = os.dup(self.stderr.fileno()) if self.stderr is not None else -1
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.stdout = self.stderr = None
        self._out, self._err, self._timed_out = self._sandbox._communicate(self._child, stdin_data, out_r, err_r,
                                                                          timeout)
        while not self._pump(None):
            pass
        self._finish()
        return self._out, self._err

    def _finish(self) -> None:
        if self.result is not None:
            return
        sb = self._sandbox
        sb._end(self._child)
        if self in sb._procs:
            sb._procs.remove(self)
        self.result = sb._conclude(self._child, self._sup, self._out, self._err, self._timed_out,
                                   self._setup_error, self._start)

    def close(self) -> None:
        """Kill what is still running, wait, close the streams."""
        if self.result is None:
            self.kill()
            self.wait()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "running" if self.result is None else f"exit {self.result.exit_code}"
        return f"<sandlock Process pid={self.pid} {state}>"
