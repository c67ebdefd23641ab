"""fs_isolation=OVERLAYFS: kernel OverlayFS in an unprivileged user + mount namespace (not wired yet)."""
from __future__ import annotations

from .errors import PolicyError


def install(builder) -> None:
    raise PolicyError("fs_isolation=overlayfs is not supported by this build yet; use the default seccomp "
                      "copy-on-write (fs_isolation='none')")
