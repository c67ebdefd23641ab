"""Dynamic policy: ``Sandbox(policy, policy_fn=on_event)``.

Held syscalls: ``execve``, ``execveat``, ``connect``, ``sendto``, ``sendmsg``, ``sendmmsg``, ``bind``, ``openat``
(and the legacy ``open``, so a raw ``open`` cannot skip the callback). The mechanism is installed after every
built-in mechanism and wraps their chains for these syscalls: the built-in enforcers decide first; an event
they denied is shown with ``denied=True`` (the callback cannot overrule it); otherwise the syscall is held
while the callback runs on a worker thread (never on the supervisor loop) and the supervisor keeps serving
every other process. A callback that raises, returns an unknown verdict, or exceeds ``policy_fn_timeout``
(default 5 s) denies.

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
* ``connect``/``sendto`` (with an address)/``bind`` are *executed on behalf* of the child: at the
  notification the supervisor duplicates the child's socket (pidfd_getfd) and copies the sockaddr (and, for
  sendto, the data) once; the event shows that copy, the built-in rules (``net_allow_hosts``, ``net_connect``/
  ``net_bind`` ports, ``port_remap``, privileged ports) judge that copy, and after the verdict the supervisor
  connects/sends/binds the duplicate with it and returns the kernel's result (a non-blocking connect answers
  EINPROGRESS as the child's would; a blocking one runs on a network worker with the socket's own blocking and
  timeout). Rewriting the sockaddr or dup2-ing another socket onto the fd after the check changes nothing.
  The helpers are network.py's (same caveats: AF_UNIX peers see the supervisor's pid in SO_PEERCRED).
  ``sendmsg``/``sendmmsg`` are done on behalf the same way (network.py's copy of the msghdr: name, data,
  SCM_RIGHTS fds duplicated); the event shows the message's destination, and a ``sendmmsg`` batch is cut
  before the first message whose destination differs from the first one's (the kernel may send fewer; the
  caller sends the rest, which is a new event). A message without a destination goes to the connected peer,
  whose ``connect`` was judged: no host in the event, no ``restrict_network`` check (as ``sendto``).
  Residual: ``bind`` on a non-IP socket (an AF_UNIX path creates a file, which must stay under the child's
  own Landlock domain) continues in the child; its event carries no address. ``sendto`` without an address
  is decided on registers and continues.

Context (``ctx``): ``restrict_network(ips)``, ``grant_network(ips)`` (only while nothing was restricted, never
beyond the initial policy), ``restrict_pid_network(pid, ips)``, ``deny_path(p)``, ``allow_path(p)`` (lifts only
a path denied through ``deny_path``), ``restrict_max_memory(b)``, ``restrict_max_processes(n)``. Restrictions
are permanent. The memory/process limits are stored in ``sup.state["max_memory"]`` / ``["max_processes"]``
(the smaller value wins) for the resources mechanism to enforce; where the policy counts no memory (no
``max_memory``) or no processes (``max_processes`` not enforced), those two raise, so the callback fails and
its event is denied instead of the restriction silently doing nothing.
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

from .notif import CONTINUE, DEFERRED, Errno, InjectFd, Value, s32

AT_FDCWD = -100
AUDIT = "audit"
_MEM_RE = re.compile(r"^/proc/\d+/(task/\d+/)?mem$")
HELD = ("execve", "execveat", "connect", "sendto", "sendmsg", "sendmmsg", "bind", "openat", "open")
CATEGORY = {"execve": "process", "execveat": "process", "connect": "network", "sendto": "network",
            "sendmsg": "network", "sendmmsg": "network", "bind": "network", "openat": "file", "open": "file"}
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

    def _counted(self, what: str, limit_attr: str, field: str) -> None:
        """A limit can only be lowered where the resources mechanism counts it: otherwise the restriction would
        silently do nothing. Raising makes the callback fail, which denies the event (fail closed)."""
        r = self._s.get("resources")
        if r is None or getattr(r.mech, limit_attr) is None:
            raise PermissionError(f"{what}: this sandbox does not count {field.split('_')[1]} (set {field} in "
                                  f"the policy so that a callback can lower it)")

    def restrict_max_memory(self, nbytes: int) -> None:
        self._counted("restrict_max_memory", "mem_limit", "max_memory")
        with self._lock:
            cur = self._s.get("max_memory")
            self._s["max_memory"] = int(nbytes) if cur is None else min(cur, int(nbytes))

    def restrict_max_processes(self, n: int) -> None:
        self._counted("restrict_max_processes", "proc_limit", "max_processes")
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


def _is_net_mechanism(handler) -> bool:
    """A handler of network.py's Net (it acts on behalf itself; under policy_fn that waits for the verdict)."""
    from .network import Net
    return isinstance(getattr(handler, "__self__", None), Net)


class Engine:
    """Per-sandbox: the callback pool, the deadline monitor, and the wrapped handlers."""

    def __init__(self, fn, timeout: float, ruleset_fd: int, freeze_ok: bool, policy=None, arch: str = ""):
        self.fn = fn
        self.timeout = timeout
        self.ruleset_fd = ruleset_fd
        self.freeze_ok = freeze_ok
        self.writable_roots: tuple | None = None  # None: no fs rules, every file may be writable
        self.policy, self.arch = policy, arch
        self._own_net = None  # a Net for its helpers when the network mechanism is not installed

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
        __slots__ = ("n_id", "pid", "nr", "event", "action", "answered", "decided", "lock", "finalize", "discard")

    def _answer(self, sup, held, action) -> bool:
        with held.lock:
            if held.answered or held.decided:
                return False
            held.answered = True
        if sup.listener >= 0:
            sup.respond(held.n_id, action, held.pid)
        return True

    @staticmethod
    def _decide(held) -> bool:
        """The callback allowed: from now on the operation answers, not the deadline. False if too late."""
        with held.lock:
            if held.answered:
                return False
            held.decided = True
            return True

    @staticmethod
    def _discard(held) -> None:
        """Answered without the operation (denied, timed out): release what was prepared for it."""
        if held.action is not None and type(held.action) is InjectFd:
            os.close(held.action.fd)
        if held.discard is not None:
            held.discard()

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
                if self._answer(sup, held, Errno(err)):
                    self._discard(held)
                    sup.record(held.event.syscall, held.pid, err, held.event.path or held.event.host or "",
                               "denied by policy_fn")
                continue
            if not self._decide(held):
                continue  # the deadline answered (and discarded) already
            try:
                action = held.finalize()
            except OSError as exc:
                action = Errno(exc.errno or errno.EACCES)
            except Exception as exc:
                sup.errors.append(f"policy_fn: on-behalf operation failed: {exc!r}")
                action = Errno(errno.EACCES)
            if action is DEFERRED:
                continue  # a network worker performs the operation and answers
            if sup.listener >= 0:
                sup.respond(held.n_id, action, held.pid)
            elif type(action) is InjectFd:
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
                    sup.record(held.event.syscall, held.pid, err, held.event.path or held.event.host or "",
                               f"policy_fn did not answer within {self.timeout} s")
                    self._discard(held)

    def _hold(self, sup, n, event, action, finalize, discard=None):
        held = Engine.Held()
        held.n_id, held.pid, held.nr = n.id, n.pid, n.data.nr
        held.event, held.action, held.answered, held.lock = event, action, False, threading.Lock()
        held.decided, held.finalize, held.discard = False, finalize, discard
        st = sup.state
        with st["pf_cv"]:
            heapq.heappush(st["pf_deadlines"], (time.monotonic() + self.timeout, id(held), held))
            st["pf_cv"].notify()
        st["pf_jobs"].put((held, False))
        return DEFERRED

    def _observe(self, sup, event) -> None:
        held = Engine.Held()
        held.event, held.answered, held.decided = event, True, True
        sup.state["pf_jobs"].put((held, True))

    # ---- the wrapped chain ----
    def wrap(self, name: str, chain: list):
        category = CATEGORY[name]
        if category == "network":
            # network.py's handlers would act before the verdict: the on-behalf path below uses its helpers
            # after the verdict instead; the other handlers (denial recorders) still run first.
            chain = [h for h in chain if not _is_net_mechanism(h)]
        chain = tuple(chain)

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

    # network: executed on behalf with the copied address (see module docstring)
    def _net_mechanism(self, sup):
        net = sup.state.get("net")
        if net is None:
            if self._own_net is None:
                from .network import Net
                self._own_net = Net(self.policy, self.arch)
            net = self._own_net
        return net

    def _net(self, sup, n, name, event, action):
        a = n.data.args
        if action is not None and action is not CONTINUE:
            # another mechanism acted already: hand its answer over if the callback allows
            return self._hold(sup, n, event, action, lambda: action)
        if name == "sendto" and a[4] == 0:
            # no destination (decided on a register): the socket's connect was judged; nothing read
            return self._hold(sup, n, event, None, lambda: CONTINUE)
        net = self._net_mechanism(sup)
        if name in ("sendmsg", "sendmmsg"):
            return self._net_msgs(sup, n, name, net, event)
        try:
            dup = sup.dup_child_fd(n, s32(a[0]))
        except OSError as exc:
            return Errno(exc.errno or errno.EBADF)
        try:
            op = self._prepare_net(sup, n, name, net, dup, event)
        except OSError as exc:
            os.close(dup)
            return Errno(exc.errno or errno.EINVAL)
        except BaseException:
            os.close(dup)
            raise
        if type(op) is Errno or op is CONTINUE:
            os.close(dup)
            if type(op) is Errno:
                event.denied = True
                self._observe(sup, event)
                return op
            return self._hold(sup, n, event, None, lambda: CONTINUE)
        if self._pf_net_refused(sup, n, name, event):
            os.close(dup)
            return Errno(errno.EPERM)
        return self._hold(sup, n, event, None, op, discard=lambda: os.close(dup))

    def _net_msgs(self, sup, n, name, net, event):
        """sendmsg/sendmmsg: the messages are copied once (network.py), judged, shown, then sent on a dup."""
        a = n.data.args
        refused = []

        def read(dup, domain, stype):
            got = self._read_batch(sup, n, name, net, domain, stype, event)
            if type(got) is Errno:
                refused.append(got)
            return got
        dup, msgs = net.dup_and_read(sup, n, read)
        if msgs is None:  # dup is the Errno; a refusal by the built-in rules is this event's denial
            if refused:
                event.denied = True
                self._observe(sup, event)
            return dup

        def discard():
            for m in msgs:
                m.close()
            os.close(dup)
        if self._pf_net_refused(sup, n, name, event):  # the whole batch has the event's destination
            discard()
            return Errno(errno.EPERM)
        if name == "sendmsg":
            flags, m = s32(a[2]), msgs[0]
            call = lambda: m.send(net.s, dup, flags)  # noqa: E731
        else:
            flags = s32(a[3])
            call = net._mmsg_op(n.pid, dup, a[1], msgs, flags)

        def op():
            try:
                blocking = net._blocking(dup, flags)
            except BaseException:
                discard()
                raise
            return net._run(sup, n, dup, blocking, call)  # closes dup (and the messages' fds once sent)
        return self._hold(sup, n, event, None, op, discard=discard)

    def _read_batch(self, sup, n, name, net, domain, stype, event):
        """The copied messages (one for sendmsg), or an Errno for the first. Every message of a batch has the
        first one's destination (the event's): the batch ends before a message with another, as a short
        sendmmsg would, and the caller sends the rest (a new event)."""
        from . import network as nw
        a = n.data.args
        vec, count = (a[1], 1) if name == "sendmsg" else (a[1], min(a[2] & 0xFFFFFFFF, nw.UIO_MAXIOV))
        msgs: list = []
        ref = None  # the first message's copied name (b"": none)
        cut = Errno(errno.EAGAIN)  # marker: another destination

        def judge(raw, keep):
            if ref is not None and raw != ref:
                return cut
            d = nw.judge_addr(domain, raw, for_send=True)
            if d.kind == "ip":
                v4 = d.v4()
                event.host = socket.inet_ntop(socket.AF_INET, v4) if v4 is not None else \
                    socket.inet_ntop(socket.AF_INET6, d.ip)
                event.port = d.port
            target = net._judge_send(sup, n, name, domain, stype, raw, keep)
            if target is None:  # nothing for the network rules to decide: the copy as the kernel would read it
                target = net._unix_addr(n, raw, keep) if domain == nw.AF_UNIX else d.raw
            return target
        try:
            for i in range(count):
                try:
                    m = net._read_msg(sup, n, vec + 64 * i, domain, stype, name, judge)
                except OSError:
                    if not msgs:
                        raise
                    break  # a later bad message ends the batch; the kernel's send would fail there
                if type(m) is Errno:
                    if not msgs:
                        return m
                    break
                if ref is not None and m.dest != ref:
                    m.close()
                    break
                msgs.append(m)
                ref = m.dest
        except BaseException:
            for m in msgs:
                m.close()
            raise
        return msgs

    def _prepare_net(self, sup, n, name, net, dup, event):
        """Copy and judge the address once; returns the operation to run after the verdict (it answers and
        closes ``dup``), an Errno (built-in rule refused the copy), or CONTINUE (non-IP bind, see module)."""
        from . import network as nw
        a = n.data.args
        domain, stype, proto = net._sock_info(dup)
        ip_sock = domain in (nw.AF_INET, nw.AF_INET6)
        if name == "bind" and not ip_sock:
            return CONTINUE
        addr, alen = (a[4], a[5]) if name == "sendto" else (a[1], a[2])
        raw = net._read_addr(sup, n, addr, alen)
        d = nw.judge_addr(domain, raw, for_send=name == "sendto")
        if d.kind == "ip":
            v4 = d.v4()
            event.host = socket.inet_ntop(socket.AF_INET, v4) if v4 is not None else \
                socket.inet_ntop(socket.AF_INET6, d.ip)
            event.port = d.port
        if name == "bind":
            return self._prepare_bind(sup, n, net, dup, d, stype, proto)
        if d.kind == "ip" and name == "connect" and net.connect_ports is not None and \
                net._is_tcp(stype, proto) and d.port not in net.connect_ports:
            sup.record("connect", n.pid, errno.EACCES, d.text(), f"add {d.port} to net_connect")
            return Errno(errno.EACCES)
        target = net._judge_send(sup, n, name, domain, stype, raw) if d.kind != "none" or name == "sendto" \
            else raw  # AF_UNSPEC connect: a disconnect, nothing to judge
        if type(target) is Errno:
            return target
        if target is None:  # nothing for the network rules to decide: the copy as the kernel would read it
            target = net._unix_addr(n, raw) if domain == nw.AF_UNIX else d.raw
        return self._net_op(sup, n, name, net, dup, target)

    def _net_op(self, sup, n, name, net, dup, target: bytes):
        from . import network as nw
        from ._native import ffi
        a = n.data.args
        if name == "connect":
            buf = ffi.new("char[]", target)
            call = lambda: nw._sys.raw_syscall(net.s.connect, dup, nw._addr(buf), len(target))  # noqa: E731
            flags = 0
        else:
            flags, length = s32(a[3]), a[2]
            data = sup.read_mem(n, a[1], min(length, nw.SEND_CAP)) if length else b""
            msg = nw._Msg(target, data, b"", [])
            call = lambda: msg.send(net.s, dup, flags)  # noqa: E731

        def op():
            try:
                blocking = net._blocking(dup, flags)
            except BaseException:
                os.close(dup)
                raise
            return net._run(sup, n, dup, blocking, call)  # closes dup; DEFERRED: a worker answers
        return op

    def _prepare_bind(self, sup, n, net, dup, d, stype, proto):
        from . import network as nw
        if d.kind != "ip":
            raw = d.raw
            return self._bind_op(dup, lambda: net._bind(dup, raw))
        tcp = net._is_tcp(stype, proto)
        if tcp and net.bind_ports is not None and d.port not in net.bind_ports:
            sup.record("bind", n.pid, errno.EACCES, f"port {d.port}", f"add {d.port} to net_bind")
            return Errno(errno.EACCES)
        if net.remap and d.port and stype & 0xF in (nw.SOCK_STREAM, nw.SOCK_DGRAM):
            m = sup.state.setdefault("port_map" if stype & 0xF == nw.SOCK_STREAM else "port_map_udp", {})
            return self._bind_op(dup, lambda: net._bind_remapped(sup, n, dup, d.raw, d.port, m))
        # The supervisor may hold CAP_NET_BIND_SERVICE the child lacks: answer as the kernel would answer it.
        if 0 < d.port < nw._unprivileged_port_start() and not nw._has_cap(n.pid, nw.CAP_NET_BIND_SERVICE):
            sup.record("bind", n.pid, errno.EACCES, f"port {d.port}", "privileged port")
            return Errno(errno.EACCES)
        return self._bind_op(dup, lambda: net._bind(dup, d.raw))

    @staticmethod
    def _bind_op(dup, do):
        def op():
            try:
                r = do()
                return r if isinstance(r, (Value, Errno)) else Value(0)
            finally:
                os.close(dup)
        return op

    def _pf_net_refused(self, sup, n, name, event) -> bool:
        """restrict_network / restrict_pid_network, judged on the copied address (bind is not a destination)."""
        if event.host is None or name == "bind":
            return False
        st = sup.state
        allowed = st.get("pf_net")
        per = st.get("pf_pid_net", {}).get(n.pid)
        if (allowed is not None and event.host not in allowed) or (per is not None and event.host not in per):
            event.denied = True
            sup.record(name, n.pid, errno.EPERM, f"{event.host}:{event.port}", "denied by policy_fn network "
                       "restriction")
            self._observe(sup, event)
            return True
        return False


def install(builder) -> None:
    from . import syscalls
    deny = builder.policy.deny_syscalls
    freeze_ok = deny is None or all(s in deny for s in ("ptrace", "process_vm_writev"))
    eng = Engine(builder.policy_fn, float(builder.policy_fn_timeout), builder.ruleset_fd, freeze_ok,
                 builder.policy, builder.arch)
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
