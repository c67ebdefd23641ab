"""metadata: chmod, chown, utimes and xattrs are done on behalf, and only under fs_writable."""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import textwrap

import pytest

from sandlock_core import Policy, Sandbox

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None
SYSTEM_RO = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc") if os.path.exists(p)]
pytestmark = pytest.mark.skipif(PY is None, reason="needs /usr/bin/python3")


def run(sb: Sandbox, code: str, *args: str) -> str:
    wrapped = ("import errno, os, sys, threading\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ")
               + "\n    r = 'OK'\nexcept OSError as e:\n    r = errno.errorcode.get(e.errno, str(e.errno))\nprint(r)\n")
    res = sb.run([PY, "-I", "-S", "-c", wrapped, *args], timeout=60)
    assert res.exit_code == 0, res
    return res.stdout.decode().strip()


def xattrs_supported(d) -> bool:
    f = d / ".xattr-probe"
    f.write_text("")
    try:
        os.setxattr(f, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        f.unlink()


@pytest.fixture
def env(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    os.chmod(tmp_path, 0o755)
    for d in (ro, rw):
        (d / "f").write_text("x")
        (d / "f").chmod(0o600)
        os.utime(d / "f", ns=(10**18, 10**18))
    (rw / "denied").write_text("x")
    (rw / "denied").chmod(0o600)
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(ro)], fs_writable=[str(rw)], fs_denied=[str(rw / "denied")]))
    return sb, ro, rw


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FS_NOATIME_FL, FS_XFLAG_NOATIME = 0x80, 0x40
FS_IOC_GETVERSION, FS_IOC_SETVERSION = 0x80087601, 0x40087602


def inode_flags(p) -> int:
    fd = os.open(p, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return struct.unpack("=i", buf[:4])[0]
    finally:
        os.close(fd)


def inode_generation(p) -> int:
    fd = os.open(p, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf)
        return struct.unpack("=i", buf[:4])[0]
    finally:
        os.close(fd)


def snapshot(p):
    st = os.stat(p)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, sorted(os.listxattr(p)),
            inode_flags(p), inode_generation(p))


# chattr +A through both of its ioctls: the kernel asks only for ownership, not for write access.
CHATTR = f"""
import fcntl, struct
fd = os.open(p, os.O_RDONLY)
buf = bytearray(8)
fcntl.ioctl(fd, {FS_IOC_GETFLAGS}, buf)
fcntl.ioctl(fd, {FS_IOC_SETFLAGS}, bytearray(struct.pack("=q", struct.unpack("=i", buf[:4])[0] | {FS_NOATIME_FL})))
"""
FSXATTR = f"""
import fcntl, struct
fd = os.open(p, os.O_RDONLY)
fsx = bytearray(28)
fcntl.ioctl(fd, {FS_IOC_FSGETXATTR}, fsx)
struct.pack_into("=I", fsx, 0, struct.unpack_from("=I", fsx)[0] | {FS_XFLAG_NOATIME})
fcntl.ioctl(fd, {FS_IOC_FSSETXATTR}, fsx)
"""


OPS = {
    "chmod": "os.chmod(p, 0o644)",
    "chown": f"os.chown(p, -1, {os.getgid()})" if os.getuid() else "os.chown(p, 1, 1)",
    "utime": "os.utime(p, (5, 5))",
    "setxattr": "os.setxattr(p, 'user.sandlock', b'1')",
    "fchmod": "fd = os.open(p, os.O_RDONLY); os.fchmod(fd, 0o644)",
    "relative": "os.chdir(os.path.dirname(p)); os.chmod(os.path.basename(p), 0o644)",
    "dirfd": "d = os.open(os.path.dirname(p), os.O_RDONLY); os.chmod(os.path.basename(p), 0o644, dir_fd=d)",
    "chattr": CHATTR,
    "fsxattr": FSXATTR,
    # chattr -v: the inode generation (ownership is all the kernel asks for)
    "setversion": f"import fcntl, struct\nfcntl.ioctl(os.open(p, os.O_RDONLY), {FS_IOC_SETVERSION}, "
                  "struct.pack('=q', 123457))",
}


@pytest.mark.parametrize("op", list(OPS))
def test_read_only_and_denied_files_keep_their_metadata(env, op):
    sb, ro, rw = env
    if op == "setxattr" and not xattrs_supported(ro):
        pytest.skip("user xattrs unsupported on this filesystem")
    for f in (ro / "f", rw / "denied"):
        before = snapshot(f)
        assert run(sb, f"p = {str(f)!r}\n{OPS[op]}") == "EACCES", (op, f)
        assert snapshot(f) == before, (op, f)


@pytest.mark.parametrize("op", list(OPS))
def test_files_in_the_writable_tree_change(env, op):
    sb, ro, rw = env
    if op == "setxattr" and not xattrs_supported(rw):
        pytest.skip("user xattrs unsupported on this filesystem")
    f = rw / "f"
    before = snapshot(f)
    assert run(sb, f"p = {str(f)!r}\n{OPS[op]}") == "OK", op
    assert snapshot(f) != before, op


def test_touch_in_the_writable_tree(env):
    sb, ro, rw = env
    res = sb.run(["touch", str(rw / "f"), str(rw / "new")])
    assert res.exit_code == 0, res
    assert os.stat(rw / "f").st_mtime_ns != 10**18 and (rw / "new").exists()
    assert sb.run(["touch", str(ro / "f")]).exit_code != 0
    assert os.stat(ro / "f").st_mtime_ns == 10**18


FLIP = """
ok, bad = sys.argv[1].encode(), sys.argv[2].encode()
import ctypes
buf = ctypes.create_string_buffer(max(len(ok), len(bad)) + 1)
stop = False
def flip():
    while not stop:
        buf.value = bad
        buf.value = ok
t = threading.Thread(target=flip); t.start()
libc = ctypes.CDLL(None, use_errno=True)
for i in range(500):
    libc.chmod(buf, 0o644)
stop = True; t.join()
"""


def test_flipping_the_path_string_never_changes_the_forbidden_file(env):
    sb, ro, rw = env
    assert run(sb, FLIP, str(rw / "f"), str(ro / "f")) == "OK"
    assert os.stat(ro / "f").st_mode & 0o777 == 0o600


def test_chattr_ioctls_are_refused_in_the_filter_without_writable_trees(tmp_path):
    """A read-only policy has no supervisor: chattr's ioctls get EPERM from the filter, other ioctls work."""
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(tmp_path, 0o755)
    sb = Sandbox(Policy(fs_readable=[*SYSTEM_RO, str(tmp_path)]))
    before = snapshot(f)
    assert run(sb, f"p = {str(f)!r}\n{CHATTR}") == "EPERM"
    assert run(sb, f"p = {str(f)!r}\n{FSXATTR}") == "EPERM"
    assert snapshot(f) == before
    # FS_IOC_GETFLAGS (reading) is not touched by the rule
    assert run(sb, f"import fcntl\nfcntl.ioctl(os.open({str(f)!r}, os.O_RDONLY), {FS_IOC_GETFLAGS}, bytearray(8))") == "OK"


SYS_SETXATTRAT, SYS_REMOVEXATTRAT, SYS_FILE_SETATTR = 463, 466, 469
NEWER_CALLS = {
    # setxattrat(AT_FDCWD, p, 0, "user.sandlock", &{value, size, flags}, 16)
    "setxattrat": "v = ctypes.create_string_buffer(b'1'); a = struct.pack('=QII', ctypes.addressof(v), 1, 0)\n"
                  f"r = libc.syscall({SYS_SETXATTRAT}, -100, p.encode(), 0, b'user.sandlock', a, 16)",
    "removexattrat": f"r = libc.syscall({SYS_REMOVEXATTRAT}, -100, p.encode(), 0, b'user.keep')",
    # file_setattr(AT_FDCWD, p, &{xflags=NOATIME, ...}, 24, 0)
    "file_setattr": f"a = struct.pack('=QIIII', {FS_XFLAG_NOATIME}, 0, 0, 0, 0)\n"
                    f"r = libc.syscall({SYS_FILE_SETATTR}, -100, p.encode(), a, 24, 0)",
}


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="numbers checked for x86_64/aarch64")
@pytest.mark.parametrize("call", list(NEWER_CALLS))
def test_newest_metadata_syscalls_answer_enosys(env, call):
    """setxattrat/removexattrat (6.13) and file_setattr (6.17) change xattrs and chattr flags by path,
    past the guards of the classic calls: the filter answers ENOSYS, as an older kernel would."""
    sb, ro, rw = env
    for f in (ro / "f", rw / "f"):
        if xattrs_supported(f.parent):
            os.setxattr(f, "user.keep", b"1")
        before = snapshot(f)
        code = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n" + NEWER_CALLS[call]
                + "\nif r < 0: raise OSError(ctypes.get_errno(), '')")
        assert run(sb, f"p = {str(f)!r}\n{code}") == "ENOSYS", (call, f)
        assert snapshot(f) == before


def test_newest_metadata_syscalls_exist_on_this_kernel(tmp_path):
    """Guard for the test above: outside a sandbox this kernel knows them (EFAULT/EINVAL, not ENOSYS),
    so ENOSYS inside really comes from the filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    if tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2]) < (6, 17):
        pytest.skip("file_setattr needs Linux 6.17")
    for nr in (SYS_SETXATTRAT, SYS_REMOVEXATTRAT, SYS_FILE_SETATTR):
        assert libc.syscall(nr, -100, None, 0, None, 0, 0) == -1
        assert ctypes.get_errno() != 38, nr  # ENOSYS


def test_the_guarded_list_is_the_handler_table():
    """A read-only policy refuses GUARDED_CALLS without loading the handlers: the two must not drift."""
    from sandlock_core import metadata
    assert set(metadata.GUARDED_CALLS) == set(metadata.Metadata(Policy(fs_writable=["/tmp"])).handlers())
