"""Resource limits enforced by the supervisor: ``max_memory``, ``max_processes``, ``max_cpu``.

No cgroups and no privilege: the supervisor decides on the registers of the syscalls that create memory or
processes, and one watcher thread per run measures the sandbox through /proc (every process of a sandbox is a
descendant of its reaper, a child subreaper, so detached processes are included).

Memory (``max_memory``): what is limited is the sandbox's *private writable memory*, the kernel's own measure of
it: ``/proc/PID/statm`` field 6 (data + stack, i.e. ``VmData + VmStk``), summed over every address space of the
sandbox, plus anonymous shared mappings and SysV segments, which that field leaves out.

* Requests are judged on registers (no child memory is read): ``mmap`` of private writable memory or of shared
  anonymous memory (``MAP_ANONYMOUS`` or ``/dev/zero``) whatever its protection (reading shmem, or
  ``MAP_POPULATE``, allocates it; a process with a shared file mapping has its maps scanned like one),
  ``mprotect``/``pkey_mprotect`` adding ``PROT_WRITE``, ``brk`` growth, ``mremap`` growth, ``shmget`` that can
  create (``IPC_CREAT``, or ``IPC_PRIVATE``, which always creates), and ``fork``/``clone`` without ``CLONE_VM``
  (the child's copy of the address space). The filter lets the others through unnotified (private read-only
  or executable mappings, ``brk(0)``: an argument filter).
  The ledger (last measure + everything approved since; ``munmap`` is not notified, so it only over-counts)
  decides alone while the sandbox is far from the limit; within ``margin()`` of it, or once a process was
  approved ``drift()`` since its last measure, the requester's usage is measured afresh from statm, so
  unmapping tricks cannot launder usage near the limit and ``munmap``, ``exec`` and exit are credited. A
  request that would cross the limit fails with ``ENOMEM``, which programs handle (``malloc`` returns NULL,
  Python raises ``MemoryError``).
* A process that gets over the limit without a request that could fail (stack growth, memory the kernel gives
  at exec) is SIGKILLed, that process only, by the watcher (every 100 ms) or at its next request.
* Anonymous *shared* memory (``MAP_SHARED|MAP_ANONYMOUS``) is not in that field: it is measured from
  /proc/PID/maps of the processes that mapped it, each object once (a fork shares it), when the sandbox is near
  its limit and every 100 ms. SysV segments are charged at ``shmget`` and never credited (they outlive
  processes). Not counted: files in tmpfs or memfds (file storage, like disk: they can be filled with
  ``write`` as well as through a ``MAP_SHARED`` mapping, so charging their mappings would stop nothing), page
  cache, kernel memory.
* A forked child is charged a full copy of its parent (strict, like ``vm.overcommit_memory=2``): COW pages that
  are never written are counted twice.

Processes (``max_processes``): the number of *concurrent* processes of the sandbox (threads are not counted),
the root included. ``clone``/``fork``/``vfork`` over the limit fail with ``EAGAIN``; a process frees its slot
when it has exited and been reaped (a zombie still holds one, as for ``RLIMIT_NPROC``). ``clone3`` never
reaches the supervisor (the filter answers ``ENOSYS``; libc falls back to ``clone``), so every process creation
is seen. The count is exact: an upper bound (processes seen at the last walk + forks allowed since) is kept,
and only when it reaches the limit is the tree walked again.

CPU (``max_cpu``): the whole sandbox gets at most PCT % of one core, measured with the kernel's accounting
(utime + stime of every process, and of the reaped ones through their parents' and the reaper's cumulative
times). A token bucket: when the sandbox has used more than its share, every process of it is SIGSTOPped until
the share is paid back, then SIGCONTed. Idle processes are never stopped. Granularity: 20 ms ticks and the
kernel's 10 ms accounting; a busy loop at 25 % measures 24-26 % over 3 s on the 2-vCPU test machine.
``Sandbox.pause()`` wins over the throttle: a paused sandbox gets no SIGCONT from it until ``resume()``.
"""
from __future__ import annotations

import errno
from . import _lazylog as logging  # the real module (~5 ms of CLI start-up) at the first log call
import os
import stat
import threading
import time

from .notif import Errno, Kill, Value, s32

log = logging.getLogger("sandlock.resources")
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_MAX_PROCESSES = 64

CLONE_VM = 0x00000100
CLONE_VFORK = 0x00004000
CLONE_THREAD = 0x00010000
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
IPC_CREAT = 0o1000
IPC_PRIVATE = 0
KCMP_VM = 1

TICK = 0.02           # watcher period (CPU throttle)
MEM_EVERY = 5         # memory is measured every 5 ticks (100 ms)
PENDING_TTL = 2.0     # a fork copy not seen by a walk after this long is forgotten


# ---- /proc readers (os.open/os.read: no buffered file objects on hot paths) ----
def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 on (index 0 is the state, field N is at index N - 3)."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    return data.rsplit(b")", 1)[1].split()


def ppid_of(pid: int) -> int:
    f = stat_fields(pid)
    return int(f[1]) if f else 0


def data_bytes(pid: int) -> int | None:
    """The kernel's measure of private writable memory (statm field 6: data + stack), or None if gone."""
    data = _read(f"/proc/{pid}/statm")
    if not data:
        return None
    parts = data.split()
    if len(parts) < 6:
        return None
    return int(parts[5]) * PAGE


def tree(reaper: int) -> dict[int, int]:
    """Every process of the sandbox: {pid: parent pid}, walking the reaper's descendants."""
    out: dict[int, int] = {}
    todo = [reaper]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            data = _read(f"/proc/{parent}/task/{tid}/children")
            if not data:
                continue
            for x in data.split():
                pid = int(x)
                if pid not in out:
                    out[pid] = parent
                    todo.append(pid)
    return out


def sandbox_pids(sup) -> set[int]:
    """The live processes of the sandbox served by ``sup`` (used by procfs too)."""
    reaper = sup.state.get("reaper_pid")
    if not reaper:
        reaper = sup.state["reaper_pid"] = ppid_of(sup.root_pid)
    return set(tree(reaper))


def _tgid(pid: int) -> int:
    data = _read(f"/proc/{pid}/status")
    if data:
        i = data.find(b"\nTgid:")
        if i >= 0:
            return int(data[i + 6:data.index(b"\n", i + 6)])
    return pid


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Run:
    """Per-run state (a Sandbox's plan serves many runs, possibly at once): lives in ``sup.state["resources"]``."""

    def __init__(self, mech: "Resources", sup):
        """Made before the fork (``Resources.prepare``): the pids are filled in by ``attach``."""
        self.mech = mech
        self.sup = sup
        self.lock = threading.Lock()
        self.reaper = 0
        self.init = 0  # under a pid namespace: its pid 1 (native.c), a copy of the reaper, not counted
        # processes
        self.known: set[int] = set()            # tgids at the last walk
        self.since = 0                          # forks allowed since the last walk
        self.tokens: dict[int, float] = {}      # tid -> time of an allowed fork maybe still in progress
        self.started = 1
        self.peak_procs = 1
        self.proc_refused = 0
        # memory
        self.floor: dict[int, int] = {}         # tgid -> measured bytes
        self.approved: dict[int, int] = {}      # tgid -> bytes approved since it was last measured
        self.inflight: dict[int, tuple[int, int]] = {}  # tid -> (tgid, bytes) approved, maybe not yet mapped
        self.shanon: dict[int, int] = {}        # tgid -> anonymous shared bytes approved since the last scan
        self.shared_users: set[int] = set()     # tgids that mapped anonymous shared memory (and their children)
        self.shared_scan = 0                    # measured: anonymous shared memory, each object counted once
        self.brk: dict[int, tuple[int, int]] = {}  # tgid -> (start_brk, approved heap size)
        self.pending: list[tuple[int, int, float]] = []  # (parent tgid, copy bytes, time) of allowed forks
        self.tid2tgid: dict[int, int] = {}
        self.shm = 0
        self.peak_mem = 0
        self.mem_refused = 0
        self.mem_killed: list[tuple[int, int]] = []  # (pid, bytes)
        # watcher (WATCHER calls watch_tick)
        self.watch_lock = threading.Lock()
        self.ended = False
        self.mem_checked = time.monotonic()
        self.throttle = Throttle(self, mech.cpu_pct) if mech.cpu_pct else None
        self.cpu_stops = 0

    def attach(self, sup) -> None:
        """The run's processes are known (the listener arrived): its root, and the reaper above it."""
        reaper = sup.reaper_pid or ppid_of(sup.root_pid)
        sup.state["reaper_pid"] = reaper
        if self.mech.pidns:  # the root is the init's first child; the init is the reaper's
            self.init = ppid_of(sup.root_pid)
        mark_paused(reaper, False)  # a reused pid of a sandbox that ended while paused
        with self.watch_lock:  # the watcher may be ticking: it sees the run whole or not at all
            self.known = {sup.root_pid}
            self.mem_checked = time.monotonic()
            self.reaper = reaper

    # ---- limits (policy_fn may lower them at run time) ----
    def mem_limit(self) -> int | None:
        a, b = self.mech.mem_limit, self.sup.state.get("max_memory")
        return b if a is None else (a if b is None else min(a, b))

    def proc_limit(self) -> int | None:
        a, b = self.mech.proc_limit, self.sup.state.get("max_processes")
        return b if a is None else (a if b is None else min(a, b))

    # ---- processes ----
    def allow_fork(self, tid: int) -> bool:
        limit = self.proc_limit()
        self.tokens.pop(tid, None)  # this thread makes a new syscall: its previous fork is done
        if limit is None:
            return True
        if len(self.known) + self.since + 1 > limit:
            self._walk_procs()
            if len(self.known) + self.since + 1 > limit:
                return False
        self.since += 1
        self.tokens[tid] = time.monotonic()
        self.peak_procs = max(self.peak_procs, len(self.known) + self.since)
        return True

    def _walk_procs(self) -> dict[int, int]:
        links = tree(self.reaper)
        if self.init:
            links.pop(self.init, None)  # neither a process of the program nor memory of it (it shares the caller's)
        self.known = set(links)
        # An allowed fork is in flight until its thread returned from clone: the thread made another
        # notified syscall (popped above), is blocked in another syscall, or is gone.
        for tid in list(self.tokens):
            data = _read(f"/proc/{tid}/syscall")
            if data is None:
                del self.tokens[tid]
                continue
            first = data.split(b" ", 1)[0].strip()
            if first != b"running" and first.lstrip(b"-").isdigit() and int(first) not in self.mech.fork_nrs:
                del self.tokens[tid]
        self.since = len(self.tokens)
        return links

    # ---- memory ----
    def tgid(self, tid: int) -> int:
        if tid in self.known:
            return tid
        t = self.tid2tgid.get(tid)
        if t is None:
            t = self.tid2tgid[tid] = _tgid(tid)
        return t

    def _measure(self, tgid: int, via: int) -> int:
        v = data_bytes(via)
        if v is None:
            v = self.floor.get(tgid, 0)
        self.floor[tgid] = v
        self.approved[tgid] = 0
        return v

    @staticmethod
    def margin(limit: int) -> int:
        """Within this of the limit every request is measured (statm): far from it the ledger, an upper
        bound of what was approved, is enough."""
        return max(limit // 4, 4 << 20)

    @staticmethod
    def drift(limit: int) -> int:
        """A process approved this much since it was last measured is measured again (keeps the ledger, and
        the peak figure, within this of the kernel's measure)."""
        return max(limit // 16, 1 << 20)

    def total(self) -> int:
        """The ledger: what was measured, plus everything approved since (munmap is not seen, so this only
        over-counts until the next measure), plus requests that may not have been mapped when measured."""
        t = sum(self.floor.values()) + sum(self.approved.values())
        t += sum(self.shanon.values()) + self.shared_scan + self.shm
        t += sum(b for _p, b, _t in self.pending)
        t += sum(b for _g, b in self.inflight.values())
        return t

    def refresh(self) -> dict[int, int]:
        """Walk the sandbox, measure every address space, forget the dead; returns the walk."""
        links = self._walk_procs()
        now = time.monotonic()
        old = self.floor
        grew: dict[int, int] = {}
        new: dict[int, int] = {}
        for pid, parent in links.items():
            v = data_bytes(pid)
            if v is None:
                continue
            if v and parent in links and v == new.get(parent, -1) and self._same_vm(pid, parent):
                continue  # a vfork child shares its parent's address space until it execs
            new[pid] = v
            grew[pid] = v - old.get(pid, 0) - self.approved.get(pid, 0)
        # forks seen by this walk retire their pending copies
        fresh = [p for p in new if p not in old]
        for pid in fresh:
            parent = links.get(pid)
            for i, (pp, _b, _t) in enumerate(self.pending):
                if pp == parent:
                    del self.pending[i]
                    break
        self.pending = [e for e in self.pending if now - e[2] < PENDING_TTL]
        self.floor = new
        self.approved = {}
        self.inflight.clear()
        self.shared_users = {p for p in links if p in self.shared_users or links[p] in self.shared_users}
        self.shared_scan = _shared_anon(self.shared_users)
        self.shanon = {}
        self.brk = {k: v for k, v in self.brk.items() if k in links}
        self.tid2tgid = {k: v for k, v in self.tid2tgid.items() if v in links}
        self._grew = grew
        self.peak_procs = max(self.peak_procs, len(links))
        return links

    def _same_vm(self, a: int, b: int) -> bool:
        nr = self.mech.kcmp_nr
        if nr is None:
            return False
        from ._native import lib
        return lib.sl_raw_syscall6(nr, a, b, KCMP_VM, 0, 0, 0) == 0

    def enforce(self, limit: int) -> list[int]:
        """The sandbox is over the limit without a request we approved: SIGKILL the process that grew behind
        our back the most (or the largest), until it fits. Returns the pids killed."""
        killed = []
        grew = getattr(self, "_grew", {})
        while self.total() > limit and self.floor:
            pid = max(self.floor, key=lambda p: (grew.get(p, 0), self.floor[p]))
            size = self.floor.pop(pid)
            try:
                os.kill(pid, 9)
            except OSError:
                pass
            self.mem_killed.append((pid, size))
            self.sup.record("memory", pid, errno.ENOMEM, f"killed: the sandbox is over max_memory "
                            f"({_mib(limit)}); this process holds {_mib(size)}",
                            "raise max_memory (-m)")
            killed.append(pid)
        return killed

    def request(self, n, nbytes: int, what: str, shared: bool = False):
        """Judge a request of ``nbytes`` more memory by thread ``n.pid``: None (allow), Errno or Kill."""
        limit = self.mem_limit()
        if limit is None:
            return None
        tid = n.pid
        with self.lock:
            self.inflight.pop(tid, None)
            tgid = self.tgid(tid)
            total = self.total()
            if (total + nbytes > limit - self.margin(limit) or tgid not in self.floor
                    or self.approved.get(tgid, 0) >= self.drift(limit)):
                # near the limit, a process never measured, or one approved a lot since it was last measured:
                # the kernel's measure replaces the ledger (munmap and exit are credited, laundering is not)
                prev = self.floor.get(tgid, 0) + self.approved.get(tgid, 0)
                own = self._measure(tgid, tid)
                self._grew = {tgid: own - prev}
                total = self.total()
            if total + nbytes > limit:
                self.refresh()
                if tgid not in self.floor:
                    self._measure(tgid, tid)
                total = self.total()
                if total > limit:
                    if tgid in self.enforce(limit):
                        return Kill(errno.ENOMEM)
                    total = self.total()
                if total + nbytes > limit:
                    self.mem_refused += 1
                    self.sup.record(what, tid, errno.ENOMEM,
                                    f"{what} of {_mib(nbytes)} refused: the sandbox uses {_mib(total)} "
                                    f"of max_memory {_mib(limit)}", "raise max_memory (-m)")
                    return Errno(errno.ENOMEM)
            if shared:
                self.shanon[tgid] = self.shanon.get(tgid, 0) + nbytes
                self.shared_users.add(tgid)
            else:
                self.inflight[tid] = (tgid, nbytes)
                self.approved[tgid] = self.approved.get(tgid, 0) + nbytes
            self.peak_mem = max(self.peak_mem, total + nbytes)
            return None

    def fork_copy(self, n):
        """A fork without CLONE_VM: the child's address space is a copy of the parent's."""
        limit = self.mem_limit()
        if limit is None:
            return None
        tid = n.pid
        with self.lock:
            tgid = self.tgid(tid)
            size = self._measure(tgid, tid)
            total = self.total()
            if total + size > limit:
                self.refresh()
                total = self.total()
                if total + size > limit:
                    self.mem_refused += 1
                    self.sup.record("fork", tid, errno.ENOMEM,
                                    f"fork refused: the copy ({_mib(size)}) does not fit in max_memory "
                                    f"{_mib(limit)} (the sandbox uses {_mib(total)})", "raise max_memory (-m)")
                    return Errno(errno.ENOMEM)
            self.pending.append((tgid, size, time.monotonic()))
            self.peak_mem = max(self.peak_mem, total + size)
            return None

    # ---- the watcher: memory measurement, CPU throttle ----
    def start_watcher(self) -> None:
        WATCHER.add(self)

    def stop_watcher(self) -> None:
        WATCHER.remove(self)
        with self.watch_lock:  # a tick in progress finishes first; none comes after
            self.ended = True
            if self.throttle is not None:
                self.throttle.release()
        mark_paused(self.reaper, False)

    def watch_tick(self, now: float) -> None:
        with self.watch_lock:
            if self.ended or not self.reaper:  # over, or not attached yet (no processes to measure)
                return
            if self.mem_limit() is not None and now - self.mem_checked >= TICK * MEM_EVERY:
                self.mem_checked = now
                with self.lock:
                    self.refresh()
                    limit = self.mem_limit()
                    self.peak_mem = max(self.peak_mem, self.total())
                    if limit is not None and self.total() > limit:
                        self.enforce(limit)
            if self.throttle is not None:
                self.throttle.tick()

    def cpu_seconds(self, pids) -> float:
        ticks = 0
        for pid in (self.reaper, *pids):
            f = stat_fields(pid)
            if f is None:
                continue
            if pid == self.reaper:
                ticks += int(f[13]) + int(f[14])
            else:
                ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        return ticks / CLK_TCK

    def signal(self, pids, sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    # ---- the end ----
    def finish(self, result) -> None:
        self.stop_watcher()
        from .sandbox import ExitReason
        result.processes = self.started
        if self.mem_limit() is not None:
            result.peak_memory = self.peak_mem
        if (self.mem_killed or self.mem_refused) and not result.success and result.reason in (
                ExitReason.EXITED, ExitReason.SIGNALED):
            result.reason = ExitReason.MEMORY
            limit = self.mem_limit()
            what = (f"killed {len(self.mem_killed)} process(es)" if self.mem_killed
                    else f"refused {self.mem_refused} allocation(s)")
            result.error = f"memory limit: max_memory {_mib(limit)} reached ({what})"


class Throttle:
    """``max_cpu``: a token bucket over the sandbox's CPU time; when it is empty every process is SIGSTOPped
    until the share is paid back. A sandbox paused by ``Sandbox.pause()`` stays paused: the throttle sends no
    SIGCONT while it is, and starts afresh after ``resume()``."""

    def __init__(self, run: "Run", pct: int):
        self.run = run
        self.rate = pct / 100.0
        self.burst = self.rate * 0.05
        self.budget = self.burst
        self.stopped: set[int] = set()
        self.cpu_prev: float | None = None
        self.last = time.monotonic()

    def tick(self) -> None:
        run = self.run
        if is_paused(run.reaper):
            self.stopped.clear()  # pause() owns them now; resume() continues them
            self.cpu_prev = None
            return
        pids = tree(run.reaper)
        if not pids:
            return
        now = time.monotonic()
        cpu = run.cpu_seconds(pids)
        if self.cpu_prev is None:
            self.cpu_prev, self.last = cpu, now
            return
        used, dt = max(0.0, cpu - self.cpu_prev), now - self.last
        self.cpu_prev, self.last = cpu, now
        self.budget = min(self.budget + self.rate * dt, self.burst) - used
        if self.budget < 0:
            self._stop_all()
        elif self.stopped:
            self.release()

    def _stop_all(self) -> None:
        """SIGSTOP every process, again until no new process shows up."""
        for _ in range(8):
            new = [p for p in tree(self.run.reaper) if p not in self.stopped]
            if not new:
                break
            self.run.signal(new, 19)
            self.stopped.update(new)
        if self.stopped:
            self.run.cpu_stops += 1

    def release(self) -> None:
        """SIGCONT what the throttle stopped, unless the sandbox was paused meanwhile (checked under the lock
        that ``mark_paused`` takes: a pause either comes first and wins, or comes after this SIGCONT)."""
        with _PAUSE_LOCK:
            if self.stopped and self.run.reaper not in _PAUSED:
                self.run.signal(self.stopped, 18)
        self.stopped.clear()


class Watcher:
    """One thread for every run of this process: measures memory every 100 ms and runs the CPU throttles
    every 20 ms. (A thread per run cost about half a millisecond of each run's start-up.)"""

    def __init__(self):
        self.lock = threading.Lock()
        self.runs: set[Run] = set()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, run: Run) -> None:
        with self.lock:
            self.runs.add(run)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="sandlock-resources", daemon=True)
                self.thread.start()
        self.wake.set()

    def remove(self, run: Run) -> None:
        with self.lock:
            self.runs.discard(run)

    def _loop(self) -> None:
        while True:
            self.wake.clear()
            with self.lock:
                runs = list(self.runs)
            if not runs:
                self.wake.wait()
                continue
            time.sleep(TICK if any(r.throttle is not None for r in runs) else TICK * MEM_EVERY)
            now = time.monotonic()
            for run in runs:
                try:
                    run.watch_tick(now)
                except Exception:  # pragma: no cover - one run's failure must not stop the others' limits
                    log.exception("sandlock: resource watcher failed for a run")


WATCHER = Watcher()


# Sandboxes stopped by Sandbox.pause()/Process.pause(), by reaper pid: the CPU throttle must not resume them.
_PAUSE_LOCK = threading.Lock()
_PAUSED: set[int] = set()


def mark_paused(reaper: int, paused: bool) -> None:
    """Called by pause() before its SIGSTOP and by resume() after its SIGCONT."""
    with _PAUSE_LOCK:
        if paused:
            _PAUSED.add(reaper)
        else:
            _PAUSED.discard(reaper)


def is_paused(reaper: int) -> bool:
    return reaper in _PAUSED


class Resources:
    """The mechanism: compiled once per plan; per-run state is a ``Run``."""

    def __init__(self, policy, arch: str):
        from . import syscalls
        self.arch = arch
        self.mem_limit = policy.max_memory
        self.proc_limit = policy.max_processes if processes_enforced(policy) else None
        self.cpu_pct = policy.max_cpu if policy.max_cpu and policy.max_cpu < 100 else None
        self.fork_nrs = frozenset(n for n in (syscalls.number(s, arch) for s in ("clone", "fork", "vfork", "clone3"))
                                  if n is not None)
        self.kcmp_nr = syscalls.number("kcmp", arch)
        self.pidns = False  # isolate_pids by a pid namespace: its init (the root's parent) is not the sandbox's

    @staticmethod
    def run(sup) -> Run:
        return sup.state["resources"]

    # ---- handlers ----
    def h_clone(self, sup, n):
        flags = n.data.args[0]
        if flags & CLONE_THREAD:
            return None
        return self._fork(sup, n, flags)

    def h_fork(self, sup, n):
        return self._fork(sup, n, 0)

    def h_vfork(self, sup, n):
        return self._fork(sup, n, CLONE_VM | CLONE_VFORK)

    def _fork(self, sup, n, flags: int):
        r = sup.state["resources"]
        with r.lock:
            if not r.allow_fork(n.pid):
                r.proc_refused += 1
                sup.record("fork", n.pid, errno.EAGAIN, f"max_processes ({r.proc_limit()}) reached",
                           "raise max_processes (-P)")
                return Errno(errno.EAGAIN)
        if not flags & CLONE_VM:
            act = r.fork_copy(n)
            if act is not None:
                with r.lock:  # give the slot back
                    if r.tokens.pop(n.pid, None) is not None:
                        r.since = max(0, r.since - 1)
                return act
        with r.lock:
            r.started += 1
        return None

    def h_mmap(self, sup, n):
        a = n.data.args
        length, prot, flags = a[1], a[2] & 0xFFFFFFFF, a[3] & 0xFFFFFFFF
        if flags & MAP_SHARED:
            # whatever its protection: reading shmem (or MAP_POPULATE) allocates pages too, and mprotect of
            # a shared mapping to PROT_NONE and back would escape a charge taken only with PROT_WRITE
            r = sup.state["resources"]
            if flags & MAP_ANONYMOUS or _is_dev_zero(n.pid, s32(a[4])):  # /dev/zero: anonymous shmem too
                return r.request(n, _pages(length), "mmap", shared=True)
            with r.lock:  # a file (page cache): not charged; /dev/zero dup2'ed over the fd meanwhile would
                r.shared_users.add(r.tgid(n.pid))  # be, by the scan of this process's maps (every 100 ms)
            return None
        if not prot & PROT_WRITE:
            return None  # a private reservation: charged if it becomes writable (mprotect)
        if flags & MAP_ANONYMOUS or flags & MAP_PRIVATE:
            return sup.state["resources"].request(n, _pages(length), "mmap")
        return None

    def h_mprotect(self, sup, n):
        a = n.data.args
        if not a[2] & PROT_WRITE:
            return None
        return sup.state["resources"].request(n, _pages(a[1]), "mprotect")

    def h_mremap(self, sup, n):
        a = n.data.args
        grow = _pages(a[2]) - _pages(a[1])
        if grow <= 0:
            return None
        return sup.state["resources"].request(n, grow, "mremap")

    def h_brk(self, sup, n):
        new = n.data.args[0]
        if new == 0:
            return None
        r = sup.state["resources"]
        f = stat_fields(n.pid)
        if f is None or len(f) < 45:
            return None
        start = int(f[44])
        with r.lock:
            tgid = r.tgid(n.pid)
            base, size = r.brk.get(tgid, (start, 0))
            if base != start:  # a new program image (exec): a new heap
                size = 0
        want = max(0, new - start)
        if want <= size:
            with r.lock:
                r.brk[tgid] = (start, want)
            return None
        act = r.request(n, _pages(want - size), "brk")
        if act is None:
            with r.lock:
                r.brk[tgid] = (start, want)
        elif type(act) is Errno:
            # brk(2) fails by returning the current break (glibc stores what it returns): never -ENOMEM
            return Value(_current_brk(n.pid, start))
        return act

    def h_shmget(self, sup, n):
        a = n.data.args
        if not a[2] & IPC_CREAT and a[0] & 0xFFFFFFFF != IPC_PRIVATE:
            return None  # attaches to an existing segment (IPC_PRIVATE always creates one)
        r = sup.state["resources"]
        act = r.request(n, _pages(a[1]), "shmget")
        if act is None:
            with r.lock:  # a SysV segment outlives its creator: charged to the sandbox, never credited
                r.inflight.pop(n.pid, None)
                tgid = r.tgid(n.pid)
                r.approved[tgid] = max(0, r.approved.get(tgid, 0) - _pages(a[1]))
                r.shm += _pages(a[1])
        return act

    # ---- lifecycle ----
    def prepare(self, sup) -> None:
        # The watcher is given the run now (before the fork, where waking its thread costs less); it skips
        # the run until ``attach`` names the reaper.
        r = sup.state["resources"] = Run(self, sup)
        if self.mem_limit is not None or self.cpu_pct:
            r.start_watcher()
        sup.on_close(r.stop_watcher)

    def setup(self, sup) -> None:
        # The root is not measured now: before its exec it is a copy of the caller (a big pytest, say), which
        # says nothing of the program; its first request after the exec measures it.
        sup.state["resources"].attach(sup)

    def finish(self, sup, result) -> None:
        if sup is None:
            return
        r = sup.state.get("resources")
        if r is not None:
            r.finish(result)


def _shared_anon(pids) -> int:
    """Anonymous shared memory mapped by ``pids`` (MAP_SHARED|MAP_ANONYMOUS, shown as /dev/zero), each shmem
    object counted once however many processes map it (a fork shares it, it is not a copy)."""
    objects: dict[bytes, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue
        mine: dict[bytes, int] = {}
        for line in data.split(b"\n"):
            if b"/dev/zero" not in line:
                continue
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[1][3:4] != b"s":
                continue
            lo, hi = parts[0].split(b"-")
            mine[parts[4]] = mine.get(parts[4], 0) + int(hi, 16) - int(lo, 16)
        for ino, size in mine.items():
            objects[ino] = max(objects.get(ino, 0), size)
    return sum(objects.values())


def _is_dev_zero(pid: int, fd: int) -> bool:
    """Is fd of pid the zero device (a MAP_SHARED mapping of it is anonymous shared memory), wherever its node?"""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5)


def _current_brk(pid: int, start: int) -> int:
    """The end of the heap mapping (page-aligned break), or its start when there is no heap yet."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                if line.rstrip().endswith(b"[heap]"):
                    return int(line.split(b"-", 1)[1].split(b" ", 1)[0], 16)
    except (OSError, ValueError):
        pass
    return start


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def processes_enforced(policy) -> bool:
    """``max_processes`` costs a notification per fork: enforced when set to something other than the default,
    or when the sandbox has resource limits anyway (then the default of 64 applies too)."""
    return (policy.max_processes != DEFAULT_MAX_PROCESSES or policy.max_memory is not None
            or policy.max_cpu is not None)


def wanted(policy) -> bool:
    return processes_enforced(policy) or policy.max_memory is not None or policy.max_cpu is not None


def install(builder) -> None:
    policy = builder.policy
    mech = Resources(policy, builder.arch)
    mech.pidns = getattr(builder, "pidns", False)
    if mech.proc_limit is not None or mech.mem_limit is not None:
        builder.notify("clone", mech.h_clone)
        builder.notify("fork", mech.h_fork)
        builder.notify("vfork", mech.h_vfork)
    if mech.mem_limit is not None:
        # Only calls that can add memory reach the supervisor: private read-only and executable mappings
        # (most of what ld.so maps), mprotect to read-only, brk(0) and shmget of an existing key (neither
        # IPC_CREAT nor IPC_PRIVATE) are let through by the filter. Shared mappings are notified whatever
        # their protection (reading shmem allocates it; MAP_SHARED of /dev/zero is shmem too).
        builder.notify("mmap", mech.h_mmap, when=((2, PROT_WRITE), (3, MAP_SHARED)))
        builder.notify("mprotect", mech.h_mprotect, when=(2, PROT_WRITE))
        builder.notify("pkey_mprotect", mech.h_mprotect, when=(2, PROT_WRITE))
        builder.notify("mremap", mech.h_mremap)
        builder.notify("brk", mech.h_brk, when=(0, (1 << 64) - 1))
        builder.notify("shmget", mech.h_shmget, when=((2, IPC_CREAT), (0, 0xFFFFFFFF, IPC_PRIVATE)))
    builder.on_prepare(mech.prepare)
    builder.on_supervisor(mech.setup)
    builder.on_finish(mech.finish)
