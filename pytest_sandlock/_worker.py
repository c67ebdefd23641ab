"""Worker mode (``--sandlock-worker``): one long-lived confined pytest worker runs many tests, xdist-style.

Why: the default mode forks pytest for every test's call phase, and a fork of a pytest process costs ~8 ms on
its own (copy-on-write faults in both processes), so it cannot go under ~10 ms per test. In worker mode the
fork is paid once per worker.

Which tests: a confined test whose merged policy fields are exactly the session's (``--sandlock-profile`` /
ini / defaults, no ``@pytest.mark.sandbox`` or one that changes no field, no ``policy_fn``), when the session
policy has no per-test semantics: ``workdir`` (copy-on-write per test), ``random_seed`` / ``time_start`` /
``time_freeze`` / ``normalize_mtime`` (the kernel-level stream and clock would run on across tests, so the replay
of one test with ``--sandlock-seed`` would differ) and the ``{testdir}`` placeholder exclude worker mode. Every
other test runs in the fork-per-test mode, in the same run. ``--sandlock-learn`` turns worker mode off.

The worker's policy: the session fields, ``{tmp_path}`` and the built-in "tmp_path writable" default become
pytest's basetemp (writable: tests in one worker can write each other's tmp_path), the directories of the
collected test files readable, TMPDIR the session's scratch directory.
The ``sandbox_policy`` and ``sandbox`` fixtures of a worker test still give the test's own policy (its
``tmp_path`` writable, not basetemp): narrower than the worker's, so a ``sandbox.run`` nests inside the
worker's confinement and can only be refused more, never less.

Protocol (parent = the pytest process, never confined): at the first eligible test the parent starts a worker
with ``Sandbox(policy, record_denials=...).run_function(worker_main, ...)`` on a thread (Landlock, seccomp, the
supervisor and denial recording are the fork mode's), a fork of pytest after collection. Commands go down a
pipe as JSON lines: ``run`` (a nodeid, and the nodeid of the next item *this worker* will run, or None: the
teardown keeps what that item shares, as ``runtestprotocol(nextitem=...)``; see :func:`following`) and
``finish`` (run the remaining teardowns, ``teardown_exact(None)``, then exit). The worker runs the whole
protocol (setup, call, teardown; fixtures live in the worker) and sends ``start``, one ``report`` per phase
as soon as it is made
(``pytest_report_to_serializable``), ``warning``s, ``exit``/``interrupt``, then ``done``. At ``done`` the worker
is idle (blocked on its command pipe), so the parent takes the denials recorded since the previous test
(``Sandbox.take_denials()``): exactly this test's. They go on its call report (as in fork mode), or on the
failed report when setup or teardown failed; then the parent logs the reports. (Taking at each report would
race: the worker does not wait for the parent between phases. Denials of a process a test leaves running in
the background are charged to the next test.)

Failure: the parent waits with a deadline (the test's ``sandlock_timeout`` / pytest-timeout, over the whole
protocol) and watches the thread; a timeout kills the worker's sandbox. A worker that dies (signal, limit,
timeout, ``os._exit``) fails the running phase with the cause from the Result, the test gets a teardown
report, and the next eligible test starts a new worker (its module and session fixtures are set up again
there). A worker that cannot start turns worker mode off for the session (a warning; the tests run in fork
mode). At session end the worker is told to finish (bounded wait, then killed) and reaped; a teardown error
there is a warning and fails the session.
"""
from __future__ import annotations

import os
import select
import threading
import time
import warnings

import pytest

from . import _policy as P
from . import _report as R
from . import _runner
from ._worker_child import _Lines, _send, _tear_down_foreign, worker_main

START_TIMEOUT = 60.0       # seconds for a new worker to say it is ready
FINISH_TIMEOUT = 60.0      # seconds for the final teardowns at session end (then the worker is killed)
REAP_TIMEOUT = 30.0        # seconds for run_function to return once the worker is killed
PER_TEST_EXCLUDED = ("workdir", "random_seed", "time_start", "time_freeze", "normalize_mtime")

_POOL_KEY = pytest.StashKey["Pool"]()
_ELIGIBLE_KEY = pytest.StashKey[bool]()
_DEAD = object()           # recv(): the worker ended
_TIMEOUT = object()        # recv(): the deadline passed


# ---- the parent's side ----------------------------------------------------------------------------------

class Worker:
    """One confined worker: its sandbox, the thread in ``run_function``, and the two pipes."""

    def __init__(self, sandbox, session, env: dict, whole_env: dict | None):
        self.sandbox = sandbox
        self.result = None
        self.error: BaseException | None = None
        cmd_r, self.cmd_w = os.pipe2(os.O_CLOEXEC)
        self.msg_r, msg_w = os.pipe2(os.O_CLOEXEC)
        self.done_r, self._done_w = os.pipe2(os.O_CLOEXEC)
        self._theirs = [cmd_r, msg_w]
        os.set_blocking(self.msg_r, False)
        self.lines = _Lines(self.msg_r)
        self.busy = False
        self.closed = False
        args = (session, cmd_r, msg_w, [self.cmd_w, self.msg_r, self.done_r, self._done_w], env, whole_env)
        self.thread = threading.Thread(target=self._run, args=args, name="sandlock-worker", daemon=True)

    def _run(self, *args) -> None:
        try:
            self.result = self.sandbox.run_function(worker_main, *args)
        except BaseException as exc:  # noqa: BLE001 (the main thread reports it)
            self.error = exc
        finally:
            os.write(self._done_w, b"x")

    def start(self) -> str | None:
        """Start and wait (bounded) for ``ready``; None, or why it could not start (the worker is then gone)."""
        self.thread.start()
        msg = self.recv(time.monotonic() + START_TIMEOUT)
        for fd in self._theirs:  # the worker has its copies (or is gone): EOF now means it ended
            os.close(fd)
        self._theirs = []
        if isinstance(msg, dict) and msg.get("kind") == "ready":
            return None
        self.kill()
        why = "did not start in time" if msg is _TIMEOUT else self.describe(None, "")
        return why

    def fds(self) -> list[int]:
        """What a fork-mode test child must close: the worker's pipes and its sandbox's supervision fds."""
        if self.closed:  # the numbers may belong to other files by now
            return []
        return [self.cmd_w, self.msg_r, self.done_r, self._done_w, *self._theirs] + self.sandbox.private_fds()

    def send(self, msg: dict) -> bool:
        try:
            _send(self.cmd_w, msg)
            return True
        except OSError:  # EPIPE: the worker is gone (recv() says why)
            return False

    def recv(self, deadline: float | None):
        """The next message; _DEAD once the worker has ended and everything it wrote is read; _TIMEOUT."""
        while True:
            msg = self.lines.pop()
            if msg is not None:
                return msg
            ended = self.ended()  # before the read: whatever it wrote before ending is in the pipe now
            state = self.lines.feed()
            if state == "data":
                continue
            if state == "eof" or ended:
                return _DEAD
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return _TIMEOUT
            p = select.poll()
            p.register(self.msg_r, select.POLLIN)
            p.register(self.done_r, select.POLLIN)
            p.poll(None if wait is None else int(wait * 1000) + 1)

    def ended(self) -> bool:
        return bool(_poll_now(self.done_r))  # written by the thread once run_function has returned

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def kill(self) -> None:
        """Kill the worker's sandbox (every process in it) and reap it, bounded."""
        try:
            self.sandbox.kill()
        except Exception:
            pass
        self.wait(REAP_TIMEOUT)

    def describe(self, timeout: float | None, tsrc: str) -> str:
        if self.error is not None:
            return f"sandlock: the worker failed: {self.error!r}"
        if self.result is None:
            return "sandlock: the confined worker did not end (not reaped in time)"
        return R.describe_result(self.result, timeout=timeout, timeout_source=tsrc)

    def close(self) -> None:
        """Once (a second close would close fd numbers reused since)."""
        if self.closed:
            return
        self.closed = True
        if _runner.CLOSE_IN_CHILD == self.fds:
            _runner.CLOSE_IN_CHILD = _runner.no_fds
        fds = [self.cmd_w, self.msg_r, *self._theirs]
        if not self.thread.is_alive():  # a stuck thread still writes to _done_w one day: never a reused number
            fds += [self.done_r, self._done_w]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._theirs = []
        try:
            self.sandbox.close()
        except Exception:
            pass


def _poll_now(fd: int) -> list:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p.poll(0)


class Pool:
    """The session's worker (at most one at a time) and whether worker mode still holds."""

    def __init__(self, why_off: str | None):
        self.worker: Worker | None = None
        self.why_off = why_off        # None: worker mode is on
        self.started = 0              # workers started
        self.ran = 0                  # tests run in a worker
        self.session_fields: dict = {}


def enabled(config) -> bool:
    pool = config.stash.get(_POOL_KEY, None)
    return pool is not None and pool.why_off is None


def configure(config, s: P.Session, requested: bool, learning: bool) -> None:
    """pytest_configure: decide once whether worker mode is on, and why not."""
    if not requested:
        return
    why = None
    fields: dict = {}
    if s.off:
        why = "--sandlock-off"
    elif learning:
        why = "--sandlock-learn records each test on its own"
    elif not s.active:
        why = "no session policy (--sandlock-profile, ini sandlock_profile or --sandlock)"
    else:
        fields = dict(s.ini_fields)
        if s.profile:
            fields.update(P.profile_fields(s.profile))
        per_test = [k for k in PER_TEST_EXCLUDED if fields.get(k) not in (None, False)]
        per_test += ["{testdir}"] if P.needs_placeholder(fields, "testdir") else []
        if per_test:
            why = "the session policy has per-test semantics: " + ", ".join(per_test)
    pool = config.stash[_POOL_KEY] = Pool(why)
    pool.session_fields = fields


def header(config) -> str | None:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is None:
        return None
    if pool.why_off is None:
        return "worker mode (--sandlock-worker): tests with the session policy run in one confined worker"
    return f"worker mode off ({pool.why_off})"


def summary(config) -> str | None:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is None or not pool.ran:
        return None
    return (f"worker mode: {pool.ran} test{'s' if pool.ran != 1 else ''} ran in {pool.started} confined "
            f"worker{'s' if pool.started != 1 else ''}" + (f" (then off: {pool.why_off})" if pool.why_off else ""))


def eligible(item) -> bool:
    """Does this confined test run in the worker (decided in the parent, once per item)?"""
    if not enabled(item.config):  # never on, or turned off (a worker could not start)
        return False
    hit = item.stash.get(_ELIGIBLE_KEY, None)
    if hit is None:
        hit = item.stash[_ELIGIBLE_KEY] = _eligible(item)
    return hit


def _eligible(item) -> bool:
    from . import plugin as PL
    pool = item.config.stash[_POOL_KEY]
    if PL._mode(item) != P.CONFINED:
        return False
    try:
        fields, _ = PL._item_fields(item, PL._session(item.config))
    except P.MarkerError:
        return False  # fork mode reports it
    return item.stash.get(PL._PFN_KEY, None) is None and fields == pool.session_fields


# ---- the parent's protocol for one test -----------------------------------------------------------------

def following(item, nextitem, in_worker: bool):
    """The item that runs next on the given side (the worker, or this pytest process) after ``item``: the
    ``nextitem`` its teardown must keep fixtures for. From pytest's nextitem on in collection order, which is
    the run order without xdist; under xdist the order past nextitem is the scheduler's, so None (tear down
    everything: correct, only slower)."""
    if nextitem is None or eligible(nextitem) == in_worker:
        return nextitem
    if getattr(item.config, "workerinput", None) is not None:
        return None
    items = item.session.items
    index = item.session.stash.get(_INDEX_KEY, None)
    if index is None or len(index) != len(items):
        index = item.session.stash[_INDEX_KEY] = {id(it): i for i, it in enumerate(items)}
    start = index.get(id(nextitem))
    if start is None:
        return None
    for it in items[start + 1:]:
        if eligible(it) == in_worker:
            return it
    return None


_INDEX_KEY = pytest.StashKey[dict]()


def tear_down_foreign(item) -> None:
    """This process's SetupState before a fork-mode (or unconfined) test: what a wrong guess of the next item
    kept up is torn down first (see _tear_down_foreign)."""
    _tear_down_foreign(item)


def protocol(item, nextitem) -> bool:
    """Run ``item`` in the worker and log its reports; False if no worker can run it (fork mode then does)."""
    pool = item.config.stash[_POOL_KEY]
    w = _worker_for(item, pool)
    if w is None:
        return False
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    pool.ran += 1
    run = _Run(item, w)
    next_id = following(item, nextitem, True)
    w.busy = True
    w.send({"cmd": "run", "nodeid": item.nodeid, "next": next_id.nodeid if next_id is not None else None})
    outcome = run.collect()
    w.busy = False
    if outcome is None:
        run.log(R.denial_dicts(w.sandbox.take_denials()))  # the worker is idle: these are all this test's
    else:
        pool.worker = None  # the next eligible test starts a new worker
        run.log(run.crashed(outcome))
        w.close()
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    if run.interrupt:
        raise KeyboardInterrupt
    if run.exit is not None:
        pytest.exit(run.exit.get("msg", ""), run.exit.get("returncode"))
    return True


class _Run:
    """One test's messages. Its reports are logged together once it is over (``done``, or the worker's end):
    only then is the worker idle, so the denials taken at that moment are exactly this test's (the worker does
    not wait for the parent between phases, so a take at each report would race with the next phase)."""

    def __init__(self, item, worker: Worker):
        from . import plugin as PL
        self.PL, self.item, self.w = PL, item, worker
        self.config = item.config
        self.s = PL._session(self.config)
        self.st = self.config.stash[PL._STATS_KEY]
        self.timeout, self.tsrc = PL._timeout_for(item, self.s)
        self.missing = list(worker.sandbox.missing)
        self.st.confined += 1
        self.st.missing.update(self.missing)
        self.reports: list = []
        self.exit = None
        self.interrupt = False
        self.start = time.monotonic()

    def collect(self):
        """Read messages until ``done``; None, or _DEAD / _TIMEOUT."""
        deadline = None if self.timeout is None else self.start + self.timeout
        while True:
            msg = self.w.recv(deadline)
            if msg is _DEAD or msg is _TIMEOUT:
                return msg
            kind = msg.get("kind")
            if kind == "report":
                self.reports.append(_runner.fix_report(
                    self.config.hook.pytest_report_from_serializable(config=self.config, data=msg["data"])))
            elif kind == "warning":
                self.config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
                    warning_message=_runner.warning_from_dict(msg["data"]), when="runtest",
                    nodeid=self.item.nodeid, location=None))
            elif kind == "exit":
                self.exit = msg
            elif kind == "interrupt":
                self.interrupt = True
            elif kind == "done":
                if not self.reports and msg.get("error"):  # the worker refused the command: never silent
                    self.reports += [_failed_report(self.item, "setup", f"sandlock worker: {msg['error']}"),
                                     _teardown_report(self.item)]
                return None

    def log(self, denials: list[dict]) -> None:
        """Log the reports; the denials go where fork mode puts them (the call report), or on the failed
        report when there is one."""
        reports = self.reports
        if not reports:
            return
        target = next((r for r in reports if r.failed), None) or \
            next((r for r in reports if r.when == "call"), reports[0])
        self.PL._decorate(self.item, target, denials, self.s)
        if denials:
            self.st.denied[self.item.nodeid] = R.total(denials)
        for report in reports:
            if report.when == "teardown":
                self._properties(report, denials)
            self.item.ihook.pytest_runtest_logreport(report=report)

    def _properties(self, report, denials: list[dict]) -> None:
        """JUnit reads a test's properties from its teardown report: the sandlock ones go there."""
        props = list(report.user_properties)
        if self.missing:
            props.append(("sandlock_missing", "; ".join(self.missing)))
        if denials:
            props.append(("sandlock_denials", R.junit_value(denials)))
        props.append(("sandlock_seed", P.test_seed(self.s.seed, self.item.nodeid)))
        report.user_properties = props
        self.item.user_properties[:] = props

    def crashed(self, outcome) -> list[dict]:
        """The worker ended (or overran its deadline) inside this test: the phase that was running fails with
        the real cause, and a teardown report closes the test. Returns the test's denials (the Result's: what
        was not taken)."""
        if outcome is _TIMEOUT:
            self.w.kill()
            from types import SimpleNamespace
            why = R.describe_result(SimpleNamespace(reason="timeout", wall_time=time.monotonic() - self.start),
                                    timeout=self.timeout, timeout_source=self.tsrc)
        else:
            if not self.w.wait(REAP_TIMEOUT):
                self.w.kill()
            why = self.w.describe(self.timeout, self.tsrc).replace("confined test process",
                                                                  "confined worker (running this test)")
        res = self.w.result
        denials = R.denial_dicts(res.denials if res is not None else self.w.sandbox.take_denials())
        phases = {r.when: r.passed for r in self.reports}
        if "teardown" in phases:
            return denials  # the test was over: the worker died between tests, a new one takes the next test
        self.st.crashed.append(self.item.nodeid)
        when = "setup" if "setup" not in phases else \
            "call" if phases["setup"] and "call" not in phases else "teardown"
        self.reports.append(_failed_report(self.item, when, why))
        if when != "teardown":
            self.reports.append(_teardown_report(self.item))
        return denials


def _failed_report(item, when: str, message: str):
    """A failed report for a phase the worker did not finish (xfail still applies to the call)."""
    from _pytest.runner import CallInfo
    if when == "call":
        try:
            from _pytest.skipping import evaluate_xfail_marks, xfailed_key
            item.stash[xfailed_key] = evaluate_xfail_marks(item)
        except Exception:
            pass

    def fail():
        pytest.fail(message, pytrace=False)

    # the denials section and the "[sandlock: N denied]" note are added by _Run.log, as for any report
    return item.ihook.pytest_runtest_makereport(item=item, call=CallInfo.from_call(fail, when=when))


def _teardown_report(item):
    from _pytest.runner import CallInfo
    return item.ihook.pytest_runtest_makereport(item=item, call=CallInfo.from_call(lambda: None, when="teardown"))


# ---- starting and ending workers ------------------------------------------------------------------------

def _worker_for(item, pool: Pool) -> Worker | None:
    """The running worker, or a new one; None (and worker mode off, with a warning) if none can start."""
    if pool.worker is not None and pool.worker.ended():  # it died between tests: not this test's doing
        pool.worker.kill()
        pool.worker.close()
        pool.worker = None
    if pool.worker is not None:
        return pool.worker
    if pool.why_off is not None:
        return None
    try:
        sandbox, env, whole_env = _worker_sandbox(item.config, item.session, pool)
    except Exception as exc:  # a kernel without a feature, a bad policy: fork mode reports it per test
        return _off(pool, f"the worker's sandbox could not be made: {exc}")
    w = Worker(sandbox, item.session, env, whole_env)
    why = w.start()
    if why is not None:
        w.close()
        return _off(pool, f"the worker could not start: {why}")
    pool.worker = w
    pool.started += 1
    _runner.CLOSE_IN_CHILD = w.fds
    return w


def _off(pool: Pool, why: str) -> None:
    pool.why_off = why
    warnings.warn(pytest.PytestWarning(f"sandlock: worker mode off, tests run in fork mode: {why}"))
    return None


def _worker_sandbox(config, session, pool: Pool):
    """(Sandbox, env, whole environment) of a worker: the session policy with basetemp for {tmp_path}."""
    from sandlock_core import Policy, Sandbox
    from . import plugin as PL
    s = PL._session(config)
    mapping = PL._static_placeholders(config)
    basetemp = mapping.get("basetemp")
    if not basetemp:
        raise RuntimeError("pytest's basetemp is not available")
    mapping["tmp_path"] = basetemp
    where = f"profile {s.profile!r}" if s.profile else "sandlock ini defaults"
    fields = P.expand(dict(pool.session_fields), mapping, where)
    env: dict[str, str] = {}
    if (fields.get("fs_readable") or fields.get("fs_writable")) and s.defaults:
        readable, writable = P.default_paths(mapping["rootdir"], mapping["cache_dir"], PL._coverage_dir())
        testdirs = P._minimize({str(it.path.parent) for it in session.items if getattr(it, "path", None)})
        env["TMPDIR"] = PL._scratch_dir(config) or basetemp
        fields["fs_readable"] = P.merge_paths(fields.get("fs_readable"), readable + testdirs)
        fields["fs_writable"] = P.merge_paths(fields.get("fs_writable"), writable + [basetemp])
    if s.best_effort:
        fields.setdefault("best_effort", True)
    policy = Policy.from_dict(fields, source=where)
    return Sandbox(policy, record_denials=s.record_denials), env, PL._child_environ(policy)


def finish(session) -> None:
    """Session end: the worker runs its remaining teardowns and exits (bounded), then it is reaped."""
    pool = session.config.stash.get(_POOL_KEY, None)
    if pool is None or pool.worker is None:
        return
    w, pool.worker = pool.worker, None
    try:
        error = _finish_worker(w)
    finally:
        w.close()
    if error:
        message = f"sandlock: the confined worker's teardowns at the end of the session: {error}"
        session.config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
            warning_message=warnings.WarningMessage(pytest.PytestWarning(message), pytest.PytestWarning,
                                                    __file__, 0),
            when="runtest", nodeid="", location=None))
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _finish_worker(w: Worker) -> str | None:
    if w.busy or not w.send({"cmd": "finish"}):  # interrupted in the middle of a test: no teardown
        w.kill()
        return None
    deadline = time.monotonic() + FINISH_TIMEOUT
    while True:
        msg = w.recv(deadline)
        if msg is _TIMEOUT:
            w.kill()
            return f"not done after {FINISH_TIMEOUT:g}s: killed"
        if msg is _DEAD:
            w.wait(REAP_TIMEOUT)
            return "the worker died: " + w.describe(None, "")
        if msg.get("kind") == "finished":
            if not w.wait(REAP_TIMEOUT):
                w.kill()
            return msg.get("error")


def kill_all(config) -> None:
    """pytest_unconfigure: nothing may outlive the session (sessionfinish normally finished it already)."""
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None and pool.worker is not None:
        w, pool.worker = pool.worker, None
        w.kill()
        w.close()
