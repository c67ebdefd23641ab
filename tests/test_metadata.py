"""metadata: chmod, chown, utimes and xattrs are done on behalf, and only under fs_writable."""
from __future__ import annotations

import os
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


def snapshot(p):
    st = os.stat(p)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, sorted(os.listxattr(p))


OPS = {
    "chmod": "os.chmod(p, 0o644)",
    "chown": f"os.chown(p, -1, {os.getgid()})" if os.getuid() else "os.chown(p, 1, 1)",
    "utime": "os.utime(p, (5, 5))",
    "setxattr": "os.setxattr(p, 'user.sandlock', b'1')",
    "fchmod": "fd = os.open(p, os.O_RDONLY); os.fchmod(fd, 0o644)",
    "relative": "os.chdir(os.path.dirname(p)); os.chmod(os.path.basename(p), 0o644)",
    "dirfd": "d = os.open(os.path.dirname(p), os.O_RDONLY); os.chmod(os.path.basename(p), 0o644, dir_fd=d)",
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
