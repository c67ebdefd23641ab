"""The public API: ``Sandbox(policy).run(cmd)`` and ``confine(policy)``."""
from __future__ import annotations

import os
import select
import _signal as signal  # the C module: signal.py adds enums, ~0.6 ms of CLI start-up
import time
from ._enum import Enum as _Enum
from ._records import dataclass, field  # dataclasses costs ~10 ms of CLI start-up

from . import _sys
from . import spawn as _spawn
from .errors import ChildError, SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: Policy is imported when Sandbox() needs a default one
    from .policy import Policy

_DEVNULL = os.devnull


class ExitReason(_Enum):
    EXITED = "exited"
    SIGNALED = "signaled"
    KILLED = "killed"
    TIMEOUT = "timeout"
    SETUP_FAILED = "setup_failed"
    MEMORY = "memory"  # max_memory: a process was killed, or an allocation refused and the run failed


@dataclass
class Result:
    """What a run produced. ``exit_code`` is the command's, or ``-N`` for death by signal ``N`` (``signal``
    then says N), 127 when it could not be started, and ``success`` is ``exit_code == 0``."""

    success: bool
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    error: str | None = None
    signal: int | None = None
    reason: ExitReason = ExitReason.EXITED
    wall_time: float = 0.0
    denials: list = field(default_factory=list)
    notifications: int = 0
    cpu_time: float | None = None     # CPU seconds of every process of the sandbox (kernel accounting)
    peak_memory: int | None = None    # bytes, the peak of what max_memory limits (None without max_memory)
    processes: int | None = None      # processes started (root + forks), when the resource mechanism ran


@dataclass(frozen=True)
class Change:
    """One filesystem change of a dry run: ``kind`` is ``A`` (added), ``M`` (modified) or ``D`` (deleted);
    ``path`` is relative to the workdir."""
    kind: str
    path: str


@dataclass
class DryRunResult:
    success: bool
    exit_code: int
    stdout: bytes
    stderr: bytes
    changes: list = field(default_factory=list)


def feed_stdin(poller, feed):
    """Write the next chunk of ``feed = (fd, memoryview)`` to a non-blocking pipe; returns the remaining feed,
    or None once everything is written (or the reader is gone) and the pipe is closed."""
    w, view = feed
    try:
        n = os.write(w, view[:65536]) if view else 0
    except BlockingIOError:
        n = 0
    except BrokenPipeError:
        n = len(view)
    view = view[n:]
    if view:
        return (w, view)
    poller.unregister(w)
    os.close(w)
    return None


class Sandbox:
    """A policy bound to the machinery that enforces it. Reusable: the plan is compiled once."""

    def __init__(self, policy: Policy | None = None, *, policy_fn=None, init_fn=None, work_fn=None,
                 record_denials: bool = False, handlers: dict | None = None, policy_fn_timeout: float = 5.0):
        from .plan import Plan
        if policy is None:
            from .policy import Policy  # lazily: the CLI passes a policy_spec.LeanPolicy (no dataclasses import)
            policy = Policy()
        self.policy = policy
        self.policy_fn = policy_fn
        self.init_fn = init_fn
        self.work_fn = work_fn
        self._plan_args = dict(record_denials=record_denials, handlers=handlers, policy_fn=policy_fn,
                               policy_fn_timeout=policy_fn_timeout)
        self._plan = Plan(self.policy, **self._plan_args)
        self._fplan = None            # the plan of confined functions when _plan uses a pid namespace
        self._retired: list = []      # plans replaced by _pidns_fallback, closed with the sandbox
        self._running: list[_spawn.Spawned] = []
        self._procs: list = []        # Process handles from popen() still running
        self._template = None         # the COW fork template (forking.Template), started by fork()

    # ---- context manager ----
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """End everything this sandbox started (popen processes, the fork template, runs in other threads)."""
        if self._template is not None:
            self._template.close()
            self._template = None
        for child in list(self._running):
            child.kill()
        for proc in list(self._procs):
            proc.close()
        self._plan.close()
        if self._fplan is not None:
            self._fplan.close()
        for plan in self._retired:
            plan.close()
        _spawn.reap_pending(block=True)

    @property
    def missing(self) -> list[str]:
        """Protections skipped under best effort (empty unless the policy opted in)."""
        return list(self._plan.missing)

    def ports(self, proto: str = "tcp") -> dict[int, int]:
        """port_remap: {virtual port: real host port} of the current (or most recent) run; ``proto`` "tcp" or
        "udp". Safe to call from another thread while the command runs; empty without port_remap."""
        sup = getattr(self, "_sup", None)
        m = sup.state.get("port_map" if proto == "tcp" else "port_map_udp") if sup is not None else None
        return dict(m or {})

    def changes(self) -> list[Change]:
        """Copy-on-write (``workdir``, the default seccomp COW): what the current run has changed so far,
        content compared, as ``Change(kind, path)`` like ``dry_run``. Safe to call from another thread while
        ``run``/``run_function`` runs (the pytest plugin's ``sandbox_changes``); empty when no COW run is in
        progress."""
        sup = getattr(self, "_sup", None)
        cow = sup.state.get("cow_mech") if sup is not None else None
        branch = getattr(cow, "branch", None)
        if branch is None:
            return []
        return [Change(k, p) for k, p in branch.changes()]

    def take_denials(self) -> list:
        """With ``record_denials=True``: the denials the current run has recorded since the previous call (or
        since it started), and a new window (the deduplication of repeated denials and the 256 cap start
        again). Safe to call from another thread while ``run``/``run_function`` runs: a long-lived confined
        process (the pytest plugin's worker mode) gets its denials per unit of work. The final
        ``Result.denials`` holds only those not taken. Empty when nothing runs or nothing is recorded."""
        sup = getattr(self, "_sup", None)
        return sup.take_denials() if sup is not None else []

    def private_fds(self) -> list[int]:
        """The file descriptors through which this process supervises the current run (the seccomp listener,
        the supervisor's wake-up pipe and pidfds, the reaper's socket, report pipe and pidfd). A process forked
        from the caller to run other code (another sandbox's ``run_function``) must close them: the listener
        answers this sandbox's syscalls."""
        fds = []
        sup = getattr(self, "_sup", None)
        if sup is not None and sup.listener >= 0:  # -1 once the supervisor is closed
            fds += [sup.listener, sup._wake_r, sup._wake_w, *list(sup._pidfds.values())]
        for child in list(self._running):
            fds += [fd for fd in (getattr(child, "listener", -1), getattr(child, "sock", -1),
                                  getattr(child, "report_fd", -1), getattr(child, "reaper_pidfd", -1))
                    if isinstance(fd, int) and fd >= 0]
        return sorted(set(fds))

    # ---- a running sandbox ----
    def popen(self, cmd: list[str], *, stdin=-1, stdout=-1, stderr=-1):
        """Start ``cmd`` confined and return a ``Process`` at once. Each of ``stdin``/``stdout``/``stderr`` is
        ``PIPE`` (-1, the default: an unbuffered binary stream on the Process), ``DEVNULL`` (-3), ``None``
        (inherit the caller's) or a file descriptor."""
        from .process import Process
        if isinstance(cmd, (str, bytes)) or not cmd:
            raise ValueError("cmd must be a non-empty list of arguments")
        start = time.monotonic()
        theirs: list[int] = []   # the child's ends, closed here once it has them
        ours: list[int] = []     # our ends, closed if the start fails
        stdio = []
        for i, mode in enumerate((stdin, stdout, stderr)):
            if mode == -1:
                r, w = os.pipe2(os.O_CLOEXEC)
                child_end, our_end = (r, w) if i == 0 else (w, r)
                theirs.append(child_end)
                ours.append(our_end)
                stdio.append(child_end)
            elif mode == -3:
                fd = os.open(_DEVNULL, (os.O_RDONLY if i == 0 else os.O_WRONLY) | os.O_CLOEXEC)
                theirs.append(fd)
                ours.append(-1)
                stdio.append(fd)
            else:
                ours.append(-1)
                stdio.append(i if mode is None else int(mode))
        prepared = self._prepare()
        try:
            child = _spawn.spawn(self._plan, list(cmd), stdio=tuple(stdio))
        except BaseException:
            for fd in theirs + ours:
                if fd >= 0:
                    os.close(fd)
            if prepared is not None:
                prepared.close()
            raise
        finally:
            for fd in theirs:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            sup, setup_error = self._launch(child, prepared)
        except BaseException:
            for fd in ours:
                if fd >= 0:
                    os.close(fd)
            raise
        proc = Process(self, child, sup, setup_error, start, *ours)
        self._procs.append(proc)
        return proc

    @property
    def pid(self) -> int | None:
        """The root process of the most recently started command that is still running (None if none)."""
        for child in reversed(self._running):
            if child.status is None and child.killed_by is None and child.root_pid:
                return child.root_pid
        return None

    def is_running(self) -> bool:
        return self.pid is not None

    def _live(self, what: str) -> list:
        live = [c for c in self._running if c.status is None and c.killed_by is None]
        if not live:
            raise RuntimeError(f"{what}(): the sandbox is not running")
        return live

    def pause(self) -> None:
        """SIGSTOP every process of every command this sandbox is running (RuntimeError if none)."""
        from .process import signal_all
        from .resources import mark_paused
        for child in self._live("pause"):
            mark_paused(child.reaper, True)  # before the SIGSTOP: the max_cpu throttle must not undo it
            signal_all(child.reaper, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT every process paused by ``pause()`` (RuntimeError if nothing runs)."""
        from .process import signal_all
        from .resources import mark_paused
        for child in self._live("resume"):
            signal_all(child.reaper, signal.SIGCONT)
            mark_paused(child.reaper, False)

    def kill(self) -> None:
        """Kill every process this sandbox is running (a ``run()`` in another thread returns KILLED)."""
        for child in list(self._running):
            child.kill()

    # ---- composition: pipelines, COW fork and map-reduce ----
    def cmd(self, args: list[str]):
        """A pipeline stage running ``args`` under this sandbox's policy: ``a.cmd(x) | b.cmd(y)``."""
        from .pipeline import Stage
        return Stage(self, args)

    def fork(self, n: int, timeout: float | None = None):
        """Make ``n`` copy-on-write clones of the template (started at the first call: a confined process that
        ran ``init_fn`` once); clone ``i`` runs ``work_fn(i)`` with ``CLONE_ID=i`` and its stdout on its own
        pipe. Returns once every clone is reaped: a ``ForkResult`` (one ``Clone`` per clone, in order)."""
        from . import forking
        if self.work_fn is None:
            raise ValueError("fork() needs Sandbox(..., work_fn=...)")
        if self._template is None:
            self._template = forking.Template(self)
        return self._template.fork(n, timeout=timeout)

    def reduce(self, cmd: list[str], clones, timeout: float | None = None) -> Result:
        """Run ``cmd`` under this sandbox with every clone's output, in clone order, on its stdin."""
        from .forking import clone_output
        return self.run(cmd, timeout, stdin=clone_output(clones))

    # ---- running ----
    def dry_run(self, cmd: list[str], timeout: float | None = None, *, stdin: bytes | int | None = None
                ) -> DryRunResult:
        """Run ``cmd`` with copy-on-write over ``workdir``, list what it changed (content compared), then
        discard every change whatever ``on_exit`` says."""
        from .cow import dry_run
        res, changes = dry_run(self, cmd, timeout, stdin=stdin)
        return DryRunResult(res.success, res.exit_code, res.stdout, res.stderr,
                            [Change(k, p) for k, p in changes])

    def run(self, cmd: list[str], timeout: float | None = None, *, stdin: bytes | int | None = None) -> Result:
        """Run ``cmd`` confined; capture stdout and stderr. ``stdin``: None (closed: /dev/null), bytes
        (fed to the command), or a file descriptor to pass through."""
        return self._run(cmd, timeout, stdin=stdin, capture=True)

    def run_interactive(self, cmd: list[str], timeout: float | None = None) -> int:
        """Run ``cmd`` confined with the caller's stdin/stdout/stderr; returns the exit code."""
        return self.run_foreground(cmd, timeout).exit_code

    def run_foreground(self, cmd: list[str], timeout: float | None = None) -> Result:
        """Like run_interactive, but returns the whole Result. On a terminal the command stays in the
        caller's foreground process group, so it can read the terminal and gets Ctrl-C like any command."""
        return self._run(cmd, timeout, stdin=0, capture=False, new_pgrp=not os.isatty(0))

    def run_function(self, fn, *args, timeout: float | None = None) -> Result:
        """Run ``fn(*args)`` in a forked child confined by this policy (the pytest plugin's confined test
        body). The child inherits the caller's memory and fds; its exit code is fn's int result (0 for
        None), 1 if it raised. Talk to it through pipes or files made beforehand."""
        start = time.monotonic()
        plan = self._fork_plan()
        pid, child = _spawn.fork_confined(plan)
        if child is None:  # confined child
            code = 1
            if self.policy.clean_env or self.policy.env:
                os.environ.clear()  # the policy's environment holds for the function too, not only for execs
                os.environ.update({os.fsdecode(k): os.fsdecode(v) for k, v in plan.environ().items()})
            elif self.policy.random_seed is not None and b"LD_PRELOAD" in (env := plan.environ()):
                # the seeded getrandom library (seedrand.py) reaches the function's subprocesses too
                os.environ["LD_PRELOAD"] = os.fsdecode(env[b"LD_PRELOAD"])
            try:
                ret = fn(*args)
                code = ret if isinstance(ret, int) and not isinstance(ret, bool) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code & 0xFF)
        return self._supervise(child, None, -1, -1, timeout, start)

    def _supervise(self, child, stdin_data, out_r, err_r, timeout, start, prepared=None) -> Result:
        """Take the listener, start the supervisor, release the child, wait; always clean up."""
        sup = setup_error = None
        out = err = b""
        timed_out = False
        try:
            sup, setup_error = self._launch(child, prepared)
            out, err, timed_out = self._communicate(child, stdin_data, out_r, err_r, timeout)
        finally:
            self._end(child)
        return self._conclude(child, sup, out, err, timed_out, setup_error, start)

    def _prepare(self, plan=None):
        """The run's supervisor, made before the fork (``Plan.prepare_supervisor``), or None if none serves."""
        plan = plan or self._plan
        return plan.prepare_supervisor() if plan.want_listener else None

    def _launch(self, child, prepared=None):
        """Take the listener, start the supervisor (``prepared`` before the fork, or made now), release the
        child. Returns (supervisor, setup_error); the child is registered as running (``_end`` unregisters it).
        Serving starts after the release: the child's notifications wait in the kernel until it serves them. A
        child without a listener does not wait for a release at all."""
        self._running.append(child)
        setup_error = sup = None
        plan = getattr(child, "plan", None) or self._plan
        try:
            child.take_listener(use_pidfd=not plan.handoff_scm)
            if child.listener >= 0:
                sup = plan.make_supervisor(child.listener, child.root_pid, prepared, child.reaper)
                prepared = None
                sup.on_crash = child.kill
                self._sup = sup  # the current/most recent run's supervisor (ports())
                child.release()
                sup.start()
        except _spawn.ChildSetupError as exc:
            setup_error = exc
        except (ChildError, SandboxError) as exc:
            child.kill()
            setup_error = exc
        except BaseException:
            self._end(child)
            if sup is not None:
                sup.stop()
            raise
        finally:
            if prepared is not None:  # not used: no listener came
                prepared.close()
        return sup, setup_error

    def _end(self, child) -> None:
        """Make sure the sandbox is over (kill it if needed), collect the reaper, unregister."""
        if child.status is None and child.killed_by is None:
            child.kill()
            while not child.read_report():
                pass
        if getattr(child, "cpu_ms", None) is not None:
            child.cpu_time = child.cpu_ms / 1000  # reported: the init reaped the sandbox, not the reaper
        elif child.reaper:
            child.cpu_time = _cpu_time(child.reaper)  # final once the reaper reported, gone once reaped
        child.reap()
        if child in self._running:
            self._running.remove(child)

    def _conclude(self, child, sup, out, err, timed_out, setup_error, start) -> Result:
        """The Result of a finished child; runs the plan's finish hooks and stops the supervisor."""
        try:
            if sup is not None:
                sup.end_loop()  # the loop's count is final only once it has stopped
            result = self._result(child, sup, out, err, timed_out, setup_error, time.monotonic() - start)
            result.cpu_time = getattr(child, "cpu_time", None)
            for fn in (getattr(child, "plan", None) or self._plan).finish:
                fn(sup, result)
        finally:
            if sup is not None:
                sup.stop()
        return result

    def _run(self, cmd, timeout, *, stdin, capture: bool, new_pgrp: bool = True) -> Result:
        res = self._run_once(cmd, timeout, stdin=stdin, capture=capture, new_pgrp=new_pgrp)
        if res.reason is ExitReason.SETUP_FAILED and self._pidns_fallback(res):
            res = self._run_once(cmd, timeout, stdin=stdin, capture=capture, new_pgrp=new_pgrp)
        if res.reason is ExitReason.SETUP_FAILED and self._nested_fallback():
            res = self._run_once(cmd, timeout, stdin=stdin, capture=capture, new_pgrp=new_pgrp)
        return res

    # the steps of the pid namespace's set-up (native.c): refused there, isolate_pids goes on supervised
    _PIDNS_STEPS = ("namespaces: clone(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)", "namespaces: write uid_map/gid_map",
                    "namespaces: make mounts private", "namespaces: mount /proc of the new pid namespace")

    def _pidns_fallback(self, res) -> bool:
        """The kernel refused this run's pid namespace although the probe passed (a namespace count limit
        reached meanwhile, a changed sysctl): from now on this sandbox uses the supervised isolate_pids, the
        mode used wherever the kernel refuses the namespaces (its residual gaps are in procfs.py: existence
        probes such as chdir/statfs/inotify of /proc/<pid>, a symlink swapped after the check). The plan it
        replaces is closed with the sandbox (another thread may still be running with it)."""
        if not self._plan.pidns or not any(step in (res.error or "") for step in self._PIDNS_STEPS):
            return False
        self._retired.append(self._plan)
        self._plan = self._fork_plan()
        self._fplan = None
        return True

    def _fork_plan(self):
        """The plan with the supervised isolate_pids (made on first use) when ``_plan`` uses a pid namespace.
        For a confined Python function (run_function, fork()'s template): the function goes on in the forked
        child itself, so no init can stand above it as pid 1. For a run in the caller's process group
        (run_foreground on a terminal): the kernel's kill(0), setpriority/ioprio_set(PGRP, 0) act on the
        caller's group, host processes included, which only the supervised mode filters."""
        if not self._plan.pidns:
            return self._plan
        if self._fplan is None:
            from .plan import Plan
            self._fplan = Plan(self.policy, pid_namespace=False, **self._plan_args)
        return self._fplan

    def _nested_fallback(self) -> bool:
        """Inside another supervised sandbox the kernel refuses a second seccomp listener. When the only
        thing this plan supervises is the metadata guard (a writable policy's chmod/chown/utimes/xattrs),
        the same protection holds without a supervisor by refusing those syscalls in the filter: switch to
        that plan (once) and say so in ``missing``."""
        if not self._plan.want_listener or self._plan.record_denials or self.policy_fn is not None:
            return False
        from .metadata import Metadata
        from .plan import Plan
        guard = set(Metadata(self.policy).handlers())
        if self._plan.spec.fileattr_ioctl is not None:
            guard.add("ioctl")  # only chattr's ioctls reach the supervisor (argument filter)
        if not set(self._plan.names[nr] for nr in self._plan.handlers) <= guard:
            return False
        try:
            nested = _sys.prctl(21) == 2  # PR_GET_SECCOMP: 2 = already under a filter (no /proc needed)
        except OSError:
            nested = False
        if not nested:
            return False
        old = self._plan
        self._plan = Plan(self.policy, supervised=False)
        self._plan.missing.append("chmod/chown/utimes/xattrs/chattr inside fs_writable (refused: this sandbox runs "
                                  "inside another supervised sandbox)")
        old.close()
        return True

    def _run_once(self, cmd, timeout, *, stdin, capture: bool, new_pgrp: bool = True) -> Result:
        if isinstance(cmd, (str, bytes)) or not cmd:
            raise ValueError("cmd must be a non-empty list of arguments")
        start = time.monotonic()
        fds_to_close: list[int] = []
        stdin_data = None
        if stdin is None:
            in_fd = os.open(_DEVNULL, os.O_RDONLY | os.O_CLOEXEC)
            fds_to_close.append(in_fd)
        elif isinstance(stdin, (bytes, bytearray, memoryview)):
            in_fd, stdin_w = os.pipe2(os.O_CLOEXEC)
            fds_to_close.append(in_fd)
            stdin_data = (stdin_w, memoryview(bytes(stdin)))
        else:
            in_fd = int(stdin)
        out_r = err_r = -1
        if capture:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds_to_close += [out_w, err_w]
            stdio = (in_fd, out_w, err_w)
        else:
            stdio = (in_fd, 1, 2)
        plan = self._plan if new_pgrp else self._fork_plan()
        prepared = self._prepare(plan)
        try:
            child = _spawn.spawn(plan, list(cmd), stdio=stdio, new_pgrp=new_pgrp)
        except BaseException:
            if prepared is not None:
                prepared.close()
            for fd in fds_to_close:
                os.close(fd)
            if stdin_data:
                os.close(stdin_data[0])
            if capture:
                os.close(out_r)
                os.close(err_r)
            raise
        for fd in fds_to_close:
            os.close(fd)
        return self._supervise(child, stdin_data, out_r, err_r, timeout, start, prepared)

    def _communicate(self, child, stdin_data, out_r, err_r, timeout):
        """Feed stdin, drain stdout/stderr, watch the reaper's report, enforce the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        bufs = {out_r: [], err_r: []}
        open_fds = set()
        for fd in (out_r, err_r):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
                open_fds.add(fd)
        poller.register(child.sock, select.POLLIN)
        poller.register(child.report_fd, select.POLLIN)
        if stdin_data:
            os.set_blocking(stdin_data[0], False)
            poller.register(stdin_data[0], select.POLLOUT)
        sock_open, done, timed_out = True, False, False
        try:
            while not done or open_fds:
                wait_ms = None
                if deadline is not None and not done:
                    wait_ms = _sys.poll_ms(deadline - time.monotonic())
                events = poller.poll(wait_ms)
                if not events and deadline is not None and time.monotonic() >= deadline and not done:
                    timed_out = True
                    child.kill()
                    deadline = None
                    continue
                for fd, ev in events:
                    if fd in open_fds:
                        chunk = os.read(fd, 65536)
                        if chunk:
                            bufs[fd].append(chunk)
                        else:
                            poller.unregister(fd)
                            open_fds.discard(fd)
                    elif fd == child.report_fd:
                        if child.read_report():
                            done = True
                            poller.unregister(fd)
                    elif fd == child.sock and sock_open:
                        child.read_exec_result()
                        poller.unregister(fd)
                        sock_open = False
                    elif stdin_data and fd == stdin_data[0]:
                        stdin_data = feed_stdin(poller, stdin_data)
        finally:
            if stdin_data:
                os.close(stdin_data[0])
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)
        return b"".join(bufs[out_r]) if out_r >= 0 else b"", b"".join(bufs[err_r]) if err_r >= 0 else b"", timed_out

    @staticmethod
    def _result(child, sup, out, err, timed_out, setup_error, wall) -> Result:
        denials = list(sup.denials) if sup is not None else []
        notifs = sup.notifications if sup is not None else 0
        error = None
        sig = None
        if timed_out:
            return Result(False, -signal.SIGKILL, out, err, "timeout", signal.SIGKILL, ExitReason.TIMEOUT, wall,
                          denials, notifs)
        setup_error = setup_error or child.exec_error
        if setup_error is not None:
            return Result(False, 127, out, err, str(setup_error), None, ExitReason.SETUP_FAILED, wall, denials,
                          notifs)
        if child.status is not None:
            code, sig = _spawn.describe_status(child.status)
            reason = ExitReason.SIGNALED if sig else ExitReason.EXITED
        else:
            code, sig, reason = -signal.SIGKILL, signal.SIGKILL, ExitReason.KILLED
            error = "the sandbox was killed"
        return Result(code == 0, code, out, err, error, sig, reason, wall, denials, notifs)


def _cpu_time(reaper: int) -> float | None:
    """The CPU time of every process the reaper reaped (its cutime + cstime): the whole sandbox's."""
    try:  # os.open/os.read: no buffered file object on every run's path
        fd = os.open(f"/proc/{reaper}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
        finally:
            os.close(fd)
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def confine(policy: Policy) -> None:
    """Confine the calling process itself: Landlock (this thread) and the deny filter (all threads), no
    supervisor. Irreversible. Mechanisms that need a supervisor are refused with PolicyError."""
    from .plan import Plan
    plan = Plan(policy, supervised=False)
    try:
        if plan.want_listener:
            from .errors import PolicyError
            raise PolicyError("confine(): this policy needs a supervisor (" +
                              ", ".join(sorted(plan.names.values())) + "); use Sandbox(policy).run()")
        if plan.ruleset is not None:
            from .landlock import confine_self
            confine_self(plan.ruleset)  # NO_NEW_PRIVS, then this thread's Landlock domain
        else:
            _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        flags = _sys.SECCOMP_FILTER_FLAG_TSYNC
        _sys.seccomp_set_filter(plan.filter, flags)
    finally:
        plan.close()


def landlock_abi_version() -> int:
    return _sys.landlock_abi_version()
