"""Run one test's call phase in a confined forked child; bring its reports back to the parent.

The parent (the pytest process, never confined) sets the test up, then ``Sandbox.run_function`` forks a child
that confines itself (Landlock + seccomp, supervised by the parent) and runs pytest's own ``call`` phase
(``call_and_report(item, "call", log=False)``), so assertion rewriting, tracebacks, skip/xfail, captured
output and ``record_property`` behave as in-process. The child serialises its report with
``pytest_report_to_serializable`` into a memfd made before the fork (a pipe could fill up while the parent
waits); the parent reads it back with ``pytest_report_from_serializable`` and logs it. Teardown runs in the
parent again, so fixtures (and session fixtures) live in the pytest process, set up once.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile  # noqa: F401  (imported here, not in the confined child, where it may not be readable)
import warnings

from _pytest.outcomes import Exit
from _pytest.runner import call_and_report

MAX_REPORT = 64 << 20  # the child is untrusted: never read more than this from it

IN_CHILD = False  # True inside the confined child (the timeout hooks and fixtures look at it)


def no_fds() -> list[int]:
    return []


# The fds a fork-mode child closes first: a running worker's (worker mode) pipes and supervision fds, above all
# its seccomp listener, which would let this test answer the worker's syscalls.
CLOSE_IN_CHILD = no_fds


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _warning_to_dict(w) -> dict:
    cat = w.category
    return {"message": str(w.message), "category": f"{cat.__module__}:{cat.__qualname__}",
            "filename": w.filename, "lineno": w.lineno}


def warning_from_dict(d: dict):
    import importlib
    mod, _, qual = d["category"].partition(":")
    cat: type = UserWarning
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, Warning):
            cat = obj
    except Exception:
        pass
    try:
        message = cat(d["message"])
    except Exception:
        message = UserWarning(d["message"])
    return warnings.WarningMessage(message, cat, d.get("filename") or "?", d.get("lineno") or 0)


class _ChildCoverage:
    """Coverage measured in the child must be saved before it ``os._exit``s (atexit does not run).

    The parent's Coverage (pytest-cov's, or ``coverage run``'s) is stopped in the child and a fresh one with
    the same configuration measures the test, then saves to ``<data_file>.sandlock.<pid>.<n>``, which
    pytest-cov combines at the end of the session (with ``coverage run``: ``coverage combine --append``).
    The data file's directory is writable under the plugin's defaults."""

    def __init__(self):
        self.cov = None
        coverage = sys.modules.get("coverage")  # never import in the child: the files may not be readable
        if coverage is None:
            return
        parent = coverage.Coverage.current() if hasattr(coverage.Coverage, "current") else None
        if parent is None:
            return
        try:
            parent._auto_save = False
            parent.stop()
            suffix = f"sandlock.{os.getpid()}.{os.urandom(3).hex()}"
            data_file = os.path.abspath(parent.config.data_file)
            try:
                from coverage.control import CONFIG_DATA_PREFIX  # coverage >= 7.10
                cov = coverage.Coverage(data_file=data_file, data_suffix=suffix,
                                        config_file=CONFIG_DATA_PREFIX + parent.config.serialize())
            except (ImportError, AttributeError, TypeError):
                cov = coverage.Coverage(data_file=data_file, data_suffix=suffix,
                                        source=parent.config.source, branch=parent.config.branch)
            cov._warn_no_data = False
            cov._warn_unimported_source = False
            cov._warn_preimported_source = False
            cov.start()
            self.cov = cov
        except Exception as exc:  # never break the test over coverage
            sys.stderr.write(f"sandlock: coverage not measured in the confined test: {exc!r}\n")

    def checkpoint(self) -> None:
        """Save what was measured so far, still measuring (the worker mode, after each test: a worker that is
        killed later loses no test's lines but the running one's)."""
        if self.cov is None:
            return
        try:
            self.cov.save()
        except Exception as exc:
            sys.stderr.write(f"sandlock: coverage data of the confined worker not saved: {exc!r}\n")

    def save(self) -> None:
        if self.cov is None:
            return
        try:
            self.cov.stop()
            self.cov.save()
        except Exception as exc:
            sys.stderr.write(f"sandlock: coverage data of the confined test not saved: {exc!r}\n")


# ---- copy-on-write changes: the confined child asks, the parent's supervisor knows ---------------------------

CHANNEL: "ChangesChannel | None" = None  # set in the confined child of a test with a workdir


class ChangesChannel:
    """The child's end: one request byte on ``req_w``, one JSON line back on ``resp_r``."""

    def __init__(self, req_w: int, resp_r: int):
        self.req_w, self.resp_r = req_w, resp_r

    def query(self) -> list:
        from sandlock_core import Change
        _write_all(self.req_w, b"?")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk or len(buf) > MAX_REPORT:
                raise RuntimeError("sandlock: the supervisor did not answer the changes request")
            buf += chunk
        data = json.loads(buf)
        if isinstance(data, dict):
            raise RuntimeError(f"sandlock: could not list the changes: {data.get('error')}")
        return [Change(k, p) for k, p in data]


class ChangesServer:
    """The parent's end: a thread that answers each request with ``sandbox.changes()`` while the confined
    test runs. The pipes are close-on-exec: only the forked test body (not the commands it runs) holds them."""

    def __init__(self, sandbox):
        import threading
        self.sandbox = sandbox
        self.req_r, self.req_w = os.pipe2(os.O_CLOEXEC)
        self.resp_r, self.resp_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._serve, name="sandlock-changes", daemon=True)
        self.thread.start()

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.req_w, self.resp_r

    def _serve(self) -> None:
        """Owns req_r and resp_w (closes them itself: close() never closes an fd this thread may still use)."""
        try:
            while os.read(self.req_r, 1):
                try:
                    data = [[c.kind, c.path] for c in self._changes()]
                except Exception as exc:  # answer, never leave the child waiting
                    data = {"error": repr(exc)}
                _write_all(self.resp_w, json.dumps(data).encode() + b"\n")
        except OSError:
            pass
        finally:
            os.close(self.req_r)
            os.close(self.resp_w)

    def _changes(self) -> list:
        """The sandbox's processes may be writing while the upper layer is walked: retry a walk that lost a
        file under it."""
        for attempt in range(3):
            try:
                return self.sandbox.changes()
            except FileNotFoundError:
                if attempt == 2:
                    raise
        return []

    def close(self) -> None:
        """After the run (the child's tree is gone): EOF for the reader, EPIPE for a blocked writer."""
        os.close(self.req_w)
        os.close(self.resp_r)
        self.thread.join(5)


def child_main(item, out_fd: int, env: dict[str, str], whole_env: dict[str, str] | None = None,
               channel: tuple[int, int] | None = None) -> int:
    """The confined child: run the call phase, write the report(s) to ``out_fd``. Returns the exit code: 1 if
    the test failed (so a workdir's ``on_error`` applies), else 0. ``whole_env`` replaces the environment (the
    policy's clean_env/env); ``env`` adds to it (TMPDIR); ``channel`` asks the parent for COW changes."""
    global IN_CHILD, CHANNEL
    IN_CHILD = True
    for fd in CLOSE_IN_CHILD():
        try:
            os.close(fd)
        except OSError:
            pass
    CHANNEL = ChangesChannel(*channel) if channel else None
    if whole_env is not None:
        os.environ.clear()
        os.environ.update(whole_env)
    for k, v in env.items():
        os.environ[k] = v
    if "TMPDIR" in env:
        tempfile.tempdir = None
    cov = _ChildCoverage()
    config = item.config
    messages = []
    code = 0
    try:
        with warnings.catch_warnings(record=True) as wlog:
            report = call_and_report(item, "call", log=False)
        code = 1 if report.failed else 0
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        messages.append({"kind": "report", "data": data})
        for w in wlog:
            messages.append({"kind": "warning", "data": _warning_to_dict(w)})
        if CHANNEL is not None:
            try:
                changes = [[c.kind, c.path] for c in CHANNEL.query()]
                messages.append({"kind": "changes", "data": changes})
            except Exception as exc:
                messages.append({"kind": "changes", "error": str(exc)})
    except Exit as exc:
        messages.append({"kind": "exit", "msg": str(exc.msg), "returncode": exc.returncode})
    except KeyboardInterrupt:
        messages.append({"kind": "interrupt"})
    finally:
        cov.save()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
    payload = "\n".join(json.dumps(m, default=str) for m in messages).encode()
    _write_all(out_fd, payload)
    return code


def fix_report(report):
    """JSON has no tuples: a skip's ``longrepr`` (path, lineno, reason) must be one again (pytest asserts it).
    JSON, not pickle: the child is confined and untrusted, and unpickling its bytes in the unconfined parent
    would hand it the parent."""
    lr = getattr(report, "longrepr", None)
    if isinstance(lr, list) and len(lr) == 3:
        report.longrepr = tuple(lr)
    return report


def read_messages(fd: int) -> list[dict]:
    chunks = []
    off = 0
    while off < MAX_REPORT:
        chunk = os.pread(fd, 1 << 20, off)
        if not chunk:
            break
        chunks.append(chunk)
        off += len(chunk)
    out = []
    for line in b"".join(chunks).splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
