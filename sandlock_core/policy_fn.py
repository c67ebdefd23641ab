"""Dynamic policy: ``Sandbox(policy, policy_fn=on_event)``.

Held syscalls: ``execve``, ``execveat``, ``connect``, ``sendto``, ``bind``, ``openat`` (and the legacy ``open``,
so a raw ``open`` cannot skip the callback). The mechanism is installed after every built-in mechanism and
wraps their chains for these syscalls: the built-in enforcers decide first; an event they denied is shown with
``denied=True`` (the callback cannot overrule it); otherwise the syscall is held while the callback runs on a
worker thread (never on the supervisor loop) and the supervisor keeps serving every other process. A callback
that raises, returns an unknown verdict, or exceeds ``policy_fn_timeout`` (default 5 s) denies.

Verdicts: ``0``/``False``/``None`` allow; ``True``/``-1`` deny with EPERM; a positive int denies with that
errno; ``"audit"``/``-2`` allows and flags (``result.audit``). Anything else fails closed (EPERM).

No swap between check and use:
* ``openat``/``open`` are *executed on behalf* of the child after the verdict, with the path string the
  callback saw, on a thread carrying the sandbox's Landlock domain (``fsdeny.Opener``); the resulting fd is
  injected. Opening ``/proc/<pid>/mem`` this way is refused (it could rewrite another sandboxed process's
  memory).
* ``execve``/``execveat`` are *frozen*: the event is only built when nothing can change the caller's memory
  until the kernel reads it: the caller is single-threaded and every other process sharing its address space
  (a vfork parent) is single-threaded and blocked in uninterruptible wait. ptrace and process_vm_writev stay
  denied by the default blocklist, and /proc/<pid>/mem is refused above. Otherwise the execve is denied
  (EPERM) and recorded. If the policy re-allows ptrace/process_vm_writev (custom ``deny_syscalls``) the
  freeze does not hold: execve events are then denied too.
* Network events: ``host``/``port`` come from the sockaddr in child memory and the syscall then continues;
  a multi-threaded process could swap the address after the callback (residual risk; Landlock's port rules
  and the network mechanism stay the boundary).

Context (``ctx``): ``restrict_network(ips)``, ``grant_network(ips)`` (only while nothing was restricted, never
beyond the initial policy), ``restrict_pid_network(pid, ips)``, ``deny_path(p)``, ``allow_path(p)`` (lifts only
a path denied through ``deny_path``), ``restrict_max_memory(b)``, ``restrict_max_processes(n)``. Restrictions
are permanent. The memory/process limits are stored in ``sup.state["max_memory"]`` / ``["max_processes"]``
(the smaller value wins) for the resources mechanism to enforce.
"""
from __future__ import annotations

import errno
import heapq
import ipaddress
import os
import queue
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass

from .notif import CONTINUE, DEFERRED, Errno, InjectFd, s32

AT_FDCWD = -100
AUDIT = "audit"
_MEM_RE = re.compile(r"^/proc/\d+/(task/\d+/)?mem$")
HELD = ("execve", "execveat", "connect", "sendto", "bind", "openat", "open")
CATEGORY = {"execve": "process", "execveat": "process", "connect": "network", "sendto": "network",
            "bind": "network", "openat": "file", "open": "file"}
WORKERS = 8


@dataclass
class SyscallEvent:
    syscall: str
    category: str
    pid: int
    parent_pid: int = 0
    path: str | None = None
    host: str | None = None
    port: int | None = None
    argv: list | None = None
    denied: bool = False
    flags: int = 0

    def argv_contains(self, s: str) -> bool:
        return bool(self.argv) and any(s in a for a in self.argv)

    def path_contains(self, s: str) -> bool:
        return self.path is not None and s in self.path


class PolicyContext:
    """What a callback may change. Every method only tightens, except grant_network/allow_path (see module)."""

    def __init__(self, state: dict, lock: threading.Lock):
        self._s = state
        self._lock = lock

    def restrict_network(self, ips) -> None:
        ips = {str(ipaddress.ip_address(i)) for i in ips}
        with self._lock:
            cur = self._s.get("pf_net")
            self._s["pf_net"] = ips if cur is None else cur & ips
            self._s["pf_net_restricted"] = True

    def grant_network(self, ips) -> None:
        with self._lock:
            if self._s.get("pf_net_restricted"):
                raise PermissionError("grant_network: the network was restricted; restrictions are permanent")
            # Nothing restricted yet: the initial policy already allows whatever it allows; never more.

    def restrict_pid_network(self, pid: int, ips) -> None:
        ips = {str(ipaddress.ip_address(i)) for i in ips}
        with self._lock:
            per = self._s.setdefault("pf_pid_net", {})
            per[pid] = ips if pid not in per else per[pid] & ips

    def deny_path(self, path: str) -> None:
        with self._lock:
            self._s.setdefault("pf_deny", set()).add(os.path.normpath(os.path.abspath(path)))

    def allow_path(self, path: str) -> None:
        with self._lock:
            self._s.setdefault("pf_deny", set()).discard(os.path.normpath(os.path.abspath(path)))

    def restrict_max_memory(self, nbytes: int) -> None:
        with self._lock:
            cur = self._s.get("max_memory")
            self._s["max_memory"] = int(nbytes) if cur is None else min(cur, int(nbytes))

    def restrict_max_processes(self, n: int) -> None:
        with self._lock:
            cur = self._s.get("max_processes")
            self._s["max_processes"] = int(n) if cur is None else min(cur, int(n))


def verdict(v):
    """(allow, errno, audit) for a callback's return value; unknown values fail closed."""
    if v is None or v is False:
        return True, 0, False
    if v is True:
        return False, errno.EPERM, False
    if isinstance(v, str):
        return (True, 0, True) if v == AUDIT else (False, errno.EPERM, False)
    if isinstance(v, int):
        if v == 0:
            return True, 0, False
        if v == -1:
            return False, errno.EPERM, False
        if v == -2:
            return True, 0, True
        if v > 0:
            return False, v, False
    return False, errno.EPERM, False


def _parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _status(pid: int) -> tuple[int, str]:
    threads, state = 0, "?"
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Threads:"):
                threads = int(line.split()[1])
            elif line.startswith(b"State:"):
                state = line.split()[1].decode()
    return threads, state


class Engine:
    """Per-sandbox: the callback pool, the deadline monitor, and the wrapped handlers."""

    def __init__(self, fn, timeout: float, ruleset_fd: int, freeze_ok: bool):
        self.fn = fn
        self.timeout = timeout
        self.ruleset_fd = ruleset_fd
        self.freeze_ok = freeze_ok
        self.writable_roots: tuple | None = None  # None: no fs rules, every file may be writable

    def _private(self, pid: int, ranges) -> bool:
        """Every (addr, length) lies in memory no other process can change while the caller is frozen: a
        private anonymous mapping, the caller's own executable (the kernel refuses writes to it, ETXTBSY),
        or a private file mapping of a file the sandbox cannot write. A MAP_SHARED region (or a file the
        sandbox can write) could be rewritten by a sibling between the callback and the kernel's read."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/maps") as f:
                maps = []
                for line in f:
                    parts = line.split(None, 5)
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    maps.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
        except OSError:
            return False
        for addr, length in ranges:
            end = addr + max(length, 1)
            covered = addr
            for lo, hi, perms, path in maps:
                if lo <= covered < hi:
                    if perms[3] != "p":
                        return False
                    if path.startswith("/") and path != exe:
                        roots = self.writable_roots
                        if roots is None or any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
                            return False
                    covered = hi
                    if covered >= end:
                        break
            if covered < end:
                return False
        return True

    # ---- per run ----
    def setup(self, sup) -> None:
        st = sup.state
        st["pf_lock"] = threading.Lock()
        st["pf_ctx"] = PolicyContext(st, st["pf_lock"])
        st["pf_audit"] = []
        st["pf_reaper"] = _parent_pid(sup.root_pid)
        st["pf_jobs"] = jobs = queue.Queue()
        st["pf_deadlines"] = []
        st["pf_cv"] = threading.Condition()
        st["pf_stop"] = False
        threads = [threading.Thread(target=self._worker, args=(sup,), name="sandlock-policy-fn", daemon=True)
                   for _ in range(WORKERS)]
        threads.append(threading.Thread(target=self._monitor, args=(sup,), name="sandlock-policy-fn-timer",
                                        daemon=True))
        for t in threads:
            t.start()
        st["pf_opener"] = None

        def close():
            st["pf_stop"] = True
            for _ in range(WORKERS):
                jobs.put(None)
            with st["pf_cv"]:
                st["pf_cv"].notify_all()
            if st.get("pf_opener") is not None:
                st["pf_opener"].close()
        sup.on_close(close)

    def finish(self, sup, result) -> None:
        if sup is not None:
            result.audit = list(sup.state.get("pf_audit", ()))
        else:
            result.audit = []

    # ---- the answer: exactly once, by the worker or by the deadline ----
    class Held:
        __slots__ = ("n_id", "pid", "nr", "event", "action", "answered", "lock", "finalize")

    def _answer(self, sup, held, action) -> bool:
        with held.lock:
            if held.answered:
                return False
            held.answered = True
        if sup.listener >= 0:
            sup.respond(held.n_id, action, held.pid)
        return True

    def _worker(self, sup) -> None:
        st = sup.state
        while True:
            job = st["pf_jobs"].get()
            if job is None:
                return
            held, fire_and_forget = job
            try:
                v = self.fn(held.event, st["pf_ctx"])
                allow, err, audit = verdict(v)
            except Exception as exc:
                sup.errors.append(f"policy_fn raised {exc!r}")
                allow, err, audit = False, errno.EPERM, False
            if fire_and_forget:
                if audit:
                    st["pf_audit"].append(held.event)
                continue
            if held.answered:
                continue  # the deadline answered already
            if audit:
                st["pf_audit"].append(held.event)
            if not allow:
                action = Errno(err)
                sup.record(held.event.syscall, held.pid, err, held.event.path or held.event.host or "",
                           "denied by policy_fn")
            else:
                try:
                    action = held.finalize()
                except OSError as exc:
                    action = Errno(exc.errno or errno.EACCES)
                except Exception as exc:
                    sup.errors.append(f"policy_fn: on-behalf operation failed: {exc!r}")
                    action = Errno(errno.EACCES)
            if not self._answer(sup, held, action) and type(action) is InjectFd:
                os.close(action.fd)

    def _monitor(self, sup) -> None:
        st = sup.state
        cv, heap = st["pf_cv"], st["pf_deadlines"]
        while not st["pf_stop"]:
            with cv:
                now = time.monotonic()
                wait = heap[0][0] - now if heap else None
                if wait is None or wait > 0:
                    cv.wait(wait)
                    continue
                _, _, held = heapq.heappop(heap)
            if not held.answered:
                err = errno.EACCES if held.event.category == "file" else errno.EPERM
                if self._answer(sup, held, Errno(err)):
                    sup.record(held.event.syscall, held.pid, err, held.event.path or "",
                               f"policy_fn did not answer within {self.timeout} s")
                    if held.action is not None and type(held.action) is InjectFd:
                        os.close(held.action.fd)

    def _hold(self, sup, n, event, action, finalize):
        held = Engine.Held()
        held.n_id, held.pid, held.nr = n.id, n.pid, n.data.nr
        held.event, held.action, held.answered, held.lock = event, action, False, threading.Lock()
        held.finalize = finalize
        st = sup.state
        with st["pf_cv"]:
            heapq.heappush(st["pf_deadlines"], (time.monotonic() + self.timeout, id(held), held))
            st["pf_cv"].notify()
        st["pf_jobs"].put((held, False))
        return DEFERRED

    def _observe(self, sup, event) -> None:
        held = Engine.Held()
        held.event, held.answered = event, True
        sup.state["pf_jobs"].put((held, True))

    # ---- the wrapped chain ----
    def wrap(self, name: str, chain: list):
        chain = tuple(chain)
        category = CATEGORY[name]

        def handler(sup, n):
            action = None
            for h in chain:
                action = h(sup, n)
                if action is not None:
                    break
            if action is DEFERRED:
                return action  # a built-in mechanism answers later; it keeps its decision
            event = SyscallEvent(name, category, n.pid, _parent_pid(n.pid))
            if type(action) is Errno:
                event.denied = True
                self._fill_light(sup, n, name, event)
                self._observe(sup, event)
                return action
            if category == "file":
                return self._file(sup, n, name, event, action)
            if category == "process":
                return self._exec(sup, n, name, event, action)
            return self._net(sup, n, name, event, action)
        return handler

    def _fill_light(self, sup, n, name, event) -> None:
        try:
            if name in ("openat", "execveat"):
                event.path = sup.resolve(n, s32(n.data.args[0]), sup.read_cstr(n, n.data.args[1]))
            elif name in ("open", "execve"):
                event.path = sup.resolve(n, AT_FDCWD, sup.read_cstr(n, n.data.args[0]))
        except OSError:
            pass

    # files: executed on behalf after the verdict
    def _file(self, sup, n, name, event, action):
        if name == "openat":
            dirfd, addr, flags, mode = s32(n.data.args[0]), n.data.args[1], s32(n.data.args[2]), n.data.args[3]
        else:
            dirfd, addr, flags, mode = AT_FDCWD, n.data.args[0], s32(n.data.args[1]), n.data.args[2]
        raw = sup.read_cstr(n, addr)
        event.path = sup.resolve(n, dirfd, raw)
        event.flags = flags
        denied = sup.state.get("pf_deny")
        if denied and any(event.path == d or event.path.startswith(d.rstrip("/") + "/") for d in denied):
            event.denied = True
            if type(action) is InjectFd:
                os.close(action.fd)
            sup.record(name, n.pid, errno.EACCES, event.path, "denied by policy_fn (deny_path)")
            self._observe(sup, event)
            return Errno(errno.EACCES)
        if action is not None and action is not CONTINUE:
            # a built-in mechanism already acted on behalf (InjectFd/Value): hand that over if allowed
            return self._hold(sup, n, event, action, lambda: action)
        base = -1
        if not raw.startswith(b"/"):
            base = (os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    if dirfd == AT_FDCWD else sup.dup_child_fd(n, dirfd))

        def finalize():
            try:
                return self._open(sup, n.pid, base, raw, flags, mode)
            finally:
                if base >= 0:
                    os.close(base)
        return self._hold(sup, n, event, None, finalize)

    def _open(self, sup, pid, base, raw, flags, mode):
        from .fsdeny import FsDeny, Opener
        st = sup.state
        if st.get("pf_opener") is None:
            with st["pf_lock"]:
                if st.get("pf_opener") is None:
                    st["pf_opener"] = Opener(self.ruleset_fd)
        from ._sys import RESOLVE_NO_MAGICLINKS, openat2
        from .notif import tgid_of
        umask = FsDeny._child_umask(pid) if flags & os.O_CREAT else 0
        # The open runs in our process: "/proc/self" must mean the child (same rule as fsdeny), magic links
        # (/dev/stdin -> /proc/self/fd/0) are refused rather than resolved in our fd table, and nothing may
        # land in our own /proc entry.
        path = FsDeny._rewrite_self(raw, tgid_of(pid), pid)
        fd = st["pf_opener"].call(lambda: openat2(base if base >= 0 else AT_FDCWD, path, flags | os.O_CLOEXEC,
                                                  mode & ~umask & 0o7777, RESOLVE_NO_MAGICLINKS))
        real = os.readlink(f"/proc/self/fd/{fd}")
        mine = f"/proc/{os.getpid()}"
        if _MEM_RE.match(real) or real == mine or real.startswith(mine + "/"):
            os.close(fd)
            raise OSError(errno.EACCES, "policy_fn: /proc/<pid>/mem and the supervisor's /proc are refused")
        return InjectFd(fd, bool(flags & os.O_CLOEXEC))

    # exec: frozen, then the callback, then CONTINUE
    def _frozen(self, sup, pid: int) -> bool:
        if not self.freeze_ok:
            return False
        threads, _ = _status(pid)
        if threads != 1:
            return False
        from ._sys import raw_syscall
        from .process import sandbox_pids
        kcmp = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
        if kcmp is None:
            return False
        for other in sandbox_pids(sup.state["pf_reaper"]):
            if other == pid:
                continue
            try:
                same = raw_syscall(kcmp, pid, other, 1) == 0  # KCMP_VM (type 1; 0 is KCMP_FILE)
            except OSError:
                continue  # gone
            if same:
                t, state = _status(other)
                if t != 1 or state != "D":
                    return False
        return True

    def _exec(self, sup, n, name, event, action):
        if name == "execveat":
            dirfd, addr, argv_addr = s32(n.data.args[0]), n.data.args[1], n.data.args[2]
        else:
            dirfd, addr, argv_addr = AT_FDCWD, n.data.args[0], n.data.args[1]
        if not self._frozen(sup, n.pid):
            sup.record(name, n.pid, errno.EPERM, "", "policy_fn: execve from a process whose memory another "
                       "thread or process could change cannot be checked; denied")
            return Errno(errno.EPERM)
        raw_path = sup.read_cstr(n, addr)
        event.path = sup.resolve(n, dirfd, raw_path)
        argv = []
        ranges = [(addr, len(raw_path) + 1)]
        p = argv_addr
        while p and len(argv) < 4096:
            ptr = struct.unpack("=Q", sup.read_mem(n, p, 8))[0]
            ranges.append((p, 8))
            if not ptr:
                break
            arg = sup.read_cstr(n, ptr, 1 << 17)
            ranges.append((ptr, len(arg) + 1))
            argv.append(os.fsdecode(arg))
            p += 8
        if not self._private(n.pid, ranges):
            sup.record(name, n.pid, errno.EPERM, event.path, "policy_fn: execve arguments in memory another "
                       "process could change (shared memory or a writable file) cannot be checked; denied")
            return Errno(errno.EPERM)
        event.argv = argv
        return self._hold(sup, n, event, action, lambda: action if action is not None else CONTINUE)

    # network: address from child memory, then CONTINUE (see module docstring)
    def _net(self, sup, n, name, event, action):
        if name == "sendto":
            addr, alen = n.data.args[4], n.data.args[5]
        else:
            addr, alen = n.data.args[1], n.data.args[2]
        if addr and alen >= 2:
            data = sup.read_mem(n, addr, min(int(alen), 128))
            fam = struct.unpack_from("=H", data)[0]
            if fam == socket.AF_INET and len(data) >= 8:
                event.port = struct.unpack_from("!H", data, 2)[0]
                event.host = socket.inet_ntop(socket.AF_INET, data[4:8])
            elif fam == socket.AF_INET6 and len(data) >= 24:
                event.port = struct.unpack_from("!H", data, 2)[0]
                event.host = socket.inet_ntop(socket.AF_INET6, data[8:24])
        if event.host is not None and name != "bind":
            st = sup.state
            allowed = st.get("pf_net")
            per = st.get("pf_pid_net", {}).get(n.pid)
            host = event.host
            if host.startswith("::ffff:"):
                host = host[7:]
            if (allowed is not None and host not in allowed) or (per is not None and host not in per):
                event.denied = True
                sup.record(name, n.pid, errno.EPERM, f"{event.host}:{event.port}", "denied by policy_fn network "
                           "restriction")
                self._observe(sup, event)
                return Errno(errno.EPERM)
        return self._hold(sup, n, event, action, lambda: action if action is not None else CONTINUE)


def install(builder) -> None:
    from . import syscalls
    deny = builder.policy.deny_syscalls
    freeze_ok = deny is None or all(s in deny for s in ("ptrace", "process_vm_writev"))
    eng = Engine(builder.policy_fn, float(builder.policy_fn_timeout), builder.ruleset_fd, freeze_ok)
    pol = builder.policy
    # File-backed memory is only as frozen as its file: safe when Landlock keeps the sandbox from writing it.
    eng.writable_roots = tuple(pol.fs_writable) if (pol.fs_readable or pol.fs_writable) else None
    for name in HELD:
        nr = syscalls.number(name, builder.arch)
        if nr is None:
            continue
        chain = builder.handlers.get(nr, [])
        builder.handlers[nr] = [eng.wrap(name, chain)]
        builder.names[nr] = name
    builder.on_supervisor(eng.setup)
    builder.on_finish(eng.finish)
