"""A ``sandlock`` command that starts Python without ``site``: ``python -m sandlock_core.launcher BIN/sandlock``.

Why: the console script pip writes starts ``#!/path/python`` with ``site``, which runs the code of every .pth
file of the environment (setuptools' distutils hack, coverage's subprocess hook), imports sitecustomize and
more: ~3-4 ms of every ``sandlock run`` on this project's machine, a sixth of all it adds to a command. pip
cannot put an interpreter flag in a console script (its wheel installer rewrites ``#!python -S`` to
``#!/path/python``), so this is a separate step, taken by scripts/bootstrap.sh after its ``pip install``.

The launcher's shebang is ``#!<this python> -S``; it appends to ``sys.path`` the directories that ``site`` added
when the launcher was written (site-packages and the path entries of .pth files, whose code it does not run),
so PYTHONPATH still comes first, as with ``site``. If ``sandlock_core`` or cffi's backend cannot be imported
from there (the environment changed since), it runs ``site.main()`` and imports again: the usual start-up.
A later ``pip install`` of the package puts pip's own script back (correct, only slower).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# The kernel reads at most this much of a "#!" line (BINPRM_BUF_SIZE); a longer one would be cut.
MAX_SHEBANG = 255

TEMPLATE = '''\
#!{python} -S
# The `sandlock` command, written by `python -m sandlock_core.launcher` (scripts/bootstrap.sh). Python
# starts without `site` (see sandlock_core/launcher.py); sys.path gets the directories `site` added when
# this file was written, after PYTHONPATH's.
import sys
own = len(sys.path)
sys.path.extend({paths!r})
try:
    import _cffi_backend
    from sandlock_core.cli import main
except ImportError:  # the environment changed since: start as usual
    del sys.path[own:]
    for name in [m for m in sys.modules if m.partition(".")[0] == "sandlock_core"]:
        del sys.modules[name]
    import site
    site.main()
    from sandlock_core.cli import main
if __name__ == "__main__":
    sys.exit(main())
'''


def site_paths(python: str) -> list[str]:
    """The entries ``site`` puts on ``python``'s sys.path (PYTHONPATH and the like left out: -E)."""
    probe = "import json, sys; print(json.dumps(sys.path[1:]))"
    with_site, without = (
        json.loads(subprocess.run([python, "-E", *flags, "-c", probe], check=True, capture_output=True,
                                  text=True).stdout)
        for flags in ((), ("-S",)))
    return [p for p in with_site if p not in without]


def script_text(python: str, paths: list[str]) -> str:
    if any(c.isspace() for c in python) or len(f"#!{python} -S") > MAX_SHEBANG:
        raise ValueError(f"{python!r} cannot be a '#!' interpreter (whitespace, or longer than {MAX_SHEBANG})")
    return TEMPLATE.format(python=python, paths=paths)


def write(path: str, python: str | None = None) -> None:
    """Replace ``path`` (pip's ``sandlock`` script) with the launcher, atomically."""
    python = python or sys.executable
    text = script_text(python, site_paths(python))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sandlock_core.launcher BIN/sandlock")
    try:
        write(sys.argv[1])
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"sandlock_core.launcher: {exc}; pip's script stays")
