"""A small project's test suite for learn mode: fixtures, tmp_path, git, a loopback HTTP server."""
import http.server
import json
import os
import pathlib
import subprocess
import threading
import urllib.request

HERE = pathlib.Path(__file__).parent
DATA = pathlib.Path(os.environ.get("LEARN_DEMO_DATA", HERE / "fixtures" / "shared.txt"))


def test_reads_fixture():
    data = json.loads((HERE / "fixtures" / "config.json").read_text())
    assert data["name"] == "demo"


def test_reads_shared_data():
    assert DATA.read_text().strip() == "shared"


def test_writes_tmp_path(tmp_path):
    out = tmp_path / "out" / "result.txt"
    out.parent.mkdir()
    out.write_text("ok")
    assert out.read_text() == "ok"


def test_spawns_git(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    assert (tmp_path / "repo" / ".git").is_dir()


def test_loopback_http():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=10) as r:
            assert r.read() == b"hello"
    finally:
        server.shutdown()
        server.server_close()
