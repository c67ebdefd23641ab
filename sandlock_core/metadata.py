"""Metadata changes (chmod, chown, utimes, xattrs, chattr flags) only under ``fs_writable``.

Landlock has no access right for these: a sandbox whose policy lists only read-only trees could otherwise
change the mode, owner, times and xattrs of any file its uid may change (as root: ``chmod 0777 /etc/shadow``),
outside every tree, and of ``fs_denied`` files. So the supervisor does them on behalf of the child:

- the path is copied once and resolved to an O_PATH fd in the child's view (its cwd or dirfd as the base,
  ``RESOLVE_NO_MAGICLINKS`` so /proc/self links cannot reach the supervisor's fds; no-follow variants open the
  last component with O_NOFOLLOW); an fd argument is duplicated from the child (pidfd_getfd);
- that very object is judged: its resolved name must lie under a writable tree and not be denied;
- the change is made on that fd, on a thread carrying the sandbox's Landlock domain. A flipped path string or
  a swapped symlink changes nothing: what is judged is what is changed.

chattr's ioctls (``FS_IOC_SETFLAGS``, ``FS_IOC_FSSETXATTR``: immutable, append-only, noatime...) ask the kernel
only for inode ownership, so a read-only tree does not stop them either. They reach the supervisor through an
argument filter on ioctl (other ioctls are not notified); the argument is copied once and the ioctl runs on a
duplicate of the child's fd. The newest calls that change the same things by path (``setxattrat``,
``removexattrat``, ``file_setattr``: Linux 6.13/6.17) are answered ENOSYS, as an older kernel would: programs
fall back to the calls above.

Permissions: the supervisor runs with the caller's uid, as does the child, so DAC outcomes match (as root,
CAP_FOWNER/CAP_CHOWN apply to both alike). Limitation: times and xattrs of a symlink itself (no-follow on a
symlink) are refused with EOPNOTSUPP, as chmod of a symlink is by Linux. Under ``confine()`` there is no
supervisor: these syscalls are then refused outright (EPERM), in the writable trees too.
"""
from __future__ import annotations

import errno

from . import seccomp, syscalls

# Bytes the kernel reads behind each chattr ioctl's argument (FS_IOC_SETFLAGS reads an int although its
# number says long, and so does FS_IOC_SETVERSION; struct fsxattr is 28 bytes).
FILEATTR_ARG_SIZE = {seccomp.FS_IOC_SETFLAGS: 4, seccomp.FS_IOC32_SETFLAGS: 4, seccomp.FS_IOC_FSSETXATTR: 28,
                     seccomp.FS_IOC_SETVERSION: 4, seccomp.FS_IOC32_SETVERSION: 4}
# Newer syscalls that change xattrs / file attributes by path: answered "no such call" (see the docstring).
NEWER_METADATA_CALLS = ("setxattrat", "removexattrat", "file_setattr")
# Every syscall the guard handles (Metadata.handlers() has exactly these keys; a test checks it). A
# read-only policy refuses them in the filter from this list alone, without loading the handlers.
GUARDED_CALLS = (
    "chmod", "fchmodat", "fchmodat2", "fchmod", "chown", "lchown", "fchownat", "fchown", "utime", "utimes",
    "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr",
)
HINT = "add its directory to fs_writable"


def __getattr__(name):  # ``from .metadata import Metadata`` loads the handlers on demand
    if name == "Metadata":
        from .metadata_guard import Metadata
        return Metadata
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(builder) -> None:
    for name in NEWER_METADATA_CALLS:
        builder.answer_errno(name, errno.ENOSYS)
    if not builder.supervised or not (builder.policy.fs_writable or builder.policy.workdir):
        # No supervisor to do them on behalf (confine()), or nothing is writable so no change is ever
        # allowed: refuse them in the filter, which keeps a read-only policy free of any supervisor.
        for name in GUARDED_CALLS:
            nr = syscalls.number(name, builder.arch)
            if nr is not None:
                builder.extra_deny[nr] = errno.EPERM
        builder.fileattr_ioctl = "deny"
        return
    from .fsdeny import Opener
    from .metadata_guard import Metadata
    md = Metadata(builder.policy)
    md.in_root = getattr(builder, "pidns", False)
    for name, handler in md.handlers().items():
        builder.notify(name, handler)  # False: this arch has no such syscall
    builder.fileattr_ioctl = md.fileattr_ioctl

    def on_supervisor(sup):
        opener = sup.state["metadata.opener"] = Opener(builder.ruleset_fd)
        sup.on_close(opener.close)

    builder.on_supervisor(on_supervisor)
