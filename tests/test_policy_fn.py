"""Dynamic policy (policy_fn): held syscalls, verdicts, context restrictions, time limit."""
from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from sandlock_core import Policy, Sandbox
from sandlock_core.policy_fn import verdict

SYS = ["/usr", "/lib", "/lib64", "/bin", "/etc"]


def _policy(tmp_path, **kw):
    return Policy(fs_readable=[*SYS, str(tmp_path)], fs_writable=["/dev/null"], **kw)


def test_verdicts():
    assert verdict(0) == verdict(False) == verdict(None) == (True, 0, False)
    assert verdict(True) == verdict(-1) == (False, errno.EPERM, False)
    assert verdict(errno.EACCES) == (False, errno.EACCES, False)
    assert verdict("audit") == verdict(-2) == (True, 0, True)
    for bad in ("allow", -7, 1.5, object(), [0]):
        assert verdict(bad) == (False, errno.EPERM, False)  # fail closed


def test_blocks_download_tool_while_ls_runs(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("ls /usr >/dev/null && echo ls-ok\ncurl --version >/dev/null 2>&1; echo curl=$?\n")

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv_contains("curl"):
            return True
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["sh", str(script)], timeout=30)
    assert b"ls-ok\n" in r.stdout
    assert b"curl=126" in r.stdout or b"curl=127" in r.stdout
    assert any(d.syscall == "execve" and "curl" in d.detail for d in r.denials)


def test_file_errno_and_audit(tmp_path):
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "open.txt").write_text("o")
    seen = []

    def on_event(event, ctx):
        if event.category == "file" and event.path_contains("/secret"):
            return errno.EACCES
        if event.category == "file" and event.path_contains("open.txt"):
            seen.append(event.path)
            return "audit"
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(
        ["sh", "-c", f"cat {tmp_path}/open.txt; cat {tmp_path}/secret.txt; echo rc=$?"], timeout=30)
    assert r.stdout.startswith(b"o") and b"rc=1" in r.stdout
    assert b"Permission denied" in r.stderr
    assert any(e.path == str(tmp_path / "open.txt") for e in r.audit)
    assert seen == [str(tmp_path / "open.txt")]


def test_restrict_network_after_first_exec(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    state = {"execs": 0}

    def on_event(event, ctx):
        if event.syscall == "execve":
            state["execs"] += 1
            if state["execs"] == 1:
                ctx.restrict_network([])
        return 0

    code = f"import socket; s=socket.socket(); s.connect(('127.0.0.1', {port})); print('connected')"
    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["python3", "-c", code], timeout=30)
    srv.close()
    assert b"connected" not in r.stdout
    assert b"PermissionError" in r.stderr
    # without the restriction the same connect works
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    r = Sandbox(_policy(tmp_path), policy_fn=lambda e, c: 0).run(["python3", "-c", code], timeout=30)
    srv.close()
    assert r.stdout == b"connected\n"


def test_context_methods(tmp_path):
    (tmp_path / "f").write_text("x")

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv and event.argv[0] == "sh":
            ctx.deny_path(str(tmp_path / "f"))
            ctx.restrict_max_memory(1 << 30)
            ctx.restrict_max_processes(10)
            with pytest.raises(PermissionError):
                ctx.restrict_network(["127.0.0.1"]) or ctx.grant_network(["10.0.0.1"])
        return 0

    sb = Sandbox(_policy(tmp_path), policy_fn=on_event)
    r = sb.run(["sh", "-c", f"cat {tmp_path}/f; echo rc=$?"], timeout=30)
    assert b"rc=1" in r.stdout and b"Permission denied" in r.stderr
    assert sb._sup.state["max_memory"] == 1 << 30 and sb._sup.state["max_processes"] == 10


def test_raising_callback_denies(tmp_path):
    def on_event(event, ctx):
        if event.syscall == "execve":
            raise RuntimeError("bug in callback")
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["true"], timeout=30)
    assert not r.success and r.exit_code == 127


def test_slow_callback_denies_after_limit_others_keep_running(tmp_path):
    """A callback stuck for 10 s on one process's execve is denied at the limit (1 s here); meanwhile another
    process of the same sandbox goes on opening files and exec'ing."""
    script = tmp_path / "s.sh"
    script.write_text(
        "slowcmd_marker() { :; }\n"
        "( exec /bin/echo SLOW ) &\n"
        "i=0; while [ $i -lt 20 ]; do cat /etc/hostname >/dev/null; i=$((i+1)); done; echo fast-done\n"
        "wait; echo waited\n")
    t_fast = {}

    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv and "SLOW" in event.argv:
            time.sleep(10)
        if event.syscall == "execve" and event.argv and event.argv[0] == "cat":
            t_fast.setdefault("first", time.monotonic())
        return 0

    start = time.monotonic()
    r = Sandbox(_policy(tmp_path), policy_fn=on_event, policy_fn_timeout=1.0).run(["sh", str(script)], timeout=30)
    took = time.monotonic() - start
    assert b"fast-done" in r.stdout and b"SLOW" not in r.stdout
    assert took < 8
    assert t_fast["first"] - start < 1.0  # the fast process was not held behind the slow callback
    assert any("did not answer" in d.hint for d in r.denials)


def test_readme_policy_fn_shape(tmp_path):
    """The README callback (adapted: no net_allow_hosts) runs; untrusted exec triggers restrictions."""
    def on_event(event, ctx):
        if event.syscall == "execve" and event.argv_contains("curl"):
            return True
        if event.category == "file" and event.path_contains("/secret"):
            return errno.EACCES
        if event.syscall == "execve" and event.path_contains("untrusted"):
            ctx.restrict_network([])
            ctx.deny_path("/etc/shadow")
        if event.category == "file":
            return "audit"
        return 0

    r = Sandbox(_policy(tmp_path), policy_fn=on_event).run(["python3", "-c", "print('hi')"], timeout=30)
    assert r.stdout == b"hi\n" and len(r.audit) > 0


def test_on_behalf_opens_see_the_childs_proc_self():
    """Opens under policy_fn are done by the supervisor: /proc/self must still name the child."""
    import os as _os
    ro = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc", "/proc") if _os.path.exists(p)]
    code = ("import os\n"
            "pid = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Pid:')][0]\n"
            "print(pid == str(os.getpid()))\n")
    res = Sandbox(Policy(fs_readable=ro), policy_fn=lambda e, c: 0).run(["/usr/bin/python3", "-I", "-S", "-c", code])
    assert res.stdout == b"True\n", res
