"""``getLogger`` for modules on ``sandlock run``'s path: ``import logging`` costs ~5 ms of every CLI start
(it imports re, traceback, string, weakref), and these modules log only when something fails.

    from . import _lazylog as logging   # instead of: import logging
    log = logging.getLogger("sandlock.notif")

The logger it returns imports ``logging`` at its first use and forwards to ``logging.getLogger(name)``, so
handlers, levels and records are exactly those of the real logger of that name.
"""
from __future__ import annotations


class _Logger:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        import logging
        return getattr(logging.getLogger(self.name), attr)

    def __repr__(self) -> str:
        return f"<lazy logger {self.name!r}>"


def getLogger(name: str) -> _Logger:  # noqa: N802 - the logging module's spelling
    return _Logger(name)
