"""Fails on purpose, to show the denial report: pytest failing/ -rA"""
import socket
import subprocess

import pytest


@pytest.mark.sandbox(fs_readable=["/usr", "/lib"], net_connect=[443])
def test_reads_config_and_calls_home(tmp_path):
    cfg = subprocess.run(["cat", "/etc/hostname"], capture_output=True, text=True)
    try:
        socket.create_connection(("127.0.0.1", 8080), timeout=1)
    except OSError:
        pass
    (tmp_path / "ok.txt").write_text("tmp_path is writable")
    with open("/var/tmp/out.txt", "w") as f:
        f.write(cfg.stdout)
