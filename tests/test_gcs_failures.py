"""gs:// failures end within the retry budget (LPT_GCS_RETRY_SECONDS) in one line that says what
the endpoint answered: nothing listening, a server that accepts and never answers, HTTP 503 on
every try, HTTP 403; and without credentials the client is anonymous. Loopback stand-ins only
(tests/gcs_emulator.py); no emulator needed, nothing leaves the machine."""

import os
import time

import pytest

from lpt_jax import cli
from lpt_jax.errors import RemoteError
from lpt_jax.storage import files, gcs

from gcs_emulator import Answering, Refusing, Stalled, free_port

BUDGET_S = 1.0


@pytest.fixture
def endpoint(monkeypatch):
    """Points gs:// at a URL (the test's stand-in), with a budget of BUDGET_S."""
    monkeypatch.setenv(gcs.RETRY_ENV, f"{BUDGET_S:g}")
    yield lambda url: monkeypatch.setenv(gcs.EMULATOR_ENV, url)
    files.configure_remote_libraries()  # forgets the tensorstore endpoint it derived


def _fails(call, error=RemoteError):
    """(one-line message, seconds) of `call()`, which must raise `error`."""
    t0 = time.monotonic()
    with pytest.raises(error) as err:
        call()
    line = cli.os_error_line(err.value)
    assert "\n" not in line and "Traceback" not in line, line
    return str(err.value), time.monotonic() - t0


def test_stalled_endpoint_fails_within_the_budget(endpoint):
    """Connections are accepted and never answered: one line after about the budget (not
    gcsfs's own six attempts), then at once while the endpoint counts as down."""
    stalled = Stalled(lifetime_s=30)
    try:
        endpoint(stalled.url)
        path = "gs://bucket/run/config.json"
        message, took = _fails(lambda: files.read_bytes(path))
        assert path in message and f"no answer within {BUDGET_S:g} s" in message, message
        assert stalled.url in message and gcs.RETRY_ENV in message
        assert BUDGET_S * 0.9 < took < BUDGET_S + 3, took
        message, took = _fails(lambda: files.write_bytes("gs://bucket/run/lease.json", b"{}"))
        assert "no answer within" in message and took < 0.5, took
        assert stalled.accepted  # it was reached, and held the connection
    finally:
        stalled.stop()


def test_unreachable_endpoint_fails_within_the_budget(endpoint):
    endpoint(f"http://127.0.0.1:{free_port()}")
    message, took = _fails(lambda: files.exists("gs://bucket/vit.npz"))
    assert "cannot reach Cloud Storage" in message and "connection refused" in message, message
    assert "tries in" in message and took < BUDGET_S + 3, took


def test_server_errors_are_retried_then_named(endpoint):
    """HTTP 503 on every try: retried for the budget, then the status in one line."""
    failing = Answering(503, "Service Unavailable")
    try:
        endpoint(failing.url)
        message, took = _fails(lambda: files.write_bytes("gs://bucket/x.json", b"{}"))
        assert "answered HTTP 503 (Service Unavailable)" in message, message
        assert "tries in" in message and took < BUDGET_S + 3, took
    finally:
        failing.stop()


def test_refused_access_is_a_permission_error_at_once(endpoint):
    refusing = Refusing()
    try:
        endpoint(refusing.url)
        message, took = _fails(lambda: files.read_text("gs://bucket/config.json"),
                               PermissionError)
        assert "access refused" in message and "gs://bucket/config.json" in message
        assert took < BUDGET_S, took  # a 403 is an answer: not retried
    finally:
        refusing.stop()


def test_bad_budget_is_one_line(monkeypatch):
    monkeypatch.setenv(gcs.RETRY_ENV, "ten")
    monkeypatch.setenv(gcs.EMULATOR_ENV, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RemoteError, match=f"{gcs.RETRY_ENV}='ten': expected a number"):
        files.exists("gs://bucket/x")
    assert os.environ[gcs.RETRY_ENV] == "ten"


def test_without_credentials_the_client_reads_anonymously(monkeypatch, tmp_path):
    """No Application Default Credentials (here: a credentials file that does not exist):
    the client is gcsfs's anonymous one, enough for public buckets such as gs://vit_models.
    Only the client is made: nothing is sent."""
    from lpt_jax.storage import gcs_client
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    client = gcs_client._new_client("")
    assert client.credentials.method == "anon" and client.credentials.credentials is None
    assert client._location == "https://storage.googleapis.com"
