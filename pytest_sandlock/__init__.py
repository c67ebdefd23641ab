"""pytest-sandlock: run tests, and every process they start, inside a Landlock + seccomp sandbox.

    @pytest.mark.sandbox(fs_readable=["/usr", "/lib"], fs_writable=["{tmp_path}"])
    def test_tool(tmp_path): ...

    pytest --sandlock-profile ci          # every test confined under a saved profile

The plugin lives in :mod:`pytest_sandlock.plugin` (entry point ``pytest11: sandlock``); the sandbox itself is
:mod:`sandlock_core`. See examples/pytest-demo/README.md for the user guide.
"""
from __future__ import annotations

try:
    from importlib.metadata import version as _version

    __version__ = _version("pytest-sandlock")
except Exception:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0+unknown"

__all__ = ["__version__"]
