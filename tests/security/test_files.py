"""File tricks against fs_readable / fs_writable / fs_denied, run by real code inside the sandbox.

Each attack runs against a denied file in a read-only tree (holes carved out of the Landlock ruleset: the
kernel refuses) and in a writable tree (the supervisor opens on behalf of the child and checks).
"""
from __future__ import annotations

import os
import shutil
import textwrap

import pytest

from sandlock_core import Policy, Sandbox

from .helpers import PY, SYSTEM_RO


def probe(sb: Sandbox, code: str, *args: str) -> str:
    """Run code; 'OK', or the errno name of the first OSError, followed by anything it printed."""
    wrapped = ("import ctypes, errno, os, sys, threading\nout = []\ntry:\n"
               + textwrap.indent(textwrap.dedent(code), "    ")
               + "\n    r = 'OK'\nexcept OSError as e:\n    r = errno.errorcode.get(e.errno, str(e.errno))\n"
               + "print(' '.join([r, *map(str, out)]))\n")
    res = sb.run([PY, "-I", "-S", "-c", wrapped, *args], timeout=60)
    assert res.exit_code == 0, res
    return res.stdout.decode().strip()


@pytest.fixture(params=["readonly", "writable"])
def tree(request, tmp_path):
    """(sandbox, tree dir, scratch writable dir) with tree/secret, tree/private/key and a tool denied."""
    t = tmp_path / "tree"
    (t / "private").mkdir(parents=True)
    (t / "ok").write_text("fine")
    (t / "secret").write_text("s3cret")
    (t / "private" / "key").write_text("k3y")
    shutil.copy("/bin/true", t / "tool")
    (t / "tool").chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(tmp_path, 0o755)
    denied = [str(t / "secret"), str(t / "private"), str(t / "tool")]
    if request.param == "readonly":
        policy = Policy(fs_readable=[*SYSTEM_RO, "/proc", str(t)], fs_writable=[str(scratch)], fs_denied=denied)
    else:
        policy = Policy(fs_readable=[*SYSTEM_RO, "/proc"], fs_writable=[str(t), str(scratch)], fs_denied=denied)
    return Sandbox(policy), t, scratch


SECRETS = ("s3cret", "k3y")


def assert_refused(outcome: str):
    assert outcome.split()[0] in ("EACCES", "EPERM"), outcome
    assert not any(s in outcome for s in SECRETS), outcome


def test_baseline_allowed_and_denied(tree):
    sb, t, _ = tree
    assert probe(sb, f"out.append(open({str(t / 'ok')!r}).read())") == "OK fine"
    assert_refused(probe(sb, f"out.append(open({str(t / 'secret')!r}).read())"))


SWAP_RACE = """
import sys
d, target_ok, target_bad, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
link = os.path.join(d, 'swap')
stop = False
def flipper():
    tmp = os.path.join(d, 'swap.tmp')
    while not stop:
        for t in (target_ok, target_bad):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(t, tmp)
            os.rename(tmp, link)
th = threading.Thread(target=flipper)
th.start()
got = {'fine': 0, 'leak': 0, 'refused': 0}
try:
    for _ in range(n):
        try:
            with open(link) as f:
                data = f.read()
            got['leak' if data != 'fine' else 'fine'] += 1
        except OSError:
            got['refused'] += 1
finally:
    stop = True
    th.join()
out.append(got['fine']); out.append(got['leak']); out.append(got['refused'])
"""


def test_symlink_swapped_by_a_thread_during_open(tree):
    sb, t, scratch = tree
    out = probe(sb, SWAP_RACE, str(scratch), str(t / "ok"), str(t / "secret"), "2000").split()
    fine, leak, refused = map(int, out[1:])
    assert leak == 0, out
    assert fine + refused == 2000 and fine > 0 and refused > 0, out


def test_new_hard_link_to_a_denied_file(tree):
    sb, t, scratch = tree
    for where in (scratch, t):
        assert_refused(probe(sb, f"os.link({str(t / 'secret')!r}, {str(where / 'hl')!r}); "
                                 f"out.append(open({str(where / 'hl')!r}).read())"))


def test_symlinked_directory_and_dotdot(tree):
    sb, t, scratch = tree
    assert_refused(probe(sb, f"os.symlink({str(t)!r}, {str(scratch / 'up')!r}); "
                             f"out.append(open({str(scratch / 'up' / 'secret')!r}).read())"))
    assert_refused(probe(sb, f"out.append(open({str(scratch)!r} + '/../tree/private/../secret').read())"))
    assert_refused(probe(sb, f"os.chdir({str(t / 'private')!r}); out.append(open('../secret').read())"))


def test_renaming_the_parent_of_a_denied_file(tree):
    sb, t, scratch = tree
    assert_refused(probe(sb, f"os.rename({str(t)!r}, {str(t)!r} + '2'); "
                             f"out.append(open({str(t)!r} + '2/secret').read())"))


def test_renaming_an_ancestor_of_a_denied_directory(tmp_path):
    """The denied directory itself keeps its inode, but what is under it must stay denied after a rename of
    one of its ancestors (in a writable tree, where the supervisor is the only guard)."""
    w = tmp_path / "w"
    (w / "a" / "private").mkdir(parents=True)
    (w / "a" / "private" / "key").write_text("k3y")
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=[str(w)], fs_denied=[str(w / "a" / "private")]))
    assert_refused(probe(sb, f"out.append(open({str(w / 'a' / 'private' / 'key')!r}).read())"))
    assert_refused(probe(sb, f"os.rename({str(w / 'a')!r}, {str(w / 'b')!r}); "
                             f"out.append(open({str(w / 'b' / 'private' / 'key')!r}).read())"))


def test_proc_self_root_and_proc_pid_root(tree):
    sb, t, _ = tree
    assert_refused(probe(sb, f"out.append(open('/proc/self/root' + {str(t / 'secret')!r}).read())"))
    assert_refused(probe(sb, f"out.append(open(f'/proc/{{os.getpid()}}/root' + {str(t / 'private' / 'key')!r}).read())"))


def test_o_path_then_proc_self_fd_reopen(tree):
    sb, t, _ = tree
    code = f"""
    fd = os.open({str(t / 'secret')!r}, os.O_PATH)
    out.append(open(f'/proc/self/fd/{{fd}}').read())
    """
    assert_refused(probe(sb, code))
    code = f"""
    d = os.open({str(t)!r}, os.O_RDONLY | os.O_DIRECTORY)
    out.append(open(f'/proc/self/fd/{{d}}/secret').read())
    """
    outcome = probe(sb, code)
    assert outcome.split()[0] in ("EACCES", "EPERM", "ENOENT", "ENOTDIR") and "s3cret" not in outcome, outcome


def test_proc_self_fd_is_the_childs_own_fd_table(tree, tmp_path):
    """/proc/self in a path the child opens means the child. The supervisor holds a pipe with a secret on an
    fd number the child does not have: reopening that number must not reach the supervisor's pipe."""
    sb, _, _ = tree
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, b"SUPERVISOR-PIPE")
        code = f"""
        fd = os.open('/proc/self/fd/{r}', os.O_RDONLY | os.O_NONBLOCK)
        out.append(os.read(fd, 100))
        """
        outcome = probe(sb, code)
    finally:
        os.close(r)
        os.close(w)
    assert "SUPERVISOR-PIPE" not in outcome, f"the child opened the supervisor's fd {r}: {outcome}"
    assert outcome.split()[0] in ("ENOENT", "EACCES", "EPERM"), outcome


def test_proc_self_fd_of_an_inherited_fd_reopens_the_childs_own(tree):
    """Reopening /proc/self/fd/1 (what /dev/stdout names) reaches the child's own captured stdout."""
    sb, _, _ = tree
    res = sb.run(["sh", "-c", "echo via-proc-self-fd > /proc/self/fd/1"])
    assert res.stdout == b"via-proc-self-fd\n", res


OPENAT2 = """
import struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH, RESOLVE_IN_ROOT = 1, 2, 4, 8, 16
dirfd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
res = []
for flags, resolve, name in ((os.O_RDONLY, RESOLVE_BENEATH, b'secret'), (os.O_RDONLY, RESOLVE_IN_ROOT, b'/secret'),
                             (os.O_RDONLY, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, b'private/key'),
                             (os.O_RDONLY | os.O_NOFOLLOW, RESOLVE_NO_XDEV, b'secret'),
                             (os.O_PATH, RESOLVE_BENEATH, b'secret')):
    how = struct.pack('QQQ', flags | os.O_CLOEXEC, 0, resolve)
    fd = libc.syscall(437, dirfd, ctypes.c_char_p(name), how, len(how))
    if fd < 0:
        res.append(errno.errorcode[ctypes.get_errno()])
        continue
    try:
        if flags & os.O_PATH:
            fd = os.open(f'/proc/self/fd/{fd}', os.O_RDONLY)
        res.append(os.read(fd, 100).decode())
    except OSError as e:
        res.append(errno.errorcode[e.errno])
out.extend(res)
"""


def test_openat2_with_resolve_flags(tree):
    sb, t, _ = tree
    outcome = probe(sb, OPENAT2, str(t)).split()
    assert outcome[0] == "OK", outcome
    assert all(x in ("EACCES", "EPERM") for x in outcome[1:]), outcome


def test_open_by_handle_at_and_name_to_handle_at_are_eperm(tree):
    sb, t, _ = tree
    code = f"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(128)
    ctypes.memmove(buf, (120).to_bytes(4, 'little'), 4)
    mount_id = ctypes.c_int()
    r = libc.syscall(303, -100, {str(t / 'secret')!r}.encode(), buf, ctypes.byref(mount_id), 0)
    out.append(errno.errorcode.get(ctypes.get_errno(), '?') if r < 0 else 'name_to_handle_at-ok')
    r = libc.syscall(304, os.open({str(t)!r}, os.O_RDONLY), buf, os.O_RDONLY)
    out.append(errno.errorcode.get(ctypes.get_errno(), '?') if r < 0 else 'open_by_handle_at-ok')
    """
    assert probe(sb, code) == "OK EPERM EPERM"


def test_execveat_of_a_denied_file(tree):
    sb, t, _ = tree
    code = f"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    argv = (ctypes.c_char_p * 2)(b'tool', None)
    envp = (ctypes.c_char_p * 1)(None)
    d = os.open({str(t)!r}, os.O_RDONLY | os.O_DIRECTORY)
    r = libc.syscall(322, d, b'tool', argv, envp, 0)
    out.append(errno.errorcode.get(ctypes.get_errno(), '?'))
    try:
        p = os.open({str(t / 'tool')!r}, os.O_PATH)
        r = libc.syscall(322, p, b'', argv, envp, 0x1000)  # AT_EMPTY_PATH
        out.append(errno.errorcode.get(ctypes.get_errno(), '?'))
    except OSError as e:
        out.append(errno.errorcode[e.errno])
    """
    outcome = probe(sb, code).split()
    # reaching the end at all means both execveat calls failed (a success would have replaced the process)
    assert outcome[0] == "OK" and all(x in ("EACCES", "EPERM") for x in outcome[1:]), outcome


def test_memfd_copy_of_a_denied_binary_cannot_be_made(tree):
    sb, t, _ = tree
    code = f"""
    m = os.memfd_create('copy')
    src = os.open({str(t / 'tool')!r}, os.O_RDONLY)
    os.sendfile(m, src, 0, 1 << 20)
    os.execv(f'/proc/self/fd/{{m}}', ['copy'])
    """
    assert_refused(probe(sb, code))
    res = sb.run(["sh", "-c", f"cp {t / 'tool'} /dev/shm/x 2>&1; cat {t / 'tool'} >/dev/null"])
    assert res.exit_code != 0


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_dotdot_out_of_a_bind_mounted_writable_dir(tmp_path):
    """A writable directory bind-mounted inside a read-only tree: `..` from the bind's root walks into the
    tree, where the denied file must stay denied."""
    import subprocess
    t = tmp_path / "tree"
    (t / "bind").mkdir(parents=True)
    (t / "secret").write_text("s3cret")
    w = tmp_path / "w"
    w.mkdir()
    os.chmod(tmp_path, 0o755)
    if subprocess.run(["mount", "--bind", str(w), str(t / "bind")], capture_output=True).returncode != 0:
        pytest.skip("mount --bind is not available here")
    try:
        for writable in ([str(w)], [str(t / "bind")]):
            sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(t)], fs_writable=writable, fs_denied=[str(t / "secret")]))
            assert probe(sb, f"open({str(t / 'bind' / 'x')!r}, 'w').write('1')") == "OK"
            assert_refused(probe(sb, f"out.append(open({str(t / 'bind')!r} + '/../secret').read())"))
            assert_refused(probe(sb, f"os.chdir({str(t / 'bind')!r}); out.append(open('../secret').read())"))
            assert_refused(probe(sb, f"d = os.open({str(t / 'bind')!r}, os.O_RDONLY); "
                                     f"out.append(os.read(os.open('../secret', os.O_RDONLY, dir_fd=d), 99))"))
    finally:
        subprocess.run(["umount", "-l", str(t / "bind")], check=False)


@pytest.mark.parametrize("spelling", ["/proc/self/fd/{fd}", "/proc/thread-self/fd/{fd}", "/dev/fd/{fd}",
                                      "{scratch}/me/fd/{fd}", "/proc/self/../self/fd/{fd}",
                                      "/proc/{sup}/fd/{fd}", "chdir:/proc/self:fd/{fd}"])
def test_every_spelling_of_proc_self_stays_the_childs(tree, spelling):
    """Spellings of /proc/self (symlinks to it, /dev/fd, thread-self, `..`, a relative path from a cwd in
    /proc, and the supervisor's own pid): none may reach the supervisor's pipe."""
    sb, _, scratch = tree
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, b"SUPERVISOR-PIPE")
        target = spelling.format(fd=r, scratch=scratch, sup=os.getpid())
        pre = f"os.symlink('/proc/self', {str(scratch / 'me')!r})\n" if "/me/" in target else ""
        if target.startswith("chdir:"):
            _, d, target = target.split(":")
            pre += f"os.chdir({d!r})\n"
        outcome = probe(sb, pre + f"fd = os.open({target!r}, os.O_RDONLY | os.O_NONBLOCK)\n"
                                  "out.append(os.read(fd, 100))")
    finally:
        os.close(r)
        os.close(w)
    assert "SUPERVISOR-PIPE" not in outcome, f"{spelling} reached the supervisor's fd {r}: {outcome}"
    assert outcome.split()[0] in ("ENOENT", "EACCES", "EPERM", "ELOOP"), outcome


FLIP_PATH = """
import sys
op, ok_path, bad_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
size = max(len(ok_path), len(bad_path)) + 1
ok = ok_path.encode().ljust(size, b'\\0')
bad = bad_path.encode().ljust(size, b'\\0')
buf = ctypes.create_string_buffer(ok, size)
dst = ctypes.create_string_buffer((ok_path + '.moved').encode())
argv = (ctypes.c_char_p * 2)(b'x', None)
envp = (ctypes.c_char_p * 1)(None)
stop = False
def flip():
    while not stop:
        ctypes.memmove(buf, bad, size)
        ctypes.memmove(buf, ok, size)
t = threading.Thread(target=flip, daemon=True)
t.start()
for i in range(n):
    if op == 'unlink':
        open(ok_path, 'w').close()
        libc.unlink(buf)
    elif op == 'rename':
        open(ok_path, 'w').close()
        libc.rename(buf, dst)
    elif op == 'exec':
        pid = os.fork()
        if pid == 0:  # the flipper must live in the exec'ing process itself
            stop = False
            threading.Thread(target=flip, daemon=True).start()
            for _ in range(50):
                libc.execve(buf, argv, envp)
            os._exit(0)
        os.waitpid(pid, 0)
    if not os.path.exists(bad_path) or os.path.exists(os.path.join(os.path.dirname(bad_path), 'ran')):
        break
stop = True
out.append(i + 1)
"""


@pytest.mark.parametrize("op", ["unlink", "rename"])
def test_flipping_the_path_string_during_unlink_or_rename_in_a_writable_tree(tmp_path, op):
    """A thread rewrites the path buffer between an allowed name and a denied one while the main thread
    unlinks/renames through it. A check on the path followed by CONTINUE lets the kernel re-read the
    flipped name: the denied file must survive anyway."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "secret").write_text("s3cret")
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=[str(w)], fs_denied=[str(w / "secret")]))
    outcome = probe(sb, FLIP_PATH, op, str(w / "decoy"), str(w / "secret"), "3000")
    assert (w / "secret").exists() and (w / "secret").read_text() == "s3cret", \
        f"the denied file was {op}ed through a flipped path ({outcome})"


def test_flipping_the_path_string_during_exec_of_a_denied_tool(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    for name, text in (("ok", "#!/bin/sh\nexit 0\n"), ("tool", f"#!/bin/sh\necho RAN > {w}/ran\n")):
        (w / name).write_text(text)
        (w / name).chmod(0o755)
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=[str(w)], fs_denied=[str(w / "tool")]))
    probe(sb, FLIP_PATH, "exec", str(w / "ok"), str(w / "tool"), "150")
    assert not (w / "ran").exists(), "the denied tool ran through a flipped execve path"


METADATA_OPS = {
    "chmod": "os.chmod(p, 0o777)",
    "chown": "os.chown(p, 1, 1)",
    "utime": "os.utime(p, (0, 0))",
    "setxattr": "os.setxattr(p, 'user.sandlock', b'1')",
    "fchmod-readonly-fd": "os.fchmod(os.open(p, os.O_RDONLY), 0o777)",
}


@pytest.mark.parametrize("where", ["outside", "readonly"])
@pytest.mark.parametrize("op", list(METADATA_OPS))
def test_metadata_of_files_outside_the_writable_trees_cannot_change(tmp_path, op, where):
    """Landlock has no right for chmod, chown, utimes or xattrs: unless something else guards them, a
    sandbox confined to read-only trees changes the mode, owner, times and xattrs of host files (for root:
    any file, e.g. chmod 0777 of /etc/shadow). A file outside every tree, and one in a read-only tree."""
    if where == "outside":
        f = tmp_path / "host-file"
        readable = SYSTEM_RO
    else:
        (tmp_path / "ro").mkdir()
        f = tmp_path / "ro" / "file"
        readable = [*SYSTEM_RO, str(tmp_path / "ro")]
    f.write_text("x")
    f.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    before = os.stat(f)
    xattrs = os.listxattr(f)
    (tmp_path / "scratch").mkdir()
    sb = Sandbox(Policy(fs_readable=readable, fs_writable=[str(tmp_path / "scratch")]))
    outcome = probe(sb, f"p = {str(f)!r}\n" + METADATA_OPS[op])
    after = os.stat(f)
    changed = ((before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns)
               != (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns)) or os.listxattr(f) != xattrs
    assert not changed, f"{op} changed a file outside the writable trees ({outcome})"
    assert outcome.split()[0] in ("EACCES", "EPERM", "EROFS", "ENOTSUP", "EOPNOTSUPP"), outcome


def test_linking_or_moving_a_file_from_outside_into_a_writable_dir(tmp_path):
    """A hard link or rename would make an outside file readable under the writable tree: Landlock's REFER
    right refuses both (EXDEV / EACCES)."""
    f = tmp_path / "outside"
    f.write_text("OUTSIDE-SECRET")
    (tmp_path / "scratch").mkdir()
    os.chmod(tmp_path, 0o755)
    sb = Sandbox(Policy(fs_readable=SYSTEM_RO, fs_writable=[str(tmp_path / "scratch")]))
    for code in (f"os.link({str(f)!r}, {str(tmp_path / 'scratch' / 'l')!r})",
                 f"os.rename({str(f)!r}, {str(tmp_path / 'scratch' / 'r')!r})"):
        outcome = probe(sb, code)
        assert outcome.split()[0] in ("EXDEV", "EACCES", "EPERM"), (code, outcome)
    assert f.read_text() == "OUTSIDE-SECRET"


def test_a_symlink_through_proc_self_resolves_as_the_child(tmp_path):
    """/etc/mtab -> ../proc/self/mounts, opened on behalf under fs_denied: the supervisor's /proc/self must
    not be what it reaches (that was refused with EACCES); the child's own entry is, and nothing of ours."""
    (tmp_path / "denied").mkdir()
    link = tmp_path / "status-link"
    link.symlink_to("/proc/self/status")
    fdlink = tmp_path / "fd-link"
    fdlink.symlink_to("/proc/self/fd/0")
    os.chmod(tmp_path, 0o755)
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, "/proc", str(tmp_path)], fs_denied=[str(tmp_path / "denied")]))
    res = sb.run(["sh", "-c", f"head -1 /etc/mtab | wc -l; grep ^Name: {link}; "
                              f"readlink /proc/self/fd/0 </dev/null; cat {fdlink} </dev/null; echo end"])
    assert res.exit_code == 0, res
    out = res.stdout.decode().split("\n")
    assert out[0].strip() == "1" and out[1] == "Name:\tgrep", (out, res.stderr)
    assert out[-2] == "end", out
