"""``sandlock check``: what this kernel and environment support, and what breaks without it."""
from __future__ import annotations

import errno
import os
import platform
import signal

from . import _sys


def _probe_pidfd_getfd() -> tuple[bool, str]:
    """Can we duplicate a child's fd? (Docker's default seccomp profile blocks pidfd_getfd.)"""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        pidfd = _sys.pidfd_open(pid)
        try:
            os.close(_sys.pidfd_getfd(pidfd, 0))
            return True, "on-behalf network and file operations work"
        except OSError as exc:
            return False, f"{errno.errorcode.get(exc.errno, exc.errno)}: net_allow_hosts, port_remap and " \
                          "fs_denied need it (in Docker: --cap-add SYS_PTRACE or a custom seccomp profile)"
        finally:
            os.close(pidfd)
    except OSError as exc:
        return False, f"pidfd_open: {exc.strerror}"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _probe_userns() -> tuple[bool, str]:
    path = "/proc/sys/user/max_user_namespaces"
    try:
        with open(path) as f:
            n = int(f.read())
    except OSError:
        return False, "cannot read " + path
    return n > 0, "OverlayFS COW and chroot need unprivileged user namespaces"


def rows() -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []
    abi = _sys.landlock_abi_version()
    out.append(("architecture", platform.machine() in ("x86_64", "aarch64"), platform.machine()))
    out.append(("Landlock", abi > 0, f"ABI {abi}" if abi else "missing or disabled: no filesystem confinement"))
    try:
        from . import landlock
        out.extend(landlock.describe_features(abi))
    except Exception:  # pragma: no cover - landlock module unavailable
        pass
    seccomp_ok = _sys.seccomp_action_avail(0x7FC00000)
    out.append(("seccomp user notification", seccomp_ok, "supervisor features (fs_denied, limits, ...)"))
    try:
        sizes = _sys.notif_sizes()
        out.append(("notification structs", sizes == (80, 24, 64), "kernel sizes %s" % (sizes,)))
    except OSError as exc:
        out.append(("notification structs", False, exc.strerror))
    ok, note = _probe_pidfd_getfd()
    out.append(("pidfd_getfd", ok, note))
    ok, note = _probe_userns()
    out.append(("user namespaces", ok, note))
    return out


def report() -> str:
    lines = ["sandlock check", ""]
    table = rows()
    width = max(len(name) for name, _, _ in table)
    for name, ok, note in table:
        lines.append(f"  {name:<{width}}  {'yes' if ok else 'NO ':<3}  {note}")
    return "\n".join(lines) + "\n"
