"""Deterministic execution: the sandbox clock, seeded randomness, sorted listings, a fixed host name.

Works on every process of the sandbox, in any language, through the kernel interface and the vDSO (no
patching of an interpreter). Which syscalls are notified depends only on the active policy fields.

Time (``time_start``, ``time_freeze``)
    *Sandbox clock*: CLOCK_REALTIME as the sandbox sees it is ``real + offset`` with ``offset = time_start -
    real_now`` taken when the run starts (nanoseconds), or exactly ``time_start`` when frozen. Monotonic,
    boot-time and CPU clocks are never touched (they stay monotonic). ``/proc/uptime`` stays real on
    purpose: it is CLOCK_BOOTTIME, which stays real, and programs combine it with the boot-relative start
    times in ``/proc/<pid>/stat`` (``ps``, ``top`` ages); a sandbox-relative uptime would contradict both.
    It is a duration, so ``time_start`` does not change its meaning (``uptime -s`` = sandbox now - uptime
    is on the sandbox clock). ``btime`` in ``/proc/stat`` stays real too (serving it would mean notifying
    every open under ``time_start`` alone).

    * vDSO: ``clock_gettime``/``gettimeofday``/``time`` are patched in each process's own vDSO
      (``vdso.py``): reads cost no supervisor round trip. The root of a run and the confined test body are
      patched before they are released; after every ``execve`` the new image is patched when it first calls
      ``arch_prctl`` (every x86_64 libc, Go and static glibc set their TLS with it before ``main``). Limit:
      a program that reads the vDSO clock before any ``arch_prctl`` (hand-written start-up code, nolibc)
      sees real time from the vDSO; its raw syscalls are still virtualized.
    * raw ``clock_gettime`` (realtime clocks), ``gettimeofday``, ``time``: answered by the supervisor.
    * ``clock_nanosleep`` with ``TIMER_ABSTIME`` on a realtime clock: the sleep is done by a worker until
      the sandbox clock reaches the target (a frozen clock counts from the call). Non-fatal signals are
      delivered when it ends. ``timerfd_settime`` with ``TFD_TIMER_ABSTIME`` on a realtime timerfd: done on
      behalf on the same timer. ``timer_settime`` with ``TIMER_ABSTIME`` on a realtime timer: the target in
      the caller's ``itimerspec`` is rewritten to real time before the kernel reads it (the caller's copy
      keeps the rewritten value). Relative sleeps (``sleep 1``, ``nanosleep``) are untouched: they take
      real time.
    * ``utimensat``/``futimens`` with ``UTIME_NOW`` or NULL times, and the legacy ``utimes``,
      ``futimesat`` and (x86_64) ``utime`` with NULL times, set the sandbox clock's "now": done on behalf,
      checked against the caller's uid like the kernel's rules (a writer may set "now", only the owner an
      explicit time). With a filesystem policy the change goes through the metadata guard
      (``metadata.py``: inside ``fs_writable`` only, not ``fs_denied``, on its Landlock-confined thread);
      without one the object is looked up as the child names it, absolute paths inside its root.
    * The times the kernel stamps by itself (a write's mtime, a creation's ctime) are real. With
      ``normalize_mtime`` the stat family (``stat``, ``lstat``, ``fstat``, ``newfstatat``, ``statx``) is
      answered on behalf and any timestamp at or after the run's real start is shown on the sandbox clock
      (frozen: exactly ``time_start``), so archives built in the sandbox (zip, wheel, tar) carry sandbox
      times. The files on disk keep their real times.

Randomness (``random_seed``)
    Every process gets its own streams, derived from the seed and the process's *lineage*: the root is
    ``r``; the k-th child of a process (k counted from 0, in fork order: when the supervisor meets the first
    unnamed child of a parent it names all of that parent's living children in pid order) is
    ``<parent>.k``. A child that exits before any of its siblings is met is not counted. Stream bytes: ``SHAKE256(seed as 8 bytes little-endian + lineage
    + b"\\0" + purpose + b"\\0" + counter as 8 bytes little-endian)`` truncated to 4096 bytes, for counter
    0, 1, 2, ... concatenated; purpose is ``getrandom`` for ``getrandom(2)`` and ``urandom:<i>`` for the i-th open of
    ``/dev/urandom``/``/dev/random`` in that process. What is deterministic: everything a process reads,  as
    long as pids are handed out in fork order (no pid wrap-around during the run), no sibling forked
    before it exits unnoticed while others race (a shell pipeline, parallel make jobs are fine), and its
    own threads do not race each other for bytes. Serving: a thread's first ``getrandom`` goes to Python,
    which gives the process a slot in ``FastPath`` holding the next 4096 bytes of its stream; the
    supervisor's receive loop (``sl_det_wait_recv`` in native.c) then answers that thread's calls itself
    (``ID_VALID``, ``process_vm_writev``, ``SEND``: no Python), and hands a call back to Python when the
    slot runs short; Python always takes the slot's bytes first, so the bytes are the same either way.
    Errors are the kernel's: EINVAL for unknown flags or ``GRND_RANDOM|GRND_INSECURE``, EFAULT for an
    unwritable buffer, a short count when the buffer ends early (the bytes asked for are used up). The vDSO
    ``getrandom`` (glibc 2.41+) is made to report ENOSYS so libc uses the syscall.

    *libc's getrandom* (the fast path; ``seedrand.py``, ``csrc/seedrand.c``): dynamically linked programs get
    ``_seedrand.so`` preloaded (``LD_PRELOAD``, after any the environment names; also with ``clean_env`` and
    ``env``), whose ``getrandom``/``getentropy`` make the bytes in the process. Per thread: its first call
    draws a 32-byte key K with the raw ``getrandom(2)``, i.e. the next 32 bytes of its process's
    ``getrandom`` stream above; the thread's bytes are then blocks 0, 1, 2, ... of ChaCha20 (the RFC 8439
    block function) under K, block i with counter ``i mod 2**32`` and nonce ``(i >> 32, 0, 0)`` as
    little-endian 32-bit words, handed out in order across calls (a call takes the next ``count`` bytes;
    what is left of a block stays for the next call). A forked child (detected without a syscall through a
    ``MADV_WIPEONFORK`` page, else ``getpid()``) draws new keys from its own stream, so parent and child
    never share bytes. Every flag combination gives the same bytes; bad flags are EINVAL, ``getentropy``
    over 256 bytes EIO; a NULL buffer goes to the raw syscall (EFAULT); any other unwritable buffer faults
    (SIGSEGV) as with the vDSO getrandom. Anything that keeps the library from working (no key, a signal
    handler calling getrandom inside getrandom) sends the call to the raw syscall: never to other bytes.
    Raw ``getrandom(2)`` (``syscall(SYS_getrandom)``, Python's ``os.getrandom``, glibc's own internal
    callers such as malloc's tcache key and ``arc4random``), static programs (Go) and programs started
    without the variable (``env -i``) take the supervisor path and read the process stream directly; their
    draws and the threads' keys interleave in call order. Not preloaded under ``chroot``, ``privileged`` and
    ``fs_isolation="overlayfs"`` (the library's host path may not exist in the child's root: ld.so would
    print an error) nor when ``fs_denied`` covers it; everything is then served by the supervisor. 32-bit
    programs cannot run in a sandbox at all (the filter kills foreign-architecture syscalls). Under a
    confined filesystem the Landlock ruleset gets a read (and execute) rule for that one file.

    ``/dev/urandom`` opens get a pipe fed from the stream by one feeder thread (endless, unlike a file;
    ``fstat`` shows a FIFO). ``/proc/sys/kernel/random/uuid`` gives a UUID4 from the stream.

Listings (``deterministic_dirs``): ``getdents64`` and the legacy ``getdents`` (x86_64; its own record
    layout, ``d_type`` in the last byte) are answered on behalf with the whole directory sorted by
    name bytes, served in chunks as the caller's buffer allows; the directory offset is the index into the
    sorted list, so ``rewinddir``/``seekdir``/``telldir`` keep working. A listing is read afresh when a
    reader starts at offset 0.

Host name (``hostname``): ``uname`` is answered with the node name replaced; ``/etc/hostname`` and
    ``/proc/sys/kernel/hostname`` read the name.
"""
from __future__ import annotations

import errno
import hashlib
import os
import select
import stat as _stat
import struct
import threading
import time

from . import syscalls
from .notif import DEFERRED, Errno, InjectFd, Value, s32

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
TIMER_ABSTIME = 1
REALTIME_CLOCKS = (0, 5, 8)  # CLOCK_REALTIME, CLOCK_REALTIME_COARSE, CLOCK_REALTIME_ALARM
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
GETRANDOM_MAX = 1 << 20
GRND_FLAGS = 0x7  # GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE
GRND_RANDOM_INSECURE = 0x6  # the kernel refuses the two together (EINVAL)
NS = 10**9


# ---------------------------------------------------------------- raw syscalls on our side
def _raw(name: str, *args) -> int:
    from ._native import lib
    a = list(args) + [0] * (6 - len(args))
    return lib.sl_raw_syscall6(syscalls.number(name), *a)


def _vm_writev(pid: int, data: bytes, size: int, addr: int) -> int:
    from ._native import lib
    global _vm_writev
    _vm_writev = lib.sl_process_vm_writev
    return _vm_writev(pid, data, size, addr)


def _tgid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return pid


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
    except (OSError, ValueError):
        pass
    return out


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[1])


# ---------------------------------------------------------------- the sandbox clock
class Clock:
    def __init__(self, start_s: float, freeze: bool):
        self.start_ns = int(round(start_s * NS))
        self.freeze = freeze
        self.offset_ns = 0
        self.run_start_real_ns = 0

    def begin(self) -> None:
        """Per run: the offset from the real clock, and the real instant the run started."""
        self.run_start_real_ns = time.time_ns()
        self.offset_ns = self.start_ns - self.run_start_real_ns

    def now_ns(self) -> int:
        return self.start_ns if self.freeze else time.time_ns() + self.offset_ns

    def real_of(self, virtual_ns: int) -> int:
        """The real instant at which the sandbox clock shows ``virtual_ns`` (frozen: counted from now)."""
        if self.freeze:
            return time.time_ns() + (virtual_ns - self.start_ns)
        return virtual_ns - self.offset_ns

    def view(self, real_ns: int) -> int:
        """A kernel-stamped time as the sandbox shows it (normalize_mtime)."""
        if real_ns < self.run_start_real_ns - NS:  # older than the run (1 s slack: coarse fs clocks)
            return real_ns
        return self.start_ns if self.freeze else real_ns + self.offset_ns


# ---------------------------------------------------------------- seeded streams
class Stream:
    """Block i = SHAKE256(seed as 8 bytes LE + lineage + NUL + purpose + NUL + i as 8 bytes LE), 4096 bytes;
    the stream is blocks 0, 1, 2, ... concatenated.

    A stream may own a slot of the C fast path (``FastPath``): the slot then holds the stream's next bytes,
    which the supervisor hands out without Python; ``read`` takes what is left there first, so the bytes a
    process sees are the same whichever side serves them."""

    BLOCK = 4096
    __slots__ = ("_prefix", "_counter", "_buf", "_pos", "slot")

    def __init__(self, seed: int, lineage: str, purpose: str):
        self._prefix = seed.to_bytes(8, "little") + lineage.encode() + b"\0" + purpose.encode() + b"\0"
        self._counter = 0
        self._buf = b""
        self._pos = 0
        self.slot = None  # a ``struct sl_det_slot`` cdata while the C fast path serves this stream

    def _block(self) -> bytes:
        c = self._counter
        self._counter = c + 1
        return hashlib.shake_256(self._prefix + c.to_bytes(8, "little")).digest(self.BLOCK)

    def read(self, n: int) -> bytes:
        slot = self.slot
        if slot is None:
            return self._read(n)
        from ._native import ffi
        take = min(n, slot.len - slot.pos)
        head = ffi.buffer(slot.buf)[slot.pos:slot.pos + take]
        slot.pos += take
        data = head + self._read(n - take) if take < n else head
        if slot.pos >= slot.len:
            self.refill()
        return data

    def refill(self) -> None:
        """Put the stream's next bytes in its (empty) slot."""
        from ._native import ffi
        slot = self.slot
        chunk = self._read(len(slot.buf))
        ffi.memmove(slot.buf, chunk, len(chunk))
        slot.pos, slot.len = 0, len(chunk)

    def detach(self) -> None:
        """Leave the slot: its unread bytes go back in front of the stream."""
        from ._native import ffi
        slot = self.slot
        rest = ffi.buffer(slot.buf)[slot.pos:slot.len]
        self._buf, self._pos = rest + self._buf[self._pos:], 0
        slot.pos = slot.len = 0
        self.slot = None

    def _read(self, n: int) -> bytes:
        pos, buf = self._pos, self._buf
        if pos + n <= len(buf):
            self._pos = pos + n
            return buf[pos:pos + n]
        parts = [buf[pos:]]
        have = len(buf) - pos
        while have < n:
            block = self._block()
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._buf, self._pos = data, n
        if len(data) > 2 * self.BLOCK:  # keep only the unread tail
            self._buf, self._pos = data[n:], 0
        return data[:n]


class FastPath:
    """The C side of getrandom (native.c, ``sl_det_wait_recv``): slots holding streams' next bytes, and a map
    from thread id to slot. Only the supervisor thread touches it (handlers run there, between receives), so
    it needs no lock. Slots are reused round robin; a stream that loses its slot takes its bytes back."""

    def __init__(self, nr: int, audit_arch: int):
        from ._native import ffi, lib
        self.lib = lib
        self.ctx = ffi.new("struct sl_det_fast *")  # kept alive by the supervisor loop that uses it
        self.ctx.nr, self.ctx.arch = nr, audit_arch
        self.owners: list[Stream | None] = [None] * lib.SL_DET_SLOTS
        self.tids: list[list[int]] = [[] for _ in range(lib.SL_DET_SLOTS)]
        self.tid_slot: dict[int, int] = {}
        self.slot_of: dict[int, int] = {}  # id(stream) -> its slot
        self.next = 0

    def bind(self, tid: int, stream: Stream) -> None:
        """Serve ``tid``'s getrandom from ``stream`` in C from now on (idempotent)."""
        if stream.slot is None:
            self._give_slot(stream)
        k = self.slot_of[id(stream)]
        if self.tid_slot.get(tid) == k:
            return
        if self.lib.sl_det_map_put(self.ctx, tid, k) == -errno.ENOSPC:
            self._rebuild()
            if self.lib.sl_det_map_put(self.ctx, tid, k) != 0:
                return  # more threads than the map holds: this one stays on the Python path
        old = self.tid_slot.get(tid)
        if old is not None:
            self.tids[old].remove(tid)
        self.tid_slot[tid] = k
        self.tids[k].append(tid)

    def _give_slot(self, stream: Stream) -> None:
        k = self.next
        self.next = (k + 1) % len(self.owners)
        old = self.owners[k]
        if old is not None:
            old.detach()
            del self.slot_of[id(old)]
            for tid in self.tids[k]:
                self.lib.sl_det_map_del(self.ctx, tid)
                del self.tid_slot[tid]
            self.tids[k].clear()
        self.owners[k] = stream
        self.slot_of[id(stream)] = k
        stream.slot = self.ctx.slots[k]
        stream.refill()

    def _rebuild(self) -> None:
        """Drop the map's tombstones (the map is rebuilt from the live bindings)."""
        self.lib.sl_det_map_clear(self.ctx)
        for k, tids in enumerate(self.tids):
            for tid in tids:
                self.lib.sl_det_map_put(self.ctx, tid, k)


class Lineage:
    """Stable names for processes: ``r`` for the root, ``<parent>.<k>`` for the k-th child met."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self.children: dict[str, int] = {}
        self.root = 0
        self.lock = threading.Lock()

    def name(self, tgid: int) -> str:
        with self.lock:
            return self._name(tgid, 0)

    def _name(self, tgid: int, depth: int) -> str:
        got = self.names.get(tgid)
        if got is not None:
            return got
        if tgid == self.root or depth > 64:
            name = "r" if tgid == self.root else f"?{tgid}"
        else:
            try:
                parent = _ppid(tgid)
            except (OSError, ValueError):
                parent = 0
            if parent <= 1:
                base = "?"
            else:
                base = self._name(parent, depth + 1)
            # name every living unnamed child of that parent in pid (= fork) order, so siblings that race to
            # their first request still get the names their fork order gives them
            for kid in sorted(set(_children(parent)) | {tgid}):
                if kid not in self.names:
                    k = self.children.get(base, 0)
                    self.children[base] = k + 1
                    self.names[kid] = f"{base}.{k}"
            return self.names[tgid]
        self.names[tgid] = name
        return name


class Feeder:
    """One thread that keeps every /dev/urandom pipe of the sandbox full from its stream."""

    CHUNK = 65536

    def __init__(self):
        self._pipes: dict[int, Stream] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="sandlock-urandom", daemon=True)
        self._thread.start()

    def add(self, stream: Stream) -> int:
        """A read end to give the child; the write end is ours."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        with self._lock:
            self._pipes[w] = stream
        os.write(self._wake_w, b"x")
        return r

    def _main(self):
        pending: dict[int, bytes] = {}
        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                if self._closed:
                    break
                fds = list(self._pipes)
            for w in fds:
                poller.register(w, select.POLLOUT)
            for fd, ev in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                if ev & (select.POLLERR | select.POLLHUP):
                    self._drop(fd, pending)
                    continue
                data = pending.pop(fd, None)
                if data is None:
                    data = self._pipes[fd].read(self.CHUNK)
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self._drop(fd, pending)
                    continue
                if n < len(data):
                    pending[fd] = data[n:]
        for w in list(self._pipes):
            self._drop(w, pending)

    def _drop(self, fd, pending):
        with self._lock:
            self._pipes.pop(fd, None)
        pending.pop(fd, None)
        try:
            os.close(fd)
        except OSError:
            pass

    def close(self):
        with self._lock:
            self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(2)
        os.close(self._wake_r)
        os.close(self._wake_w)


# ---------------------------------------------------------------- the mechanism
class Deterministic:
    def __init__(self, policy, arch: str):
        self.policy = policy
        self.arch = arch
        self.clock = Clock(policy.time_start, policy.time_freeze) if policy.time_start is not None else None
        self.seed = policy.random_seed
        self.hostname = policy.hostname
        self.normalize = bool(getattr(policy, "normalize_mtime", False)) and self.clock is not None
        self._reset()

    def _reset(self):
        self.lineage = Lineage()
        self.streams: dict[tuple[int, str], Stream] = {}
        self.by_tid: dict[tuple[int, str], Stream] = {}  # (thread id, purpose); a reused pid keeps its stream
        self.opens: dict[int, int] = {}
        self.feeder: Feeder | None = None
        self.listings: dict[tuple[int, int], tuple[tuple[int, int], list[bytes]]] = {}
        self.lock = threading.Lock()
        self.fast: FastPath | None = None
        self._metadata = None  # a metadata.Metadata judge, built when the metadata guard is active

    # ---- per run ----
    def setup(self, sup, getrandom_route=None) -> None:
        """Per run (one Deterministic per supervisor): ``getrandom_route`` is the handler routed to
        ``h_getrandom``; the C fast path is used only when it is the whole chain."""
        self._reset()
        self.lineage.root = sup.root_pid
        if self.clock is not None:
            self.clock.begin()
        sup.on_close(self.close)
        self.fast = self._fast_path(sup, getrandom_route)
        if sup.root_pid:
            self._patch(sup, sup.root_pid)  # the confined test body never execs: patch it now

    def _fast_path(self, sup, route) -> FastPath | None:
        """getrandom answered in C by the supervisor's receive loop, unless another handler also decides on it."""
        if self.seed is None or route is None or sup.recv_fast is not None:
            return None  # no seed, or another mechanism's C fast path has the loop (one per run)
        nr = syscalls.number("getrandom", self.arch)
        if nr is None or sup.handlers.get(nr) != (route,):
            return None
        from ._native import lib
        fast = FastPath(nr, syscalls.AUDIT_ARCH[self.arch])
        sup.recv_fast = (lib.sl_det_wait_recv, fast.ctx)
        return fast

    def finish(self, sup, result) -> None:
        """getrandom calls answered in C count as notifications too."""
        if self.fast is not None and hasattr(result, "notifications"):
            result.notifications += int(self.fast.ctx.served)

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()
            self.feeder = None

    # ---- vDSO ----
    def _patch(self, sup, pid: int) -> None:
        if self.arch != "x86_64":
            return
        from . import vdso
        c = self.clock
        try:
            vdso.patch_pid(pid, offset_ns=None if c is None or c.freeze else c.offset_ns,
                           freeze_ns=c.start_ns if c is not None and c.freeze else None,
                           disable_getrandom=self.seed is not None)
        except (OSError, vdso.VdsoError) as exc:
            if not isinstance(exc, ProcessLookupError) and not (isinstance(exc, OSError)
                                                                and exc.errno in (errno.ESRCH, errno.ENOENT)):
                sup.errors.append(f"vDSO patch of pid {pid} failed: {exc}")

    def h_arch_prctl(self, sup, n):
        self._patch(sup, n.pid)
        return None

    def _in_vdso(self, n) -> bool:
        from . import vdso
        try:
            rng = vdso.vdso_range(n.pid)
        except OSError:
            return False
        return rng is not None and rng[0] <= n.data.instruction_pointer < rng[1]

    # ---- clocks ----
    @staticmethod
    def _put(sup, n, addr: int, data: bytes):
        try:
            sup.write_mem(n, addr, data)
        except OSError:
            return Errno(errno.EFAULT)
        return None

    def h_clock_gettime(self, sup, n):
        clk = s32(n.data.args[0])
        if clk not in REALTIME_CLOCKS or self._in_vdso(n):
            return None  # other clocks are real; the vDSO's own fallback is shifted by its hook
        sec, nsec = divmod(self.clock.now_ns(), NS)
        return self._put(sup, n, n.data.args[1], struct.pack("<qq", sec, nsec)) or Value(0)

    def h_gettimeofday(self, sup, n):
        tv, tz = n.data.args[0], n.data.args[1]
        sec, nsec = divmod(self.clock.now_ns(), NS)
        if tv:
            err = self._put(sup, n, tv, struct.pack("<qq", sec, nsec // 1000))
            if err:
                return err
        if tz:
            err = self._put(sup, n, tz, struct.pack("<ii", 0, 0))
            if err:
                return err
        return Value(0)

    def h_time(self, sup, n):
        sec = self.clock.now_ns() // NS
        if n.data.args[0]:
            err = self._put(sup, n, n.data.args[0], struct.pack("<q", sec))
            if err:
                return err
        return Value(sec)

    def h_clock_nanosleep(self, sup, n):
        a = n.data.args
        clk, flags = s32(a[0]), s32(a[1])
        if not flags & TIMER_ABSTIME or clk not in REALTIME_CLOCKS:
            return None
        sec, nsec = struct.unpack("<qq", sup.read_mem(n, a[2], 16))
        if not 0 <= nsec < NS:
            return Errno(errno.EINVAL)
        target = self.clock.real_of(sec * NS + nsec)
        notif_id, pid = n.id, n.pid

        def wait():
            while True:
                left = target - time.time_ns()
                if left <= 0 or sup.listener < 0 or not sup.id_valid(notif_id):
                    break
                time.sleep(min(left / NS, 0.5))
            sup.respond(notif_id, Value(0), pid)

        threading.Thread(target=wait, name="sandlock-sleep", daemon=True).start()
        return DEFERRED

    def h_timerfd_settime(self, sup, n):
        a = n.data.args
        fd, flags = s32(a[0]), s32(a[1])
        if not flags & TIMER_ABSTIME:
            return None
        clockid = None
        try:
            with open(f"/proc/{n.pid}/fdinfo/{fd}", "rb") as f:
                for line in f:
                    if line.startswith(b"clockid:"):
                        clockid = int(line.split()[1])
        except OSError:
            return None
        if clockid not in REALTIME_CLOCKS:
            return None
        spec = bytearray(sup.read_mem(n, a[2], 32))
        isec, insec, vsec, vnsec = struct.unpack("<qqqq", spec)
        if vsec or vnsec:
            real = self.clock.real_of(vsec * NS + vnsec)
            struct.pack_into("<qq", spec, 16, *divmod(max(real, 1), NS))
        from ._native import ffi
        new = ffi.new("char[]", bytes(spec))
        old = ffi.new("char[]", 32)
        dup = sup.dup_child_fd(n, fd)
        try:
            r = _raw("timerfd_settime", dup, flags, ffi.cast("long", new), ffi.cast("long", old) if a[3] else 0)
        finally:
            os.close(dup)
        if r < 0:
            return Errno(-r)
        if a[3]:
            err = self._put(sup, n, a[3], ffi.buffer(old, 32)[:])
            if err:
                return err
        return Value(0)

    def h_timer_settime(self, sup, n):
        a = n.data.args
        timerid, flags = s32(a[0]), s32(a[1])
        if not flags & TIMER_ABSTIME:
            return None
        clockid = None
        try:
            with open(f"/proc/{_tgid(n.pid)}/timers", "rb") as f:
                current = None
                for line in f:
                    if line.startswith(b"ID:"):
                        current = int(line.split()[1])
                    elif line.startswith(b"ClockID:") and current == timerid:
                        clockid = int(line.split()[1])
        except OSError:
            return None
        if clockid not in REALTIME_CLOCKS:
            return None
        vsec, vnsec = struct.unpack("<qq", sup.read_mem(n, a[2] + 16, 16))
        if vsec or vnsec:
            real = self.clock.real_of(vsec * NS + vnsec)
            sup.write_mem(n, a[2] + 16, struct.pack("<qq", *divmod(max(real, 1), NS)))
        return None  # the kernel reads the rewritten target (see the module docstring)

    # ---- times set to "now" follow the sandbox clock ----
    # utimensat/futimens with UTIME_NOW or NULL times, and the legacy utimes, futimesat, utime with NULL times.
    # Explicit times are left to the next handler (metadata) or the kernel. When the metadata guard is active
    # (fs rules, no namespaces) the change is made through it, so its fs_writable/fs_denied judgement and its
    # Landlock-confined opener apply; otherwise it is made here, on the object the child names.
    def h_utimensat(self, sup, n):
        a = n.data.args
        dirfd, path_addr, times_addr, flags = s32(a[0]), a[1], a[2], s32(a[3])
        if times_addr:
            raw = struct.unpack("<qqqq", sup.read_mem(n, times_addr, 32))
            nsecs = (raw[1], raw[3])
            if UTIME_NOW not in nsecs:
                return None  # explicit times: the next handler's or the kernel's business
            pairs = [(raw[0], raw[1]), (raw[2], raw[3])]
        else:
            pairs = [(0, UTIME_NOW), (0, UTIME_NOW)]
        if path_addr == 0 and dirfd == AT_FDCWD:
            return Errno(errno.EFAULT)
        return self._touch(sup, n, "utimensat", dirfd, path_addr or None, bool(flags & AT_SYMLINK_NOFOLLOW),
                           bool(flags & AT_EMPTY_PATH), pairs)

    def _legacy_now(self, sup, n, name: str, dirfd: int, path_addr: int, times_addr: int):
        """utimes/futimesat/utime: only NULL times mean "now"."""
        if times_addr:
            return None
        if path_addr == 0 and dirfd == AT_FDCWD:
            return Errno(errno.EFAULT)
        return self._touch(sup, n, name, dirfd, path_addr or None, False, False, [(0, UTIME_NOW)] * 2)

    def h_utimes(self, sup, n):
        return self._legacy_now(sup, n, "utimes", AT_FDCWD, n.data.args[0], n.data.args[1])

    def h_utime(self, sup, n):
        return self._legacy_now(sup, n, "utime", AT_FDCWD, n.data.args[0], n.data.args[1])

    def h_futimesat(self, sup, n):
        a = n.data.args
        return self._legacy_now(sup, n, "futimesat", s32(a[0]), a[1], a[2])

    def _touch(self, sup, n, name, dirfd, path_addr, nofollow, empty_ok, pairs):
        now = divmod(self.clock.now_ns(), NS)
        explicit = any(ns_ not in (UTIME_NOW, UTIME_OMIT) for _, ns_ in pairs)
        times = struct.pack("<qqqq", *[v for sec, ns_ in pairs for v in (now if ns_ == UTIME_NOW else (sec, ns_))])
        child_fd = dirfd if path_addr is None else None
        cow = sup.state.get("cow_mech")
        if cow is not None:  # a copy-on-write workdir object: changed in the upper, never the lower (cow_mutate)
            done = cow.set_times(sup, n, dirfd, path_addr, nofollow, empty_ok, times)
            if done is not None:
                return done
        if sup.state.get("metadata.opener") is not None:
            return self._touch_via_metadata(sup, n, name, dirfd, path_addr, nofollow, empty_ok, times, explicit,
                                            child_fd)
        return self._touch_here(sup, n, dirfd, path_addr, nofollow, empty_ok, times, explicit, child_fd)

    def _touch_via_metadata(self, sup, n, name, dirfd, path_addr, nofollow, empty_ok, times, explicit, child_fd):
        if self._metadata is None:
            from .metadata import Metadata
            self._metadata = Metadata(self.policy)
        md = self._metadata
        set_times = md.utimes_op(times)

        def utimes(fd, child, st):  # metadata.run calls it on its confined opener, after its own judgement
            if not self._may_set(n.pid, st, child_fd, explicit):
                raise OSError(errno.EPERM if explicit else errno.EACCES, "not the owner / not writable")
            set_times(fd, child, st)
        return md.run(sup, n, name, dirfd, path_addr, nofollow, utimes, empty_ok)

    def _touch_here(self, sup, n, dirfd, path_addr, nofollow, empty_ok, times, explicit, child_fd):
        """No metadata guard (no fs rules, or mount namespaces): the object is looked up as the child would
        (absolute paths and symlinks inside the child's root, so its chroot and mounts apply), then changed
        through that very lookup."""
        try:
            fd = self._lookup(sup, n, dirfd, path_addr, nofollow, empty_ok)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        try:
            st = os.fstat(fd)
            if nofollow and _stat.S_ISLNK(st.st_mode):
                return Errno(errno.EOPNOTSUPP)  # as the metadata guard answers for a symlink itself
            if not self._may_set(n.pid, st, child_fd, explicit):
                return Errno(errno.EPERM if explicit else errno.EACCES)
            sec_ns = struct.unpack("<qqqq", times)
            ns_pair = tuple(cur if nsec == UTIME_OMIT else sec * NS + nsec
                            for sec, nsec, cur in ((sec_ns[0], sec_ns[1], st.st_atime_ns),
                                                   (sec_ns[2], sec_ns[3], st.st_mtime_ns)))
            os.utime(f"/proc/self/fd/{fd}", ns=ns_pair)
        except OSError as exc:
            return Errno(exc.errno or errno.EACCES)
        finally:
            os.close(fd)
        return Value(0)

    @staticmethod
    def _lookup(sup, n, dirfd, path_addr, nofollow, empty_ok) -> int:
        """An fd of the object the child names: its own fd (a duplicate), or an O_PATH lookup."""
        from . import _sys
        path = sup.read_cstr(n, path_addr) if path_addr is not None else None
        if not path:
            if path == b"" and not empty_ok:
                raise OSError(errno.ENOENT, "empty path")
            if dirfd == AT_FDCWD:
                return os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_CLOEXEC)
            return sup.dup_child_fd(n, dirfd)
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
        if path.startswith(b"/"):  # from the child's root: "..", absolute symlinks stay inside it (chroot)
            base, resolve = os.open(f"/proc/{n.pid}/root", os.O_PATH | os.O_CLOEXEC), _sys.RESOLVE_IN_ROOT
        elif dirfd == AT_FDCWD:
            base, resolve = os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_CLOEXEC), 0
        else:
            base, resolve = sup.dup_child_fd(n, dirfd), 0
        try:
            return _sys.openat2(base, path, flags, 0, resolve | _sys.RESOLVE_NO_MAGICLINKS)
        finally:
            os.close(base)

    @classmethod
    def _may_set(cls, pid, st, fd, explicit: bool) -> bool:
        """The kernel's rule: explicit times need the owner (or CAP_FOWNER: root); "now" also allows a
        writer."""
        if explicit:
            uid = cls._uid(pid)
            return uid is not None and (uid == 0 or uid == st.st_uid)
        return cls._may_touch(pid, st, fd)

    @staticmethod
    def _uid(pid):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        return int(line.split()[2])
        except (OSError, ValueError):
            pass
        return None

    @staticmethod
    def _may_touch(pid, st, fd) -> bool:
        """The kernel's rule for setting times to now: owner, write permission, or CAP_FOWNER (root)."""
        uid, gids = None, set()
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        uid = int(line.split()[2])
                    elif line.startswith(b"Gid:"):
                        gids.add(int(line.split()[2]))
                    elif line.startswith(b"Groups:"):
                        gids.update(int(g) for g in line.split()[1:])
        except OSError:
            return False
        if uid is None:
            return False
        if uid == 0 or uid == st.st_uid:
            return True
        if fd is not None:  # futimens: a descriptor opened for writing is enough
            try:
                fl = None
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    for line in f:
                        if line.startswith(b"flags:"):
                            fl = int(line.split()[1], 8)
                if fl is not None and fl & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return True
            except (OSError, ValueError):
                pass
        mode = st.st_mode
        if st.st_gid in gids:
            return bool(mode & _stat.S_IWGRP)
        return bool(mode & _stat.S_IWOTH)

    # ---- normalize_mtime: the stat family on behalf ----
    def _fix_stat(self, buf: bytearray) -> None:
        for off in (72, 88, 104):  # st_atim, st_mtim, st_ctim (x86_64 struct stat)
            sec, nsec = struct.unpack_from("<qq", buf, off)
            v = self.clock.view(sec * NS + nsec)
            struct.pack_into("<qq", buf, off, *divmod(v, NS))

    def _fix_statx(self, buf: bytearray) -> None:
        for off in (0x40, 0x50, 0x60, 0x70):  # stx_atime, btime, ctime, mtime
            sec, nsec = struct.unpack_from("<qI", buf, off)
            if sec == 0 and nsec == 0:
                continue
            v = self.clock.view(sec * NS + nsec)
            s_, ns_ = divmod(v, NS)
            struct.pack_into("<qI", buf, off, s_, ns_)

    def _stat_on_behalf(self, sup, n, syscall, dirfd, path_addr, flags, out_addr, size, fix, mask=None):
        from ._native import ffi
        path = sup.read_cstr(n, path_addr) if path_addr else None
        base = -1
        if dirfd == AT_FDCWD:
            if path is None or not path.startswith(b"/"):
                base = os.open(f"/proc/{n.pid}/cwd", os.O_PATH | os.O_CLOEXEC)
        elif path is None or not path.startswith(b"/"):
            base = sup.dup_child_fd(n, dirfd)
        try:
            cpath = ffi.new("char[]", path) if path is not None else ffi.NULL
            buf = ffi.new("char[]", size)
            fd_arg = base if base >= 0 else AT_FDCWD
            if syscall == "statx":
                r = _raw("statx", fd_arg, ffi.cast("long", cpath), flags, mask, ffi.cast("long", buf))
            else:
                r = _raw("newfstatat", fd_arg, ffi.cast("long", cpath), ffi.cast("long", buf), flags)
        finally:
            if base >= 0:
                os.close(base)
        if r < 0:
            return Errno(-r)
        data = bytearray(ffi.buffer(buf, size))
        fix(data)
        return self._put(sup, n, out_addr, bytes(data)) or Value(0)

    def h_newfstatat(self, sup, n):
        a = n.data.args
        return self._stat_on_behalf(sup, n, "newfstatat", s32(a[0]), a[1], s32(a[3]), a[2], 144, self._fix_stat)

    def h_stat(self, sup, n):
        a = n.data.args
        return self._stat_on_behalf(sup, n, "newfstatat", AT_FDCWD, a[0], 0, a[1], 144, self._fix_stat)

    def h_lstat(self, sup, n):
        a = n.data.args
        return self._stat_on_behalf(sup, n, "newfstatat", AT_FDCWD, a[0], AT_SYMLINK_NOFOLLOW, a[1], 144,
                                    self._fix_stat)

    def h_fstat(self, sup, n):
        from ._native import ffi
        a = n.data.args
        dup = sup.dup_child_fd(n, s32(a[0]))
        try:
            buf = ffi.new("char[]", 144)
            empty = ffi.new("char[]", b"")  # held until the call returns (a temporary is freed at once)
            r = _raw("newfstatat", dup, ffi.cast("long", empty), ffi.cast("long", buf), AT_EMPTY_PATH)
        finally:
            os.close(dup)
        if r < 0:
            return Errno(-r)
        data = bytearray(ffi.buffer(buf, 144))
        self._fix_stat(data)
        return self._put(sup, n, a[1], bytes(data)) or Value(0)

    def h_statx(self, sup, n):
        a = n.data.args
        return self._stat_on_behalf(sup, n, "statx", s32(a[0]), a[1], s32(a[2]), a[4], 256, self._fix_statx,
                                    mask=a[3] & 0xFFFFFFFF)

    # ---- randomness ----
    def _stream(self, pid: int, purpose: str) -> Stream:
        fast = self.by_tid.get((pid, purpose))  # hot path: no /proc read per call
        if fast is not None:
            return fast
        tgid = _tgid(pid)
        key = (tgid, purpose)
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = Stream(self.seed, self.lineage.name(tgid), purpose)
        self.by_tid[(pid, purpose)] = s
        return s

    def h_getrandom(self, sup, n):
        """The Python path: a thread's first getrandom, a slot running dry, odd sizes or flags. Later calls of
        a bound thread are answered in C (``FastPath``), from the same stream."""
        a = n.data.args
        count, flags = a[1], a[2] & 0xFFFFFFFF  # flags is an unsigned int for the kernel
        if flags & ~GRND_FLAGS or flags & GRND_RANDOM_INSECURE == GRND_RANDOM_INSECURE:
            return Errno(errno.EINVAL)
        count = min(count, GETRANDOM_MAX)
        if count == 0:
            return Value(0)
        pid = n.pid
        s = self.by_tid.get((pid, "getrandom")) or self._stream(pid, "getrandom")
        if self.fast is not None:
            self.fast.bind(pid, s)
        from ._native import lib
        lib.sl_det_answer(sup.listener, n, s.read(count), count)
        return DEFERRED  # answered (or stale) already

    # ---- opens of virtual files ----
    _TAILS = (b"random", b"hostname", b"uuid")

    def _virtual_open(self, sup, n, dirfd: int, path_index: int, flags: int):
        path = sup.path_arg(n, path_index)
        if not path.endswith(self._TAILS) or flags & os.O_ACCMODE != os.O_RDONLY:
            return None
        name = sup.resolve(n, dirfd, path)
        real = os.path.realpath(name)
        cloexec = bool(flags & os.O_CLOEXEC)
        if self.seed is not None:
            if real in ("/dev/urandom", "/dev/random"):
                tgid = _tgid(n.pid)
                with self.lock:
                    i = self.opens.get(tgid, 0)
                    self.opens[tgid] = i + 1
                    if self.feeder is None:
                        self.feeder = Feeder()
                stream = Stream(self.seed, self.lineage.name(tgid), f"urandom:{i}")
                fd = self.feeder.add(stream)
                if flags & os.O_NONBLOCK:
                    os.set_blocking(fd, False)
                return InjectFd(fd, cloexec)
            if real == "/proc/sys/kernel/random/uuid":
                b = bytearray(self._stream(n.pid, "getrandom").read(16))
                b[6] = (b[6] & 0x0F) | 0x40
                b[8] = (b[8] & 0x3F) | 0x80
                h = b.hex()
                text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}\n".encode()
                return InjectFd(sup.memfd_with(text, "uuid"), cloexec)
        if self.hostname is not None and real in ("/etc/hostname", "/proc/sys/kernel/hostname"):
            return InjectFd(sup.memfd_with(self.hostname.encode() + b"\n", "hostname"), cloexec)
        return None

    def h_open(self, sup, n):
        return self._virtual_open(sup, n, AT_FDCWD, 0, s32(n.data.args[1]))

    def h_openat(self, sup, n):
        return self._virtual_open(sup, n, s32(n.data.args[0]), 1, s32(n.data.args[2]))

    def h_openat2(self, sup, n):
        a = n.data.args
        if a[3] < 8:
            return None
        flags = struct.unpack("<Q", sup.read_mem(n, a[2], 8))[0]
        return self._virtual_open(sup, n, s32(a[0]), 1, s32(flags & 0xFFFFFFFF))

    # ---- uname ----
    def h_uname(self, sup, n):
        u = os.uname()
        fields = (u.sysname, self.hostname, u.release, u.version, u.machine, "(none)")
        try:
            with open("/proc/sys/kernel/domainname") as f:
                fields = fields[:5] + (f.read().strip(),)
        except OSError:
            pass
        data = b"".join(f.encode()[:64].ljust(65, b"\0") for f in fields)
        return self._put(sup, n, n.data.args[0], data) or Value(0)

    # ---- sorted listings ----
    def _listing(self, dup: int) -> list[tuple[int, int, bytes]]:
        from ._native import ffi
        fd = os.open(f"/proc/self/fd/{dup}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        entries = []
        try:
            buf = ffi.new("char[]", 65536)
            while True:
                r = _raw("getdents64", fd, ffi.cast("long", buf), 65536)
                if r < 0:
                    raise OSError(-r, os.strerror(-r))
                if r == 0:
                    break
                data = ffi.buffer(buf, r)[:]
                off = 0
                while off < r:
                    ino, _doff, reclen, dtype = struct.unpack_from("<QqHB", data, off)
                    name = data[off + 19:off + reclen].split(b"\0", 1)[0]
                    entries.append((ino, dtype, name))
                    off += reclen
        finally:
            os.close(fd)
        entries.sort(key=lambda e: e[2])
        return entries

    @staticmethod
    def _dirent64(ino: int, off: int, dtype: int, name: bytes) -> bytes:
        """struct linux_dirent64: ino, off, reclen, type, name NUL, padded to 8."""
        reclen = (19 + len(name) + 1 + 7) & ~7
        return (struct.pack("<QqHB", ino, off, reclen, dtype) + name).ljust(reclen, b"\0")

    @staticmethod
    def _dirent_legacy(ino: int, off: int, dtype: int, name: bytes) -> bytes:
        """struct linux_dirent (getdents): ino, off, reclen, name NUL, padded to 8, type in the last byte."""
        reclen = (18 + len(name) + 2 + 7) & ~7
        rec = (struct.pack("<QQH", ino, off, reclen) + name).ljust(reclen - 1, b"\0")
        return rec + bytes((dtype,))

    def h_getdents64(self, sup, n):
        return self._getdents(sup, n, self._dirent64)

    def h_getdents(self, sup, n):
        return self._getdents(sup, n, self._dirent_legacy)

    def _getdents(self, sup, n, record):
        a = n.data.args
        fd, addr, count = s32(a[0]), a[1], a[2] & 0xFFFFFFFF
        dup = sup.dup_child_fd(n, fd)
        try:
            st = os.fstat(dup)
            if not _stat.S_ISDIR(st.st_mode):
                return Errno(errno.ENOTDIR)
            pos = os.lseek(dup, 0, os.SEEK_CUR)
            key = (_tgid(n.pid), fd)
            ident = (st.st_dev, st.st_ino)
            cached = self.listings.get(key)
            if pos == 0 or cached is None or cached[0] != ident:
                cached = (ident, self._listing(dup))
                self.listings[key] = cached
            entries = cached[1]
            out = bytearray()
            i = pos
            while 0 <= i < len(entries):
                ino, dtype, name = entries[i]
                rec = record(ino, i + 1, dtype, name)
                if len(out) + len(rec) > count:
                    break
                out += rec
                i += 1
            if not out and 0 <= pos < len(entries):
                return Errno(errno.EINVAL)  # the buffer cannot hold the next entry
            if out:
                err = self._put(sup, n, addr, bytes(out))
                if err:
                    return err
                os.lseek(dup, i, os.SEEK_SET)
            return Value(len(out))
        finally:
            os.close(dup)

def install(builder) -> None:
    policy = builder.policy
    arch = builder.arch
    if policy.time_start is not None and arch != "x86_64":
        from .errors import PolicyError
        raise PolicyError("time_start: time virtualization on aarch64 is not supported yet (x86_64 only)")
    routes: dict[str, object] = {}

    def notify(syscall: str, method: str) -> None:
        """Route ``syscall`` to ``method`` of this run's Deterministic: every run (overlapping runs of one
        Sandbox, the stages of a pipeline) has its own clock offset, lineage, streams and listings."""
        if method not in routes:
            fn = getattr(Deterministic, method)
            routes[method] = lambda sup, n: fn(sup.state["deterministic"], sup, n)
        builder.notify(syscall, routes[method])

    normalize = bool(getattr(policy, "normalize_mtime", False)) and policy.time_start is not None
    if policy.time_start is not None or policy.random_seed is not None:
        notify("arch_prctl", "h_arch_prctl")
    if policy.time_start is not None:
        for name in ("clock_gettime", "gettimeofday", "time", "clock_nanosleep", "timerfd_settime",
                     "timer_settime", "utimensat", "utimes", "futimesat", "utime"):  # utime: x86_64 only
            notify(name, "h_" + name)
        if normalize:
            for name in ("newfstatat", "stat", "lstat", "fstat", "statx"):
                notify(name, "h_" + name)
    if policy.random_seed is not None:
        notify("getrandom", "h_getrandom")
    if policy.random_seed is not None or policy.hostname is not None:
        for name in ("open", "openat", "openat2"):
            notify(name, "h_" + name)
    if policy.hostname is not None:
        notify("uname", "h_uname")
    if policy.deterministic_dirs:
        notify("getdents64", "h_getdents64")
        notify("getdents", "h_getdents")  # the legacy call (x86_64): sorted the same way

    def setup(sup) -> None:
        run = sup.state["deterministic"] = Deterministic(policy, arch)
        run.setup(sup, routes.get("h_getrandom"))

    builder.on_supervisor(setup)
    if policy.random_seed is not None:
        builder.on_finish(lambda sup, result: sup.state["deterministic"].finish(sup, result))
