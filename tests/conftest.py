import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(params=["namespace", "supervised"])
def pid_mode(request, monkeypatch):
    """Run an isolate_pids test in both implementations: the pid namespace (where the kernel allows it) and
    the supervised fallback (forced through SANDLOCK_PIDS_SUPERVISED, which subprocesses inherit too)."""
    if request.param == "supervised":
        monkeypatch.setenv("SANDLOCK_PIDS_SUPERVISED", "1")
    else:
        monkeypatch.delenv("SANDLOCK_PIDS_SUPERVISED", raising=False)
        from sandlock_core.plan import pidns_usable
        if not pidns_usable():
            pytest.skip("this kernel refuses a user + pid namespace with its own /proc here: isolate_pids uses "
                        "the supervised mode")
    return request.param
