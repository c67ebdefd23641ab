"""A module-level marker confines every test in the file."""
import socket

import pytest

pytestmark = pytest.mark.sandbox(net_bind=[0], net_connect=[], isolate_ipc=True, isolate_signals=True)


def test_can_bind_an_ephemeral_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def test_cannot_signal_the_pytest_process():
    import os
    with pytest.raises(PermissionError):
        os.kill(os.getppid(), 0)
