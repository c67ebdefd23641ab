"""Copy-on-write exec: a binary that exists only in the upper is injected as an fd and the path string
rewritten in place to its /dev/fd name (argv/envp strings in the way moved aside); #! interpreters that exist
only in the upper are refused the way the kernel would, with the reason recorded."""
from __future__ import annotations

import errno
import os
import stat

from ._native import lib
from .cow_view import AT_EMPTY_PATH, AT_FDCWD, ARGV0_GAP, _write
from .notif import Errno, s32


class CowExec:
    """Mixin of cow.Cow (uses its resolve, branch, _wrap)."""

    # ---------------------------------------------------------------- exec
    def _exec(self, sup, n, idx, dirfd, flags):
        b = self.branch
        if b.clean and not self.vcwd:
            return None
        if flags & AT_EMPTY_PATH:
            return None
        path = sup.path_arg(n, idx)
        if self._outside_lexically(path):
            return None
        r = self.resolve(sup, n, dirfd, path, True)
        in_upper = False
        if r.rel is None:
            if not r.touched:
                return None
            real = r.vpath
        else:
            look = b.lookup(r.rel)
            if look is None:
                return Errno(errno.ENOENT)
            if look[0] == "L" and not r.touched:
                return None
            if stat.S_ISDIR(look[1].st_mode):
                return Errno(errno.EACCES)
            real = self._real(r.rel, look)
            in_upper = look[0] == "U"
        fd = self._open_for_exec(real, r.rel is not None)
        try:
            head = os.pread(fd, 256, 0)
            st = os.fstat(fd)
            script = head.startswith(b"#!")
            # Only a file the kernel will run is injected (an fd left behind by a failed exec would hand the
            # child the file) and may have the child's memory rearranged for it (see _make_room).
            runnable = stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 and (script or head[:4] == b"\x7fELF")
            if not runnable:
                return Errno(errno.ENOEXEC if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 else errno.EACCES)
            if script:
                tramp = self._interpreter_trampoline(sup, n, head, path if dirfd == AT_FDCWD else r.vpath)
                if isinstance(tramp, Errno):
                    return tramp
                if tramp is not None:
                    fd, in_upper = _swap(fd, tramp), False
            if in_upper and self.exec_by_copy:
                fd = _swap(fd, _sealed_copy(fd, st.st_size))
            newfd = lib.sl_notif_addfd(sup.listener, n.id, fd, 0, 0 if script else os.O_CLOEXEC, 0)
        finally:
            os.close(fd)
        if newfd < 0:
            return Errno(-newfd)
        new = f"{self.fd_dir}{newfd}".encode()
        if not self._make_room(sup, n, idx, path, len(new)):
            return self._exec_path_too_short(sup, n, r.vpath)
        _write(sup, n, n.data.args[idx], new + b"\0")
        return None  # CONTINUE: the kernel now execs the injected fd (Landlock still checks EXECUTE)

    def _open_for_exec(self, real: str, inside: bool) -> int:
        """The file to run: in the workdir or the upper, opened here (no symlink followed); elsewhere (an
        upper symlink pointing out of the workdir, e.g. a venv's bin/python) opened on the thread carrying the
        sandbox's Landlock domain, so the child gets no file it could not open itself; never a denied one."""
        if inside:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        else:
            fd = self._host(lambda: os.open(real, os.O_RDONLY | os.O_CLOEXEC))
        try:
            if self.deny is not None:
                self._check_denied(os.readlink(f"/proc/self/fd/{fd}"), fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_room(self, sup, n, idx: int, path: bytes, new_len: int) -> bool:
        """Prepare the child's memory for the path string to be rewritten to ``new_len`` bytes.

        Shells pass argv[0] itself as the path (execve(argv[0], argv, envp)): rewriting the path would rename
        the program (a venv's python finds its pyvenv.cfg through argv[0]). And a path shorter than the fd name
        (``./prog``) can only take it by running over the bytes after its NUL. A thread blocked in execve never
        returns to its old memory when the exec succeeds (the supervisor checked the file first), so: every
        argv/envp string that starts inside the bytes to be overwritten (argv[0] included) is copied well below
        the thread's stack pointer (dead memory for it) and its pointer moved there. Refused (False) when an
        argv/envp pointer array itself lies in those bytes or the child's memory cannot be read or written."""
        a = n.data.args
        addr, argv_addr, envp_addr = a[idx], a[idx + 1], a[idx + 2]
        end = addr + max(new_len, len(path)) + 1
        try:
            with open(f"/proc/{n.pid}/syscall", "rb") as f:
                fields = f.read().split()
            if len(fields) < 9 or int(fields[0]) != n.data.nr:
                return new_len <= len(path)
            scratch = (int(fields[7], 16) - ARGV0_GAP) & ~15
            for arr in (argv_addr, envp_addr):
                ptrs = self._pointer_array(sup, n, arr)
                if arr and arr < end and arr + 8 * (len(ptrs) + 1) > addr and new_len > len(path):
                    return False
                for i, p in enumerate(ptrs):
                    if addr <= p < end:
                        text = sup.read_cstr(n, p, 1 << 17) + b"\0"
                        scratch = (scratch - len(text)) & ~15
                        sup.write_mem(n, scratch, text)
                        sup.write_mem(n, arr + 8 * i, scratch.to_bytes(8, "little"))
            if new_len > len(path):
                sup.write_mem(n, addr + len(path), b"\0" * (new_len - len(path) + 1))  # writable, not via /proc
            return True
        except (OSError, ValueError):
            return new_len <= len(path)

    @staticmethod
    def _pointer_array(sup, n, addr: int, limit: int = 1 << 14) -> list[int]:
        out: list[int] = []
        while addr and len(out) < limit:
            chunk = sup.read_mem(n, addr + 8 * len(out), 8 * 64)
            if len(chunk) < 8:
                raise ValueError("argv/envp array runs into unreadable memory")
            for i in range(0, len(chunk) - 7, 8):
                p = int.from_bytes(chunk[i:i + 8], "little")
                if p == 0:
                    return out
                out.append(p)
        if addr and len(out) >= limit:
            raise ValueError("argv/envp too long")
        return out

    def _exec_path_too_short(self, sup, n, vpath):
        sup.record("execve", n.pid, errno.EACCES, f"{vpath}: exists only in the copy-on-write layer",
                   f"call it by its absolute path (the path string, rewritten in place to {self.fd_dir}N, had "
                   "argv/envp right after it)")
        return Errno(errno.EACCES)

    def _interpreter_trampoline(self, sup, n, head: bytes, script_path):
        """A script that exists only in the merged view is run through a sealed memfd ``#!/bin/sh`` that execs
        its interpreter by path, with the interpreter's optional argument, the script's path and the arguments:
        the very argv the kernel would have built (so ``$0``/``sys.argv[0]`` is the script's path, not
        /dev/fd/N). It is also the only way when the interpreter itself exists only in the merged view (a
        venv's ``bin/pip``, whose python is an upper symlink): the kernel looks interpreters up itself, in the
        lower. That exec comes back here (argv[0] kept, so a venv's python finds its pyvenv.cfg). None: the
        kernel runs the script itself."""
        line = head[2:].split(b"\n", 1)[0].strip()
        cut = next((i for i, c in enumerate(line) if c in b" \t"), len(line))  # as binfmt_script splits it
        interp, arg = line[:cut], line[cut:].strip(b" \t")
        if not interp.startswith(b"/"):
            return None  # relative to the cwd for the kernel, a PATH search for a shell: leave it to the kernel
        if not os.path.exists(TRAMPOLINE_SHELL):
            if not self._in_merged_view_only(sup, n, interp):
                return None  # the kernel finds it; the script runs as /dev/fd/N
            sup.record("execve", n.pid, errno.ENOENT,
                       f"#! interpreter {os.fsdecode(interp)} exists only in the copy-on-write layer (the kernel "
                       f"resolves interpreters itself) and there is no {TRAMPOLINE_SHELL} to relay it",
                       f"run it as: {os.fsdecode(interp)} SCRIPT ARGS")
            return Errno(errno.ENOENT)
        words = [interp] + ([arg] if arg else []) + [os.fsencode(script_path)]
        if b"\0" in b"".join(words) or len(words[-1]) == 0:
            return None
        text = b"#!" + TRAMPOLINE_SHELL.encode() + b"\nexec " + b" ".join(map(_shq, words)) + b' "$@"\n'
        return _sealed_bytes(text)

    def _in_merged_view_only(self, sup, n, interp: bytes) -> bool:
        if self._outside_lexically(interp):
            return False
        try:
            r = self.resolve(sup, n, AT_FDCWD, interp, True)
        except OSError:
            return False
        return r.touched or (r.rel is not None and self.branch.touched(r.rel))

    def h_execve(self, sup, n):
        return self._wrap(self._exec, sup, n, 0, AT_FDCWD, 0)

    def h_execveat(self, sup, n):
        a = n.data.args
        return self._wrap(self._exec, sup, n, 1, s32(a[0]), s32(a[4]))


def _swap(old: int, new: int) -> int:
    os.close(old)
    return new


def _sealed_copy(fd: int, size: int) -> int:
    """A read-only fd on a memfd copy of ``fd``'s file. Under a Landlock policy the child may not execute (or
    its interpreter reopen) a file in the branch storage, which no rule covers, though it may run what it
    wrote in the workdir: the copy, an anonymous file, is outside Landlock's path rules. Read-only, so that
    the kernel finds no writer (ETXTBSY)."""
    mfd = os.memfd_create("sandlock-cow-exec", os.MFD_CLOEXEC)
    try:
        off = 0
        while off < size:
            sent = os.sendfile(mfd, fd, off, size - off)
            if sent == 0:
                break
            off += sent
        return os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(mfd)


TRAMPOLINE_SHELL = "/bin/sh"


def _shq(word: bytes) -> bytes:
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


def _sealed_bytes(data: bytes) -> int:
    mfd = os.memfd_create("sandlock-cow-exec", os.MFD_CLOEXEC)
    try:
        os.write(mfd, data)
        os.fchmod(mfd, 0o755)
        return os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(mfd)
