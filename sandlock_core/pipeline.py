"""Pipelines: ``Sandbox(a).cmd([...]) | Sandbox(b).cmd([...])``.

Every stage is its own sandbox (its own policy, reaper and supervisor); all stages run at once, joined by kernel
pipes: stage i's stdout *is* stage i+1's stdin, so the parent never reads or copies the data between stages.
The parent only drains the last stage's stdout and every stage's stderr (each stage's own, kept apart). One
timeout covers the whole pipeline: when it expires every stage is killed.

The result is the last stage's (exit status, stdout, stderr), like a shell without ``pipefail``; every stage's
own ``Result`` is in ``result.stages`` (stdout empty except for the last one).
"""
from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field

from . import _sys
from . import spawn as _spawn
from .sandbox import ExitReason, Result, feed_stdin  # noqa: F401  (ExitReason: for callers inspecting stages)

__all__ = ["Stage", "Pipeline", "PipelineResult"]


@dataclass
class PipelineResult(Result):
    """The last stage's result, plus ``stages``: one ``Result`` per stage, in order."""

    stages: list = field(default_factory=list)

    @property
    def all_succeeded(self) -> bool:
        return all(r.success for r in self.stages)


class Stage:
    """A command bound to a sandbox, not started yet. ``stage | stage`` makes a Pipeline; ``stage.run()`` runs
    it alone."""

    def __init__(self, sandbox, args):
        if isinstance(args, (str, bytes)) or not args:
            raise ValueError("a stage needs a non-empty list of arguments")
        self.sandbox = sandbox
        self.args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]

    def __or__(self, other):
        return Pipeline([self]) | other

    def run(self, timeout: float | None = None, *, stdin=None) -> PipelineResult:
        return Pipeline([self]).run(timeout, stdin=stdin)

    def __repr__(self):
        return f"Stage({self.args!r})"


class Pipeline:
    def __init__(self, stages):
        self.stages: list[Stage] = list(stages)
        for s in self.stages:
            if not isinstance(s, Stage):
                raise TypeError(f"pipeline stages must be Stage objects (Sandbox.cmd), got {type(s).__name__}")

    def __or__(self, other):
        if isinstance(other, Stage):
            return Pipeline(self.stages + [other])
        if isinstance(other, Pipeline):
            return Pipeline(self.stages + other.stages)
        return NotImplemented

    def __len__(self):
        return len(self.stages)

    def __repr__(self):
        return " | ".join(" ".join(s.args) for s in self.stages)

    def run(self, timeout: float | None = None, *, stdin: bytes | int | None = None) -> PipelineResult:
        """Run every stage concurrently; see the module docstring. ``stdin`` feeds the first stage (None:
        /dev/null, bytes, or a file descriptor)."""
        if not self.stages:
            raise ValueError("empty pipeline")
        start = time.monotonic()
        owned: list[int] = []       # fds we close once every stage has its copy
        feed = None                 # (fd, memoryview) for bytes on stdin
        if stdin is None:
            prev = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            owned.append(prev)
        elif isinstance(stdin, (bytes, bytearray, memoryview)):
            prev, w = os.pipe2(os.O_CLOEXEC)
            owned.append(prev)
            feed = (w, memoryview(bytes(stdin)))
        else:
            prev = int(stdin)
        children, err_fds = [], []
        out_r = -1
        try:
            for i, st in enumerate(self.stages):
                r, w = os.pipe2(os.O_CLOEXEC)  # to the next stage, or to us for the last one
                er, ew = os.pipe2(os.O_CLOEXEC)
                err_fds.append(er)
                try:
                    child = _spawn.spawn(st.sandbox._plan, list(st.args), stdio=(prev, w, ew))
                except BaseException:
                    os.close(r)
                    raise
                finally:
                    os.close(w)
                    os.close(ew)
                    if prev in owned:
                        owned.remove(prev)
                        os.close(prev)
                children.append(child)
                if i == len(self.stages) - 1:
                    out_r = r
                else:
                    prev = r
                    owned.append(r)
        except BaseException:
            for fd in owned + err_fds + ([feed[0]] if feed else []):
                os.close(fd)
            for c in children:
                c.kill()
                while not c.read_report():
                    pass
                c.reap()
            raise
        for fd in owned:
            os.close(fd)
        launched = []
        try:
            for st, child in zip(self.stages, children):
                launched.append(st.sandbox._launch(child))
        except BaseException:
            for st, child in zip(self.stages, children):
                st.sandbox._end(child)
            for sup, _ in launched:
                if sup is not None:
                    sup.stop()
            for fd in [out_r] + err_fds + ([feed[0]] if feed else []):
                os.close(fd)
            raise
        try:
            out, errs, timed_out = _drive(children, feed, out_r, err_fds, timeout)
        finally:
            for st, child in zip(self.stages, children):
                st.sandbox._end(child)
        results = []
        for i, (st, child, (sup, setup_error)) in enumerate(zip(self.stages, children, launched)):
            last = i == len(self.stages) - 1
            results.append(st.sandbox._conclude(child, sup, out if last else b"", errs[i], timed_out, setup_error,
                                                start))
        last = results[-1]
        fields = {k: getattr(last, k) for k in last.__dataclass_fields__}
        fields["wall_time"] = time.monotonic() - start
        return PipelineResult(**fields, stages=results)


def _drive(children, feed, out_r, err_fds, timeout):
    """Feed the first stage, drain the last stage's stdout and every stderr, watch every reaper; kill all on
    timeout. Returns (stdout, [stderr per stage], timed_out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    bufs: dict[int, list] = {fd: [] for fd in [out_r, *err_fds]}
    readable = set(bufs)
    for fd in readable:
        poller.register(fd, select.POLLIN)
    by_fd = {}
    for c in children:
        poller.register(c.report_fd, select.POLLIN)
        poller.register(c.sock, select.POLLIN)
        by_fd[c.report_fd] = ("report", c)
        by_fd[c.sock] = ("sock", c)
    if feed:
        os.set_blocking(feed[0], False)
        poller.register(feed[0], select.POLLOUT)
    pending = set(children)
    timed_out = False
    try:
        while pending or readable:
            wait_ms = None
            if deadline is not None:
                wait_ms = _sys.poll_ms(deadline - time.monotonic())
            events = poller.poll(wait_ms)
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                deadline = None
                for c in pending:
                    c.kill()
            for fd, ev in events:
                if fd in readable:
                    chunk = os.read(fd, 65536)
                    if chunk:
                        bufs[fd].append(chunk)
                    else:
                        poller.unregister(fd)
                        readable.discard(fd)
                elif fd in by_fd:
                    kind, c = by_fd[fd]
                    if kind == "sock":
                        c.read_exec_result()
                        poller.unregister(fd)
                        del by_fd[fd]
                    elif c.read_report():
                        poller.unregister(fd)
                        del by_fd[fd]
                        pending.discard(c)
                elif feed and fd == feed[0]:
                    feed = feed_stdin(poller, feed)
    finally:
        if feed:
            os.close(feed[0])
        for fd in [out_r, *err_fds]:
            os.close(fd)
    return b"".join(bufs[out_r]), [b"".join(bufs[fd]) for fd in err_fds], timed_out


