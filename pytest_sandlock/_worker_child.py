"""Worker mode's confined side (``_worker.py`` is the parent's): the loop a long-lived confined pytest worker
runs, and the JSON-lines wire both sides speak. The worker is a fork of pytest made by
``Sandbox.run_function(worker_main, ...)``: it runs each test's whole protocol (setup, call, teardown) on
command and sends every report back as soon as it is made."""
from __future__ import annotations

import json
import os
import sys
import tempfile  # imported by pytest before the fork: the confined worker may not read it
import warnings

import pytest

from . import _runner

IN_WORKER = False          # True inside the worker (the plugin's setup hooks do nothing there)


def _send(fd: int, msg: dict) -> None:
    _runner._write_all(fd, json.dumps(msg, default=str).encode() + b"\n")


class _Lines:
    """JSON lines from a pipe, never more than MAX_REPORT buffered (the other side is untrusted)."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, bytearray()

    def pop(self) -> dict | None:
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                return None
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg

    def feed(self) -> str:
        """Read what is there: "data", "empty" (nothing yet, non-blocking) or "eof" (also when more than
        MAX_REPORT would be buffered)."""
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return "empty"
        if not chunk or len(self.buf) > _runner.MAX_REPORT:
            return "eof"
        self.buf += chunk
        return "data"


def worker_main(session, cmd_r: int, msg_w: int, parent_fds: list[int], env: dict, whole_env: dict | None) -> int:
    """The confined worker: run commands until ``finish`` or EOF (the parent is gone)."""
    global IN_WORKER
    IN_WORKER = _runner.IN_CHILD = True
    for fd in parent_fds:  # the parent's ends: EOF on cmd_r must mean the parent is gone
        os.close(fd)
    if whole_env is not None:
        os.environ.clear()
        os.environ.update(whole_env)
    os.environ.update(env)
    if "TMPDIR" in env:
        tempfile.tempdir = None
    cov = _runner._ChildCoverage()
    items = {it.nodeid: it for it in session.items}
    cmds = _Lines(cmd_r)
    try:
        _send(msg_w, {"kind": "ready"})
        while True:
            cmd = cmds.pop()
            if cmd is None:
                if cmds.feed() == "eof":  # the parent is gone
                    return 0
                continue
            if cmd.get("cmd") == "finish":
                _send(msg_w, {"kind": "finished", "error": _finish(session)})
                return 0
            item = items.get(cmd.get("nodeid"))
            if item is None:
                _send(msg_w, {"kind": "done", "error": f"unknown test {cmd.get('nodeid')!r}"})
                continue
            _run_item(item, items.get(cmd.get("next")), msg_w)
            cov.checkpoint()
    finally:
        cov.save()


def _finish(session) -> str | None:
    try:
        session._setupstate.teardown_exact(None)
    except BaseException as exc:  # noqa: BLE001 (reported, then the worker exits anyway)
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_item(item, nextitem, msg_w: int) -> None:
    config = item.config
    _send(msg_w, {"kind": "start", "nodeid": item.nodeid})
    log = _WarningLog()
    try:
        from _pytest.warnings import catch_warnings_for_item
        with catch_warnings_for_item(config, ihook=log, when="runtest", item=item):
            _protocol(item, nextitem, lambda rep: _send(msg_w, {
                "kind": "report", "data": config.hook.pytest_report_to_serializable(config=config, report=rep)}))
    except pytest.exit.Exception as exc:
        _send(msg_w, {"kind": "exit", "msg": str(exc.msg), "returncode": exc.returncode})
    except KeyboardInterrupt:
        _send(msg_w, {"kind": "interrupt"})
    finally:
        for w in log.recorded:
            _send(msg_w, {"kind": "warning", "data": _runner._warning_to_dict(w)})
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        _send(msg_w, {"kind": "done"})


class _WarningLog:
    """Stands in for ``item.ihook`` in ``catch_warnings_for_item``: keeps the warnings for the parent."""

    def __init__(self):
        self.recorded = []
        self.pytest_warning_recorded = self

    def call_historic(self, kwargs):
        self.recorded.append(kwargs["warning_message"])


def _protocol(item, nextitem, send) -> None:
    """``runtestprotocol(item, log=False)``, each report sent as soon as it is made."""
    from _pytest.runner import call_and_report, show_test_item
    _tear_down_foreign(item)
    hasrequest = hasattr(item, "_request")
    if hasrequest and not item._request:
        item._initrequest()
    try:
        rep = call_and_report(item, "setup", False)
        send(rep)
        if rep.passed:
            setup_only = item.config.getoption("setuponly", False)
            if item.config.getoption("setupshow", False):
                show_test_item(item, add_space=not setup_only)
            if not setup_only:
                send(call_and_report(item, "call", False))
        send(call_and_report(item, "teardown", False, nextitem=nextitem))
    finally:
        if hasrequest:
            item._request = False
            item.funcargs = None


def _tear_down_foreign(item) -> None:
    """The parent's guess of this worker's next item can be wrong (only under a runtime scheduler): tear down
    what the item does not share before setting it up (SetupState would refuse it)."""
    state = item.session._setupstate
    chain = item.listchain()
    if all(col in chain for col in state.stack):
        return
    try:
        state.teardown_exact(item)
    except BaseException as exc:  # noqa: BLE001 (a warning, the item still runs)
        warnings.warn(pytest.PytestWarning(f"sandlock worker: a teardown before {item.nodeid} failed: {exc!r}"))
