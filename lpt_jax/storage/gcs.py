"""`gs://` paths for the file seam (lpt_jax.files), through Google's Cloud Storage client
(google-cloud-storage). Only files.py calls this module.

Endpoint and credentials come from the environment alone, never from code paths:
  * by default Cloud Storage itself, with Application Default Credentials (a TPU VM's service
    account, `gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS); without
    any, anonymously, which is enough for public buckets such as gs://vit_models;
  * STORAGE_EMULATOR_HOST=http://host:port: an emulator (fake-gcs-server in the tests).
`files.configure_remote_libraries` points the libraries that reach gs:// on their own (Orbax's
etils.epath -> gcsfs, tensorstore) at the same endpoint.

Errors are the OSError family, one line each, naming the path: FileNotFoundError (no such
object, or no such bucket), PermissionError (HTTP 401/403, with what to check),
RemoteError (unreachable, or any other refusal). Transient failures (connection errors,
HTTP 408/429/5xx) are retried with backoff for at most LPT_GCS_RETRY_SECONDS per operation
(default 10; 0 = one attempt). An endpoint that stayed unreachable for a whole budget counts as
down for the next budget's length: calls meanwhile fail at once instead of waiting again.

Writes are single uploads (a reader sees the old object or the new one, never part of one);
`write_bytes(..., if_absent=True)` creates only if no object has the name (the precondition
ifGenerationMatch=0), which the workdir lease relies on.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from typing import Callable, Iterator, Optional

from absl import logging

from lpt_jax.errors import RemoteError

RETRY_ENV = "LPT_GCS_RETRY_SECONDS"
DEFAULT_RETRY_S = 10.0
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_READ_TIMEOUT_S = 120.0            # per HTTP read; a stalled transfer is then retried
_down: dict[str, tuple[float, str]] = {}  # endpoint -> (down until, why)
_lock = threading.Lock()


def retry_budget() -> float:
    """Seconds that one operation may spend retrying transient failures."""
    raw = os.environ.get(RETRY_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_RETRY_S
    except ValueError:
        raise RemoteError(f"{RETRY_ENV}={raw!r}: expected a number of seconds "
                          f"(default {DEFAULT_RETRY_S:g})") from None
    if value < 0:
        raise RemoteError(f"{RETRY_ENV}={raw!r}: expected seconds >= 0")
    return value


def endpoint() -> str:
    return os.environ.get(EMULATOR_ENV, "").strip() or "https://storage.googleapis.com"


def split(path: str) -> tuple[str, str]:
    """('bucket', 'key/without/trailing/slash') of gs://bucket/key/."""
    rest = str(path)[len("gs://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise RemoteError(f"{path}: a gs:// path needs a bucket name (gs://bucket/...)")
    return bucket, key.strip("/")


# ------------------------------------------------------------------------------------------
# Client, retries, errors.

_local = threading.local()  # one client per thread: a requests.Session is not thread-safe


def _client():
    """This thread's client for the endpoint the environment names now."""
    clients = _local.__dict__.setdefault("clients", {})
    emulator = os.environ.get(EMULATOR_ENV, "")
    if emulator not in clients:
        from google.auth import exceptions as auth_exceptions
        from google.cloud import storage
        try:
            clients[emulator] = storage.Client(project=None)  # objects need no project
        except auth_exceptions.DefaultCredentialsError:
            logging.info("no Google credentials found: reading gs:// anonymously (public "
                         "buckets only)")
            clients[emulator] = storage.Client.create_anonymous_client()
    return clients[emulator]


def _retry():
    budget = retry_budget()
    if budget <= 0:
        return None
    from google.cloud.storage.retry import DEFAULT_RETRY
    return DEFAULT_RETRY.with_timeout(budget).with_delay(initial=0.25, maximum=2.0,
                                                         multiplier=2.0)


def _timeout() -> tuple[float, float]:
    return (min(max(retry_budget(), 1.0), 10.0), _READ_TIMEOUT_S)


def _unreachable(err: BaseException) -> bool:
    """Whether `err` says the endpoint could not be reached at all (no HTTP answer)."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth_exceptions
    if isinstance(err, api.RetryError):
        err = err.cause or err
    return isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError,
                            auth_exceptions.TransportError))


def _first_line(err: BaseException) -> str:
    """The service's own message when the answer holds one (not the request's URL)."""
    text = " ".join(str(getattr(err, "message", "") or err).split())
    said = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', text)
    text = said.group(1) if said else re.sub(r"^[A-Z]+ \S+: ", "", text)
    return (text[:300] + " ...") if len(text) > 300 else text or type(err).__name__


def call(path: str, fn: Callable, *, missing_ok: bool = False):
    """fn() with the errors of the Cloud Storage client as one-line OSErrors about `path`;
    NotFound gives None if `missing_ok`."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth_exceptions
    where = endpoint()
    with _lock:
        until, why = _down.get(where, (0.0, ""))
    if time.time() < until:
        raise RemoteError(path, why)
    try:
        return fn()
    except api.NotFound:
        if missing_ok:
            return None
        require_bucket(path)  # a missing bucket is worth saying
        raise FileNotFoundError(2, "no such object in Cloud Storage", str(path)) from None
    except (api.Forbidden, api.Unauthorized) as e:
        raise PermissionError(13, f"access refused ({_first_line(e)}): check that the account "
                              "of this machine (gcloud auth list, or the TPU VM's service "
                              "account) may read and write this bucket", str(path)) from None
    except auth_exceptions.RefreshError as e:
        raise PermissionError(13, f"the Google credentials cannot be used ({_first_line(e)}): "
                              "run `gcloud auth application-default login` or fix "
                              "GOOGLE_APPLICATION_CREDENTIALS", str(path)) from None
    except Exception as e:  # noqa: BLE001 - every other client failure becomes one line
        if not _unreachable(e) and not isinstance(e, (api.GoogleAPIError,
                                                      auth_exceptions.GoogleAuthError)):
            raise
        if _unreachable(e):
            budget = retry_budget()
            cause = e.cause if isinstance(e, api.RetryError) and e.cause else e
            why = (f"cannot reach Cloud Storage at {where} (retried {budget:g} s; "
                   f"{type(cause).__name__}): check the network"
                   + (f" and {EMULATOR_ENV}" if os.environ.get(EMULATOR_ENV) else "")
                   + f", or allow longer retries with {RETRY_ENV}=<seconds>")
            with _lock:
                _down[where] = (time.time() + budget, why)
            raise RemoteError(path, why) from None
        raise RemoteError(path, _first_line(e)) from None


def _bucket(name: str):
    return _client().bucket(name)


def _blob(path: str):
    bucket, key = split(path)
    return _bucket(bucket).blob(key)


_known_buckets: set = set()  # (endpoint, bucket) seen to exist: buckets do not go away


def _bucket_known(name: str) -> bool:
    """Whether the bucket exists (True also when this account may not ask: a 403 on the
    bucket itself says nothing about its objects)."""
    if (endpoint(), name) in _known_buckets:
        return True
    try:
        found = bool(call(f"gs://{name}", lambda: _bucket(name).exists(
            retry=_retry(), timeout=_timeout())))
    except PermissionError:
        found = True
    if found:
        _known_buckets.add((endpoint(), name))
    return found


def require_bucket(path: str) -> None:
    bucket, _ = split(path)
    if not _bucket_known(bucket):
        raise FileNotFoundError(2, f"the bucket gs://{bucket} does not exist: check the path, "
                                f"or create the bucket (gcloud storage buckets create "
                                f"gs://{bucket})", str(path))


# ------------------------------------------------------------------------------------------
# Operations (paths are full gs:// paths).

def _prefix(path: str) -> tuple[str, str]:
    bucket, key = split(path)
    return bucket, (f"{key}/" if key else "")


def _list(path: str, *, delimiter: Optional[str] = None, max_results: Optional[int] = None):
    """(blobs, sub-prefixes) under the folder `path`; ([], []) if its bucket does not exist."""
    bucket, prefix = _prefix(path)

    def run():
        pages = _client().list_blobs(bucket, prefix=prefix, delimiter=delimiter,
                                     max_results=max_results, retry=_retry(),
                                     timeout=_timeout())
        blobs = list(pages)
        return blobs, sorted(pages.prefixes)
    return call(path, run, missing_ok=True) or ([], [])


def isdir(path: str) -> bool:
    bucket, key = split(path)
    if not key:
        return _bucket_known(bucket)
    return bool(_list(path, max_results=1)[0])


def exists(path: str) -> bool:
    _, key = split(path)
    if key and call(path, lambda: _blob(path).exists(retry=_retry(), timeout=_timeout())):
        return True
    return isdir(path)


def _metadata(path: str):
    blob = call(path, lambda: _bucket(split(path)[0]).get_blob(
        split(path)[1], retry=_retry(), timeout=_timeout()), missing_ok=True)
    if blob is None:
        raise FileNotFoundError(2, "no such object in Cloud Storage", str(path))
    return blob


def size(path: str) -> int:
    return int(_metadata(path).size)


def mtime(path: str) -> float:
    return _metadata(path).updated.timestamp()


def listdir(path: str) -> list[str]:
    blobs, prefixes = _list(path, delimiter="/")
    _, prefix = _prefix(path)
    names = [b.name[len(prefix):] for b in blobs if b.name != prefix]
    names += [p[len(prefix):].rstrip("/") for p in prefixes]
    if not names and not isdir(path):
        raise FileNotFoundError(2, "no such folder in Cloud Storage", str(path))
    return sorted(names)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """Like os.walk, top-down, from one listing of every object under `path`."""
    root = str(path).rstrip("/")
    blobs, _ = _list(path)
    _, prefix = _prefix(path)
    folders: dict[str, tuple[set, list]] = {}
    for blob in blobs:
        parts = blob.name[len(prefix):].split("/")
        for depth in range(len(parts)):
            here = "/".join(parts[:depth])
            entry = folders.setdefault(here, (set(), []))
            if depth == len(parts) - 1:
                if parts[-1]:  # a name ending in '/' is a folder placeholder
                    entry[1].append(parts[-1])
            else:
                entry[0].add(parts[depth])
    for here in sorted(folders):
        dirs, names = folders[here]
        yield (f"{root}/{here}" if here else root), sorted(dirs), sorted(names)


def makedirs(path: str) -> None:
    """Buckets have no folders: only the bucket must exist."""
    require_bucket(path)


def remove(path: str) -> None:
    """Removes an object, or every object under a folder."""
    if split(path)[1] and call(path, lambda: _blob(path).delete(
            retry=_retry(), timeout=_timeout()) or True, missing_ok=True):
        return
    blobs, _ = _list(path)
    if not blobs:
        raise FileNotFoundError(2, "no such object or folder in Cloud Storage", str(path))
    for blob in blobs:
        call(path, lambda b=blob: b.delete(retry=_retry(), timeout=_timeout()),
             missing_ok=True)


def read_bytes(path: str) -> bytes:
    return call(path, lambda: _blob(path).download_as_bytes(retry=_retry(),
                                                            timeout=_timeout()))


def write_bytes(path: str, data: bytes, *, if_absent: bool = False) -> bool:
    """Uploads `data` as one object; with `if_absent`, only if the name is free (returns
    False if an object has it)."""
    from google.api_core import exceptions as api

    def upload():
        try:
            _blob(path).upload_from_string(
                data, content_type="application/octet-stream",
                if_generation_match=0 if if_absent else None, retry=_retry(),
                timeout=_timeout())
            return True
        except api.PreconditionFailed:
            return False
    return call(path, upload)  # a 404 here means a missing bucket, and says so


def rename(src: str, dst: str) -> None:
    """Copies the object (or every object under the folder) to `dst`, then deletes the
    originals. Not atomic for folders: a reader may see both for a moment."""
    dst_bucket, dst_key = split(dst)
    src_bucket, src_key = split(src)
    single = call(src, lambda: _bucket(src_bucket).get_blob(src_key, retry=_retry(),
                                                            timeout=_timeout()),
                  missing_ok=True) if src_key else None
    blobs = [single] if single is not None else _list(src)[0]
    if not blobs:
        raise FileNotFoundError(2, "no such object or folder in Cloud Storage", str(src))
    target = _bucket(dst_bucket)
    for blob in blobs:
        name = dst_key + blob.name[len(src_key):]
        call(dst, lambda b=blob, n=name: b.bucket.copy_blob(
            b, target, n, retry=_retry(), timeout=_timeout()))
    for blob in blobs:
        call(src, lambda b=blob: b.delete(retry=_retry(), timeout=_timeout()),
             missing_ok=True)


class _Reader(io.RawIOBase):
    """A seekable read-only view of one object generation: each read is one ranged GET
    (wrapped in a BufferedReader by `open_read`), so a large .npz streams member by member."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        meta = _metadata(path)
        self.blob, self.size, self.pos = meta, int(meta.size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        # Pinned to the generation measured at open: a replaced object is an error, never
        # a mix of two files.
        data = call(self.path, lambda: self.blob.download_as_bytes(
            start=self.pos, end=self.pos + n - 1, if_generation_match=self.blob.generation,
            checksum=None, retry=_retry(), timeout=_timeout()))
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_read(path: str) -> io.BufferedReader:
    return io.BufferedReader(_Reader(path), buffer_size=8 << 20)


class _Writer(io.BytesIO):
    """Collects the bytes in memory and uploads them as one object on close."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            write_bytes(self.path, data)

    def __exit__(self, kind, *rest):
        if kind is not None:  # the writer failed: upload nothing rather than part of a file
            super().close()
        return super().__exit__(kind, *rest)


def open_write(path: str) -> io.BytesIO:
    return _Writer(path)
