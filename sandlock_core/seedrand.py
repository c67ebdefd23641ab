"""The in-process fast path of seeded randomness: ``_seedrand.so`` (built from ``csrc/seedrand.c``).

Under ``random_seed`` the sandbox preloads the library into every dynamically linked program (``LD_PRELOAD``,
after any the environment names). Its ``getrandom``/``getentropy`` draw one key per thread from the
supervisor and make the bytes with ChaCha20 in the process (``deterministic.py`` documents the stream), so
``os.urandom`` costs no supervisor round trip. Raw getrandom(2) calls and static programs keep the supervisor
path: determinism never depends on the preload.

Not preloaded (the supervisor path serves everything) where the library could not load, because ld.so would
print an error into the program's stderr: under ``chroot``, ``privileged`` or ``fs_isolation="overlayfs"`` (the
child's root is another tree, where this host path may not exist), when the library was not built, or when
its path has a character ``LD_PRELOAD`` cannot carry (space, colon).
"""
from __future__ import annotations

import os

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_seedrand.so")


def library(policy) -> str | None:
    """The library's path when ``policy``'s processes get it preloaded, else None."""
    if policy.random_seed is None:
        return None
    if policy.chroot is not None or policy.privileged or _overlayfs(policy):
        return None  # another root: the host path may not exist there
    if not _usable():
        return None
    if any(LIBRARY == d or LIBRARY.startswith(d.rstrip("/") + "/")
           for d in (os.path.realpath(str(p)) for p in policy.fs_denied)):
        return None  # refused to ld.so as to anyone else
    return LIBRARY


_USABLE: list[bool] = []


def _usable() -> bool:
    """Built, and at a path LD_PRELOAD can carry (checked once: a plan asks several times)."""
    if not _USABLE:
        _USABLE.append(os.path.isfile(LIBRARY) and not any(c in LIBRARY for c in " :\t\n"))
    return _USABLE[0]


def _overlayfs(policy) -> bool:
    from .policy_spec import FsIsolation
    return policy.fs_isolation is FsIsolation.OVERLAYFS


def add_to(env: dict[bytes, bytes], path: str) -> None:
    """Append ``path`` to ``env``'s LD_PRELOAD: a user's libraries stay, and come first (theirs win)."""
    mine = os.fsencode(path)
    old = env.get(b"LD_PRELOAD", b"")
    if mine in old.replace(b":", b" ").split():
        return
    env[b"LD_PRELOAD"] = old + b":" + mine if old.strip(b" :") else mine
