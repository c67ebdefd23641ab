"""The ``sandlock`` command.

Exit codes of ``sandlock run``: the command's own; 124 on timeout; 127 when the command cannot be started
(or confinement cannot be set up); 128+N when it was killed by signal N; 2 on a usage error (nothing runs).
Start-up matters (every ``sandlock run`` pays it): import only what the subcommand needs.
"""
from __future__ import annotations

import argparse
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


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with our prefix, like every usage error
        self.print_usage(sys.stderr)
        sys.stderr.write(f"sandlock: error: {message}\n")
        sys.exit(2)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pytest-sandlock")
    except Exception:  # pragma: no cover - running from a source tree
        return "0+unknown"


class _VersionAction(argparse.Action):
    """Resolve the version only when asked: importlib.metadata costs ~30 ms at start-up."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"sandlock {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sandlock", description="Lightweight process sandbox: Landlock + seccomp, no root.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser("run", help="run a command in a sandbox", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="sandlock run [flags] -- CMD [ARG...]")
    fs = r.add_argument_group("filesystem (Landlock)")
    fs.add_argument("-r", "--fs-read", action="append", metavar="PATH", help="allow reading under PATH")
    fs.add_argument("-w", "--fs-write", action="append", metavar="PATH", help="allow reading and writing under PATH")
    fs.add_argument("--fs-deny", action="append", metavar="PATH", help="deny PATH even inside an allowed tree")
    fs.add_argument("--workdir", metavar="DIR", help="copy-on-write working directory")
    fs.add_argument("--cwd", metavar="DIR", help="working directory of the command")
    fs.add_argument("--fs-isolation", choices=["none", "overlayfs", "branchfs"])
    fs.add_argument("--fs-storage", metavar="DIR", help="where copy-on-write layers live")
    fs.add_argument("--max-disk", metavar="SIZE")
    fs.add_argument("--on-exit", choices=["commit", "abort", "keep"])
    fs.add_argument("--on-error", choices=["commit", "abort", "keep"])
    fs.add_argument("--dry-run", action="store_true", help="show what files would change, then discard")
    fs.add_argument("--json", action="store_true", help="with --dry-run: print the changes as JSON on stdout")
    fs.add_argument("--chroot", metavar="DIR")
    fs.add_argument("--privileged", action="store_true", help="UID 0 in a user namespace")
    net = r.add_argument_group("network")
    net.add_argument("--net-allow-host", action="append", metavar="HOST", help="allow connecting to HOST only")
    net.add_argument("--net-bind", action="append", metavar="PORTS", help="allow TCP bind on PORTS (Landlock ABI 4)")
    net.add_argument("--net-connect", action="append", metavar="PORTS", help="allow TCP connect to PORTS")
    net.add_argument("--net-allow", action="append", choices=["icmp", "raw"], help="allow raw/ICMP sockets")
    net.add_argument("--net-deny", action="append", choices=["udp", "raw"], help="deny UDP or raw sockets")
    net.add_argument("--port-remap", action="store_true", help="virtual port space")
    ipc = r.add_argument_group("isolation")
    ipc.add_argument("--isolate-ipc", action="store_true", help="block abstract UNIX sockets to the host")
    ipc.add_argument("--isolate-signals", action="store_true", help="block signals to host processes")
    ipc.add_argument("--isolate-pids", action="store_true", help="hide host processes in /proc")
    lim = r.add_argument_group("resources")
    lim.add_argument("-m", "--max-memory", metavar="SIZE")
    lim.add_argument("-P", "--max-processes", type=int, metavar="N")
    lim.add_argument("-c", "--cpu", type=int, metavar="PCT", help="CPU share, percent of one core")
    lim.add_argument("--max-open-files", type=int, metavar="N")
    lim.add_argument("--cpu-cores", metavar="LIST", help="pin to CPUs, e.g. 0,2-3")
    lim.add_argument("--num-cpus", type=int, metavar="N")
    lim.add_argument("-t", "--timeout", type=float, metavar="SECS", help="kill the whole sandbox after SECS")
    det = r.add_argument_group("determinism")
    det.add_argument("--time-start", metavar="TIME", help="ISO 8601 or epoch seconds")
    det.add_argument("--freeze-time", action="store_true", help="the clock does not advance")
    det.add_argument("--random-seed", type=int, metavar="N")
    det.add_argument("--deterministic-dirs", action="store_true")
    det.add_argument("--normalize-mtime", action="store_true",
                     help="stat shows times stamped during the run on the sandbox clock (needs --time-start)")
    det.add_argument("--no-randomize-memory", action="store_true")
    det.add_argument("--no-huge-pages", action="store_true")
    det.add_argument("--no-coredump", action="store_true")
    det.add_argument("--hostname", metavar="NAME")
    env = r.add_argument_group("environment")
    env.add_argument("--clean-env", action="store_true", help="start from a minimal environment")
    env.add_argument("--env", action="append", metavar="K=V", help="set an environment variable")
    misc = r.add_argument_group("run")
    misc.add_argument("-p", "--profile", metavar="NAME", help="start from a saved profile")
    misc.add_argument("--status-fd", type=int, metavar="FD", help='write {"exit_code":N,"signal":S} to FD')
    misc.add_argument("-e", "--exec-shell", metavar="CMD", help="run CMD with /bin/sh -c")
    misc.add_argument("-i", "--interactive", action="store_true", help="use the terminal (the default)")
    misc.add_argument("--best-effort", action="store_true", help="apply what this kernel supports")
    misc.add_argument("-v", "--verbose", action="store_true",
                      help="report on stderr (with --port-remap: which host port serves each virtual port)")
    misc.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")

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
    from .policy import Policy
    fields = policy_fields_from_args(a)
    if a.profile:
        from .profile import profile_dict
        base = profile_dict(a.profile)
        if "env" in base and "env" in fields:
            fields["env"] = {**base["env"], **fields["env"]}
        base.update(fields)
        fields = base
    return Policy.from_dict(fields)


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
    import signal as _signal
    try:
        sb = Sandbox(policy)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    except SandlockError as exc:
        sys.stderr.write(f"sandlock: {exc}\n")
        return 127
    for what in sb.missing:
        sys.stderr.write(f"sandlock: best effort: not in force: {what}\n")
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
        name = _signal.Signals(res.signal).name if res.signal in _signal.valid_signals() else str(res.signal)
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
        parser.print_help(sys.stderr)
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
    sys.exit(main())
