"""``import_module`` without the ``importlib`` package, whose import pulls in ``warnings`` (CLI start-up).

    from . import _imports as importlib   # instead of: import importlib
"""
from __future__ import annotations

import sys


def import_module(name: str):
    """The module ``name`` (an absolute, dotted name), imported if it was not yet."""
    __import__(name)
    return sys.modules[name]
