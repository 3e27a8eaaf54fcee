"""The gcsfs client behind the seam's gs:// paths, and the time and error policy of each
operation. Only lpt_jax/storage/gcs.py calls this module.

Endpoint and credentials come from the environment alone, never from code paths:
  * by default Cloud Storage itself, with Application Default Credentials (a TPU VM's service
    account, `gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS); without
    any, anonymously, which is enough for public buckets such as gs://vit_models;
  * STORAGE_EMULATOR_HOST=http://host:port: that emulator (fake-gcs-server in the tests).

Time: LPT_GCS_RETRY_SECONDS (default 10; 0 = one attempt) bounds how long one operation may
go without progress, retries included. The operation's deadline is that many seconds ahead,
and moves on each time one of its HTTP requests succeeds (most operations are one request: a
transfer is cut into requests of at most 8 MiB). Each try of a request waits for a connection
and for each part of the answer only until the deadline (at least 1 s), and is cancelled after
that wait plus the time its bytes need at 512 KiB/s up or 64 KiB/s down (a write that stalls
is otherwise invisible: a stalled 8 MiB upload ends within the budget + 16 s); a transient
failure (no connection, no answer, HTTP 408/429/5xx) is retried with backoff (0.25 s, doubling
to 2 s) only while the deadline is ahead. An operation that got no answer at all marks the
endpoint down for the budget's length: calls meanwhile fail at once instead of waiting again.
(gcsfs's own policy, six tries with up to 32 s between them and no deadline, is what Orbax's
gcsfs instance keeps.) Not bounded here: getting or refreshing the credentials (google-auth,
once an hour, with its own timeouts).

Errors are the OSError family, one line each, naming the path: FileNotFoundError (no such
object; the caller says whether the bucket is missing), PermissionError (HTTP 401/403, with
what to check), RemoteError (no answer, or any other refusal: what the endpoint answered).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import re
import socket
import threading
import time
from typing import Optional

from absl import logging

from lpt_jax.errors import RemoteError
from lpt_jax.storage import remote_libraries

RETRY_ENV = "LPT_GCS_RETRY_SECONDS"
DEFAULT_RETRY_S = 10.0
EMULATOR_ENV = remote_libraries.EMULATOR_ENV
UPLOAD_RATE = 512 << 10            # bytes/s: a request sending its bytes slower than this fails
DOWNLOAD_RATE = 64 << 10           # bytes/s: the same for reading (a stall ends sooner, below)
CHUNK = 8 << 20                    # the most bytes one request moves (uploads and reads)
_MIN_WAIT_S = 1.0                  # the shortest wait for an answer (also with a budget of 0)
_FIRST_DELAY_S, _MAX_DELAY_S = 0.25, 2.0


def retry_budget() -> float:
    """Seconds that one operation may take to get its answers, retries included."""
    raw = os.environ.get(RETRY_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_RETRY_S
    except ValueError:
        raise RemoteError(f"{RETRY_ENV}={raw!r}: expected a number of seconds "
                          f"(default {DEFAULT_RETRY_S:g})") from None
    if value < 0:
        raise RemoteError(f"{RETRY_ENV}={raw!r}: expected seconds >= 0")
    return value


def _emulator() -> str:
    host = os.environ.get(EMULATOR_ENV, "").strip()
    return host if not host or "://" in host else f"http://{host}"


def endpoint() -> str:
    return _emulator() or "https://storage.googleapis.com"


# ------------------------------------------------------------------------------------------
# One operation: its deadline, and what the endpoint last answered.

class _Operation:
    def __init__(self, budget: float, download: int):
        self.budget, self.download, self.start = budget, download, time.monotonic()
        self.deadline = self.start + budget
        self.last: Optional[BaseException] = None
        self.tries, self.waits = 0, (0.0, 0.0)  # the last try's (answer wait, whole-try cap)

    def wait(self) -> float:
        return max(self.deadline - time.monotonic(), _MIN_WAIT_S)

    def next_try(self, data) -> float:
        """Counts a try of a request that sends `data`; how long that try may take."""
        sent = (len(data) if isinstance(data, (bytes, bytearray, str)) else
                data.nbytes if isinstance(data, memoryview) else
                data.getbuffer().nbytes if hasattr(data, "getbuffer") else 0)
        wait = self.wait()
        cap = wait + (sent / UPLOAD_RATE if sent else self.download / DOWNLOAD_RATE)
        self.tries, self.waits = self.tries + 1, (wait, cap)
        return cap


_current: contextvars.ContextVar = contextvars.ContextVar("lpt_gcs_operation", default=None)


def _transient(err: BaseException) -> bool:
    from gcsfs.retry import is_retriable
    return is_retriable(err) or isinstance(err, (asyncio.TimeoutError, ConnectionError))


@functools.cache
def _client_class():
    import aiohttp
    from gcsfs.core import GCSFileSystem
    one_try = getattr(GCSFileSystem._request, "__wrapped__", GCSFileSystem._request)

    class Client(GCSFileSystem):
        """gcsfs with this module's time policy in place of its own retries."""

        @property
        def requests_timeout(self):
            op = _current.get()
            if op is None:
                return None
            wait = op.wait()
            return aiohttp.ClientTimeout(connect=wait, sock_connect=wait, sock_read=wait)

        @requests_timeout.setter
        def requests_timeout(self, value):
            pass  # gcsfs's constructor sets one; each operation has its own

        async def _request(self, method, path, *args, **kwargs):
            op, delay = _current.get(), _FIRST_DELAY_S
            if op is None:
                return await one_try(self, method, path, *args, **kwargs)
            while True:
                try:
                    answer = await asyncio.wait_for(one_try(self, method, path, *args, **kwargs),
                                                    op.next_try(kwargs.get("data")))
                    op.deadline = max(op.deadline, time.monotonic() + op.budget)  # progress
                    return answer
                except Exception as e:  # noqa: BLE001 - re-raised unless retried
                    if not _transient(e):
                        raise
                    op.last = e
                    if time.monotonic() + delay >= op.deadline:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, _MAX_DELAY_S)
    return Client


_clients: dict = {}
_lock = threading.Lock()


def client():
    """The client for the endpoint the environment names now (one per process)."""
    remote_libraries.configure()  # before gcsfs is imported (its zonal-bucket probe)
    emulator = _emulator()
    key = (os.getpid(), emulator)
    with _lock:
        if key not in _clients:
            _clients[key] = _new_client(emulator)
        return _clients[key]


def _new_client(emulator: str):
    from google.auth import exceptions as auth_exceptions
    make = functools.partial(_client_class(), skip_instance_cache=True, consistency="md5",
                             use_listings_cache=False, endpoint_url=emulator or None)
    if emulator:
        return make(token="anon")
    try:
        return make(token="google_default")
    except (auth_exceptions.GoogleAuthError, ValueError):
        logging.info("no Google credentials found: reading gs:// anonymously (public buckets "
                     "only)")
        return make(token="anon")


# ------------------------------------------------------------------------------------------
# Running an operation.

_down: dict[str, tuple[float, str]] = {}  # endpoint -> (down until, why)


def call(path: str, fn, *args, missing_ok: bool = False, transfer: int = 0, **kwargs):
    """`await fn(client, *args, **kwargs)` on fsspec's event loop as one operation (module
    docstring) whose requests without a body each read up to `transfer` bytes; its failures
    as one-line OSErrors about `path`. No such object: None if `missing_ok`, else
    FileNotFoundError."""
    from fsspec.asyn import sync
    where = endpoint()
    with _lock:
        until, why = _down.get(where, (0.0, ""))
    if time.monotonic() < until:
        raise RemoteError(path, why)
    fs, op = client(), _Operation(retry_budget(), transfer)
    outcome: dict = {}

    async def operation():
        _current.set(op)  # seen by every request of this task (Client._request)
        try:
            outcome["value"] = await fn(fs, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - translated below, off the event loop
            outcome["error"] = e
    sync(fs.loop, operation)
    if "value" in outcome:
        return outcome["value"]
    err = outcome["error"]
    if isinstance(err, FileNotFoundError):
        if missing_ok:
            return None
        raise FileNotFoundError(2, "no such object in Cloud Storage", str(path)) from None
    raise _translate(path, err, op) from None


def _unreachable(path: str, what: str, op: _Operation, remember: bool) -> RemoteError:
    tries = f"{op.tries} {'try' if op.tries == 1 else 'tries'}"
    why = (f"cannot reach Cloud Storage at {endpoint()}: {what} ({tries} in "
           f"{time.monotonic() - op.start:.1f} s); check the network"
           + (f" and {EMULATOR_ENV}" if _emulator() else "")
           + f", or allow longer with {RETRY_ENV}=<seconds> (now {op.budget:g})")
    if remember and op.budget > 0:
        with _lock:
            _down[endpoint()] = (time.monotonic() + op.budget, why)
    return RemoteError(path, why)


def _no_answer(err: BaseException) -> bool:
    """Whether `err` means that no HTTP answer came (no connection, none in time)."""
    import aiohttp
    import requests
    from google.auth import exceptions as auth_exceptions
    if isinstance(err, requests.exceptions.ProxyError):  # how gcsfs raises an HTTP 502
        return False
    return isinstance(err, (aiohttp.ClientConnectionError, asyncio.TimeoutError,
                            ConnectionError, requests.exceptions.ConnectionError,
                            requests.exceptions.Timeout, auth_exceptions.TransportError))


def _describe(err: BaseException, op: _Operation) -> str:
    """What the endpoint answered, in a few words."""
    import aiohttp
    import requests
    from gcsfs.retry import HttpError
    if isinstance(err, aiohttp.ClientConnectorError):
        cause = err.os_error
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"unknown host {err.host}"
        return f"no connection ({getattr(cause, 'strerror', None) or cause})"
    if isinstance(err, asyncio.TimeoutError):  # aiohttp's wait for an answer, or the try's cap
        waited = op.waits[0] if isinstance(err, aiohttp.ServerTimeoutError) else op.waits[1]
        return f"no answer within {waited:{'.0f' if waited >= 3 else '.2g'}} s"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the connection was closed without an answer"
    if isinstance(err, requests.exceptions.ProxyError):
        return "HTTP 502 (bad gateway)"
    if isinstance(err, HttpError):
        message = re.sub(rf",\s*{err.code}$", "", str(err.message or "").strip())
        return f"HTTP {err.code}" + (f" ({_short(message)})" if message else "")
    return f"{type(err).__name__}: {_short(str(err))}"


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return (text[:300] + " ...") if len(text) > 300 else text


def _translate(path: str, err: BaseException, op: _Operation) -> OSError:
    """A failure of gcsfs as one of the OSError family about `path`."""
    from gcsfs.retry import ChecksumError, HttpError, NonRetryableError
    from google.auth import exceptions as auth_exceptions
    if isinstance(err, FileExistsError):  # HTTP 412: the precondition failed
        return FileExistsError(17, "an object has this name", str(path))
    if isinstance(err, OSError) and str(err).startswith("Forbidden"):  # gcsfs's HTTP 403
        said = _short(str(err).partition("\n")[2]) or "HTTP 403"
        return PermissionError(13, f"access refused ({said}): check that the account of this "
                               "machine (gcloud auth list, or the TPU VM's service account) "
                               "may read and write this bucket", str(path))
    if _no_answer(err):
        return _unreachable(path, _describe(err, op), op, remember=True)
    if (isinstance(err, (NonRetryableError, auth_exceptions.GoogleAuthError))
            or (isinstance(err, HttpError) and err.code == 401)):
        return PermissionError(13, f"the Google credentials cannot be used ("
                               f"{_describe(err, op)}): run `gcloud auth application-default "
                               "login` or fix GOOGLE_APPLICATION_CREDENTIALS", str(path))
    if isinstance(err, ChecksumError):
        return RemoteError(path, "the upload arrived damaged (its MD5 differs): write it again")
    if isinstance(err, HttpError) or (
            isinstance(err, ValueError) and str(err).startswith("Bad Request")):
        said = (_describe(err, op) if isinstance(err, HttpError) else
                f"HTTP 400 ({_short(str(err).partition(chr(10))[2])})")
        retried = (f" ({op.tries} tries in {time.monotonic() - op.start:.1f} s)"
                   if op.tries > 1 else "")
        return RemoteError(path, f"Cloud Storage at {endpoint()} answered {said}{retried}")
    if isinstance(err, OSError) or _transient(err):
        return RemoteError(path, _describe(err, op))
    raise err  # not a storage failure: a bug, with its own traceback
