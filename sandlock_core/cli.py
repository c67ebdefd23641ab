"""The ``sandlock`` command.

Exit codes of ``sandlock run``: the command's own; 124 on timeout; 127 when the command cannot be started
(or confinement cannot be set up); 128+N when it was killed by signal N; 2 on a usage error (nothing runs).
Start-up matters (every ``sandlock run`` pays it): import only what the subcommand needs.
"""
from __future__ import annotations

import os
import sys

EXAMPLES = """\
examples:
  sandlock run -r /usr -r /lib -w /tmp -- ls /tmp
  sandlock run -i -r /usr -r /lib -r /lib64 -r /bin -r /etc -w /tmp -- /bin/sh
  sandlock run --net-bind 8080 --net-connect 443 -r /usr -r /lib -r /etc -- python3 server.py
  sandlock run --isolate-ipc --isolate-signals --clean-env --env CC=gcc -r /usr -r /lib -w /tmp -- make
  sandlock run -p build -- make -j4
  sandlock check
  sandlock profile list
"""

# flag dest -> Policy field, for flags that map one to one
_LIST_FIELDS = {"fs_read": "fs_readable", "fs_write": "fs_writable", "fs_deny": "fs_denied",
                "net_allow_host": "net_allow_hosts", "net_bind": "net_bind", "net_connect": "net_connect"}
_VALUE_FIELDS = {"max_memory": "max_memory", "max_processes": "max_processes", "cpu": "max_cpu",
                 "max_open_files": "max_open_files", "cpu_cores": "cpu_cores", "num_cpus": "num_cpus",
                 "hostname": "hostname", "time_start": "time_start", "random_seed": "random_seed",
                 "cwd": "cwd", "workdir": "workdir", "fs_storage": "fs_storage", "max_disk": "max_disk",
                 "fs_isolation": "fs_isolation", "on_exit": "on_exit", "on_error": "on_error",
                 "chroot": "chroot"}
_BOOL_FIELDS = {"isolate_ipc": "isolate_ipc", "isolate_signals": "isolate_signals", "isolate_pids": "isolate_pids",
                "clean_env": "clean_env", "no_coredump": "no_coredump",
                "no_randomize_memory": "no_randomize_memory", "no_huge_pages": "no_huge_pages",
                "deterministic_dirs": "deterministic_dirs", "normalize_mtime": "normalize_mtime",
                "port_remap": "port_remap",
                "freeze_time": "time_freeze", "best_effort": "best_effort", "privileged": "privileged"}

# Every flag of `sandlock run`, once: argparse builds --help and its errors from this table, and
# _fast_run_args parses the common spellings by itself (argparse costs ~9 ms of every start: re, gettext).
# (group, option strings, kind, argparse keywords); kinds: flag (store_true), list (append), str, int, float.
RUN_FLAGS = (
    ("filesystem (Landlock)", ("-r", "--fs-read"), "list", dict(metavar="PATH", help="allow reading under PATH")),
    ("filesystem (Landlock)", ("-w", "--fs-write"), "list",
     dict(metavar="PATH", help="allow reading and writing under PATH")),
    ("filesystem (Landlock)", ("--fs-deny",), "list",
     dict(metavar="PATH", help="deny PATH even inside an allowed tree")),
    ("filesystem (Landlock)", ("--workdir",), "str", dict(metavar="DIR", help="copy-on-write working directory")),
    ("filesystem (Landlock)", ("--cwd",), "str", dict(metavar="DIR", help="working directory of the command")),
    ("filesystem (Landlock)", ("--fs-isolation",), "str", dict(choices=["none", "overlayfs", "branchfs"])),
    ("filesystem (Landlock)", ("--fs-storage",), "str", dict(metavar="DIR", help="where copy-on-write layers live")),
    ("filesystem (Landlock)", ("--max-disk",), "str", dict(metavar="SIZE")),
    ("filesystem (Landlock)", ("--on-exit",), "str", dict(choices=["commit", "abort", "keep"])),
    ("filesystem (Landlock)", ("--on-error",), "str", dict(choices=["commit", "abort", "keep"])),
    ("filesystem (Landlock)", ("--dry-run",), "flag", dict(help="show what files would change, then discard")),
    ("filesystem (Landlock)", ("--json",), "flag", dict(help="with --dry-run: print the changes as JSON on stdout")),
    ("filesystem (Landlock)", ("--chroot",), "str", dict(metavar="DIR")),
    ("filesystem (Landlock)", ("--privileged",), "flag", dict(help="UID 0 in a user namespace")),
    ("network", ("--net-allow-host",), "list", dict(metavar="HOST", help="allow connecting to HOST only")),
    ("network", ("--net-bind",), "list", dict(metavar="PORTS", help="allow TCP bind on PORTS (Landlock ABI 4)")),
    ("network", ("--net-connect",), "list", dict(metavar="PORTS", help="allow TCP connect to PORTS")),
    ("network", ("--net-allow",), "list", dict(choices=["icmp", "raw"], help="allow raw/ICMP sockets")),
    ("network", ("--net-deny",), "list", dict(choices=["udp", "raw"], help="deny UDP or raw sockets")),
    ("network", ("--port-remap",), "flag", dict(help="virtual port space")),
    ("isolation", ("--isolate-ipc",), "flag", dict(help="block abstract UNIX sockets to the host")),
    ("isolation", ("--isolate-signals",), "flag", dict(help="block signals to host processes")),
    ("isolation", ("--isolate-pids",), "flag", dict(help="hide host processes in /proc")),
    ("resources", ("-m", "--max-memory"), "str", dict(metavar="SIZE")),
    ("resources", ("-P", "--max-processes"), "int", dict(metavar="N")),
    ("resources", ("-c", "--cpu"), "int", dict(metavar="PCT", help="CPU share, percent of one core")),
    ("resources", ("--max-open-files",), "int", dict(metavar="N")),
    ("resources", ("--cpu-cores",), "str", dict(metavar="LIST", help="pin to CPUs, e.g. 0,2-3")),
    ("resources", ("--num-cpus",), "int", dict(metavar="N")),
    ("resources", ("-t", "--timeout"), "float", dict(metavar="SECS", help="kill the whole sandbox after SECS")),
    ("determinism", ("--time-start",), "str", dict(metavar="TIME", help="ISO 8601 or epoch seconds")),
    ("determinism", ("--freeze-time",), "flag", dict(help="the clock does not advance")),
    ("determinism", ("--random-seed",), "int", dict(metavar="N")),
    ("determinism", ("--deterministic-dirs",), "flag", dict()),
    ("determinism", ("--normalize-mtime",), "flag",
     dict(help="stat shows times stamped during the run on the sandbox clock (needs --time-start)")),
    ("determinism", ("--no-randomize-memory",), "flag", dict()),
    ("determinism", ("--no-huge-pages",), "flag", dict()),
    ("determinism", ("--no-coredump",), "flag", dict()),
    ("determinism", ("--hostname",), "str", dict(metavar="NAME")),
    ("environment", ("--clean-env",), "flag", dict(help="start from a minimal environment")),
    ("environment", ("--env",), "list", dict(metavar="K=V", help="set an environment variable")),
    ("run", ("-p", "--profile"), "str", dict(metavar="NAME", help="start from a saved profile")),
    ("run", ("--status-fd",), "int", dict(metavar="FD", help='write {"exit_code":N,"signal":S} to FD')),
    ("run", ("-e", "--exec-shell"), "str", dict(metavar="CMD", help="run CMD with /bin/sh -c")),
    ("run", ("-i", "--interactive"), "flag", dict(help="use the terminal (the default)")),
    ("run", ("--best-effort",), "flag", dict(help="apply what this kernel supports")),
    ("run", ("-v", "--verbose"), "flag",
     dict(help="report on stderr (with --port-remap: which host port serves each virtual port)")),
)
_CONVERT = {"str": str, "list": str, "int": int, "float": float}


def _dest(options: tuple) -> str:
    return options[-1].lstrip("-").replace("-", "_")


_BY_OPTION = {opt: (_dest(opts), kind, kw.get("choices")) for _, opts, kind, kw in RUN_FLAGS for opt in opts}


class RunArgs:
    """The parsed flags of `sandlock run` (argparse's Namespace has the same attributes)."""

    def __init__(self):
        for _, opts, kind, _ in RUN_FLAGS:
            setattr(self, _dest(opts), False if kind == "flag" else None)
        self.command = "run"
        self.version = None
        self.cmd: list = []


def _fast_run_args(argv: list):
    """``RunArgs`` for ``run [flags] [--] CMD...`` in the spellings argparse gives the same meaning to
    (``-r PATH``, ``--fs-read PATH``, ``--fs-read=PATH``, then ``--`` or the first non-flag); None for
    anything else (--help, an unknown or abbreviated flag, a bad value, a value that starts with "-"), which
    then goes through argparse for its usual result or error."""
    if not argv or argv[0] != "run":
        return None
    a = RunArgs()
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--":
            i += 1
            break
        if not token.startswith("-") or token == "-":
            break
        option, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        spec = _BY_OPTION.get(option)
        if spec is None:
            return None
        dest, kind, choices = spec
        if kind == "flag":
            if eq:
                return None
            setattr(a, dest, True)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            if value.startswith("-"):
                return None
            i += 1
        i += 1
        try:
            value = _CONVERT[kind](value)
        except ValueError:
            return None
        if choices is not None and value not in choices:
            return None
        if kind == "list":
            setattr(a, dest, (getattr(a, dest) or []) + [value])
        else:
            setattr(a, dest, value)
    a.cmd = argv[i:]
    if a.cmd[:1] == ["--"]:
        return None  # "-- -- CMD": argparse's rules for a second "--" are subtle; let it decide
    return a


class UsageError(Exception):
    pass


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pytest-sandlock")
    except Exception:  # pragma: no cover - running from a source tree
        return "0+unknown"


def build_parser():
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # exit 2 with our prefix, like every usage error
            self.print_usage(sys.stderr)
            sys.stderr.write(f"sandlock: error: {message}\n")
            sys.exit(2)

    class _VersionAction(argparse.Action):
        """Resolve the version only when asked: importlib.metadata costs ~30 ms at start-up."""

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"sandlock {_version()}")
            parser.exit()

    p = _Parser(prog="sandlock", description="Lightweight process sandbox: Landlock + seccomp, no root.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", help="run a command in a sandbox", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="sandlock run [flags] -- CMD [ARG...]")
    groups: dict = {}
    for title, opts, kind, kw in RUN_FLAGS:
        group = groups.get(title) or groups.setdefault(title, r.add_argument_group(title))
        if kind == "flag":
            group.add_argument(*opts, action="store_true", **kw)
        else:
            group.add_argument(*opts, action="append" if kind == "list" else "store",
                               type=_CONVERT[kind] if kind in ("int", "float") else None, **kw)
    groups["run"].add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")

    from .learn import add_parser as _learn_parser
    _learn_parser(sub)
    sub.add_parser("check", help="show what this kernel supports")
    pr = sub.add_parser("profile", help="manage saved profiles")
    psub = pr.add_subparsers(dest="profile_command", metavar="ACTION", parser_class=_Parser)
    psub.add_parser("list", help="list saved profiles")
    for name in ("show", "delete"):
        sp = psub.add_parser(name, help=f"{name} a profile")
        sp.add_argument("name")
    return p


def policy_fields_from_args(a) -> dict:
    """Only the flags actually given, as Policy field values (a profile supplies the rest)."""
    fields: dict = {}
    for dest, field in _LIST_FIELDS.items():
        vals = getattr(a, dest)
        if vals:
            fields[field] = list(vals)
    for dest, field in _VALUE_FIELDS.items():
        val = getattr(a, dest)
        if val is not None:
            fields[field] = val
    for dest, field in _BOOL_FIELDS.items():
        if getattr(a, dest):
            fields[field] = True
    if a.env:
        env = {}
        for item in a.env:
            if "=" not in item or item.startswith("="):
                raise UsageError(f"--env: {item!r} is not KEY=VALUE")
            k, v = item.split("=", 1)
            env[k] = v
        fields["env"] = env
    for proto in a.net_allow or ():
        fields["no_raw_sockets"] = False
    for proto in a.net_deny or ():
        if proto == "udp":
            fields["no_udp"] = True
        else:
            fields["no_raw_sockets"] = True
    return fields


def build_policy(a):
    """The run's policy: a ``LeanPolicy`` (same validators and messages as ``Policy``, no dataclasses import)
    unless a profile is laid under the flags."""
    fields = policy_fields_from_args(a)
    if not a.profile:
        from .policy_spec import LeanPolicy
        return LeanPolicy.from_dict(fields)
    from .policy import Policy
    from .profile import profile_dict
    base = profile_dict(a.profile)
    if "env" in base and "env" in fields:
        fields["env"] = {**base["env"], **fields["env"]}
    base.update(fields)
    return Policy.from_dict(base)


def cmd_run(a) -> int:
    from .errors import PolicyError, SandlockError
    cmd = list(a.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if a.exec_shell is not None:
        if cmd:
            raise UsageError("give either -e CMD or -- CMD, not both")
        cmd = ["/bin/sh", "-c", a.exec_shell]
    if not cmd:
        raise UsageError("run: no command given (sandlock run [flags] -- CMD)")
    if a.timeout is not None and a.timeout <= 0:
        raise UsageError(f"--timeout: {a.timeout} is not a positive number of seconds")
    if a.status_fd is not None:
        try:
            os.fstat(a.status_fd)
        except OSError:
            raise UsageError(f"--status-fd: {a.status_fd} is not an open file descriptor") from None
    if a.dry_run and not a.workdir:
        raise UsageError("--dry-run requires --workdir")
    if a.json and not a.dry_run:
        raise UsageError("--json requires --dry-run")
    try:
        policy = build_policy(a)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    from .sandbox import ExitReason, Sandbox
    import _signal  # not signal: its enums cost start-up (names are looked up only on the error path)
    try:
        sb = Sandbox(policy)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    except SandlockError as exc:
        sys.stderr.write(f"sandlock: {exc}\n")
        return 127
    for what in sb.missing:
        sys.stderr.write(f"sandlock: best effort: not in force: {what}\n")
    _resume_gc()
    # Like system(3): while the command runs, terminal signals are its business.
    old = {s: _signal.signal(s, _signal.SIG_IGN) for s in (_signal.SIGINT, _signal.SIGQUIT)}
    try:
        with sb:
            watch = _watch_ports(sb) if a.verbose and policy.port_remap else None
            try:
                if a.dry_run:
                    from .cow import dry_run_call
                    res, changes = dry_run_call(lambda: sb.run_foreground(cmd, timeout=a.timeout))
                    _print_changes(changes, a.json, res.exit_code)
                else:
                    res = sb.run_foreground(cmd, timeout=a.timeout)
            finally:
                if watch is not None:
                    watch()
    finally:
        for s, h in old.items():
            _signal.signal(s, h)
    if res.reason is ExitReason.TIMEOUT:
        sys.stderr.write(f"sandlock: timeout after {a.timeout:g}s\n")
        code = 124
    elif res.reason is ExitReason.SETUP_FAILED:
        if res.error and not res.error.startswith("sandlock: "):
            sys.stderr.write(f"sandlock: {res.error}\n")
        code = 127
    elif res.signal:
        code = 128 + res.signal
    else:
        code = res.exit_code
    if res.reason is ExitReason.MEMORY:
        sys.stderr.write(f"sandlock: {res.error}\n")
    elif res.reason in (ExitReason.SIGNALED, ExitReason.KILLED) and res.signal:
        import signal
        name = signal.Signals(res.signal).name if res.signal in signal.valid_signals() else str(res.signal)
        sys.stderr.write(f"sandlock: ended by signal {res.signal} ({name})\n")
    if a.status_fd is not None:
        import json
        status = {"exit_code": res.exit_code if not res.signal else -1}
        if res.signal:
            status["signal"] = res.signal
        os.write(a.status_fd, (json.dumps(status, separators=(",", ":")) + "\n").encode())
    return code


def _print_changes(changes, as_json: bool, exit_code: int) -> None:
    if as_json:
        import json
        sys.stdout.write(json.dumps({"exit_code": exit_code, "changes": [{"kind": k, "path": p}
                                                                          for k, p in changes]}) + "\n")
        sys.stdout.flush()
        return
    if not changes:
        sys.stderr.write("sandlock: dry-run: no filesystem changes\n")
    else:
        sys.stderr.write("sandlock: dry-run: filesystem changes:\n")
        for k, p in changes:
            sys.stderr.write(f"{k}  {p}\n")


def _watch_ports(sb):
    """Print each new virtual->real port mapping on stderr while the command runs; returns a stopper."""
    import threading
    stop = threading.Event()
    seen: set = set()

    def report():
        for proto in ("tcp", "udp"):
            for virt, real in sorted(sb.ports(proto).items()):
                if (proto, virt) not in seen:
                    seen.add((proto, virt))
                    sys.stderr.write(f"sandlock: port {virt}/{proto} -> {real}\n")
                    sys.stderr.flush()

    def loop():
        while not stop.wait(0.02):
            report()
        report()

    t = threading.Thread(target=loop, name="sandlock-ports", daemon=True)
    t.start()

    def stopper():
        stop.set()
        t.join(1)
    return stopper


def cmd_check(a) -> int:
    from .check import report
    sys.stdout.write(report())
    return 0


def cmd_profile(a) -> int:
    from . import profile as prof
    if a.profile_command == "list":
        for name in prof.list_profiles():
            print(name)
        return 0
    if a.profile_command == "show":
        sys.stdout.write(prof.profile_path(a.name).read_text() if prof.profile_path(a.name).exists()
                         else prof.dumps_toml(prof.profile_dict(a.name)))
        return 0
    if a.profile_command == "delete":
        prof.delete_profile(a.name)
        print(f"deleted profile {a.name!r}")
        return 0
    raise UsageError("profile: give an action: list, show NAME or delete NAME")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sandlock`` script: returns the exit code (the script passes it to sys.exit).

    Run as the script itself (``argv`` None, ``sys.argv[0]`` named sandlock), it leaves through
    ``exit_without_teardown`` once the command is over."""
    script = argv is None and os.path.basename(sys.argv[0]) == "sandlock"
    if script:
        _pause_gc()
    code = _dispatch(sys.argv[1:] if argv is None else list(argv))
    if script:
        exit_without_teardown(code)
    return code


_gc_paused = False


def _pause_gc() -> None:
    """No cyclic garbage collection while starting: imports allocate much and free little, so collections
    then cost ~1 ms and reclaim nothing. ``_resume_gc`` turns it back on before the command runs (a
    supervisor serving a long run must collect)."""
    global _gc_paused
    import gc
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _resume_gc() -> None:
    global _gc_paused
    if _gc_paused:
        import gc
        gc.enable()
        _gc_paused = False


def exit_without_teardown(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: freeing every imported module costs ~4 ms, a sixth of
    what ``sandlock run`` may add to a command. What exiting must still do is done here: atexit handlers
    (spawn's reaper), flushing stdout/stderr. Falls back to a normal exit when that cannot be sure (another
    thread still runs, or a flush fails and Python's usual report and status should follow)."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    import atexit
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:
        return
    os._exit(code)


def _dispatch(argv: list[str]) -> int:
    args = _fast_run_args(argv)
    parser = None
    if args is None:  # anything but the common `run` spellings: argparse, with its --help and its errors
        parser = build_parser()
        args = parser.parse_args(argv)
    if args.command != "run":
        _resume_gc()  # only `run`'s start-up is worth it; learn supervises a whole command
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "learn":
            from .learn import main as cmd_learn
            return cmd_learn(args)
        if args.command == "profile":
            return cmd_profile(args)
        (parser or build_parser()).print_help(sys.stderr)
        return 2
    except UsageError as exc:
        sys.stderr.write(f"sandlock: error: {exc}\n")
        return 2
    except Exception as exc:
        from .errors import PolicyError
        if isinstance(exc, PolicyError):
            sys.stderr.write(f"sandlock: error: {exc}\n")
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    _pause_gc()
    exit_code = main()
    exit_without_teardown(exit_code)
    sys.exit(exit_code)
