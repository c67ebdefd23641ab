"""The cffi bindings: struct layouts match the running kernel, errors surface as OSError with errno."""
import errno
import os

import pytest

from sandlock_core import _sys
from sandlock_core._native import ffi


def test_notif_struct_sizes_match_the_kernel():
    notif, resp, data = _sys.notif_sizes()
    assert ffi.sizeof("struct seccomp_notif") == notif
    assert ffi.sizeof("struct seccomp_data") == data
    assert resp == 24  # struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}


def test_landlock_abi_is_reported():
    assert _sys.landlock_abi_version() >= 1


def test_errors_are_oserror_with_errno():
    with pytest.raises(OSError) as exc:
        _sys.pidfd_open(-5)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        _sys.landlock_restrict_self(-1)
    assert exc.value.errno in (errno.EBADF, errno.EPERM)


def test_process_vm_readv_reads_own_memory():
    buf = ffi.new("char[]", b"sandlock!")
    addr = int(ffi.cast("uintptr_t", buf))
    assert _sys.process_vm_readv(os.getpid(), addr, 8) == b"sandlock"


def test_pidfd_getfd_duplicates_a_child_fd():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.read(os.open("/dev/zero", os.O_RDONLY), 0)
        import time
        time.sleep(5)
        os._exit(0)
    try:
        pidfd = _sys.pidfd_open(pid)
        dup = _sys.pidfd_getfd(pidfd, w)
        os.write(dup, b"x")
        assert os.read(r, 1) == b"x"
        os.close(dup)
        os.close(pidfd)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
