"""The one place that knows local paths from remote ones.

Every module reads and writes files through these functions:
  * local paths: the standard library;
  * `gs://`: Google's Cloud Storage client (lpt_jax/gcs.py, imported at the first gs:// path):
    production GCS with Application Default Credentials, or the emulator that
    STORAGE_EMULATOR_HOST names; transient failures retried for LPT_GCS_RETRY_SECONDS (10);
  * any other scheme (`ram://`, ...): `tf.io.gfile` (imported only then).
Errors are the OSError family, worded in one line: FileNotFoundError, PermissionError, and
`RemoteError` for a store that cannot be reached or refused the operation.

    files.write_bytes(path, data)   # atomic: readers never see half a file
    files.create_new(path, data)    # atomic create-if-absent (local disks and gs://)
    files.read_text(path)
    with files.open_read(path) as f: ...

Orbax reaches gs:// through its own libraries (etils.epath for folders and metadata,
tensorstore for arrays): `configure_remote_libraries()` points them at the same endpoint
(docs/storage.md lists every gs:// path of the project and what reads it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import uuid
from typing import IO, Iterator

from lpt_jax.errors import RemoteError


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def _gcs():
    from lpt_jax.storage import gcs
    configure_remote_libraries()
    return gcs


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


# ------------------------------------------------------------------------------------------
# The libraries that reach gs:// on their own.

_TENSORSTORE_URL = "TENSORSTORE_GCS_HTTP_URL"
_mapped_tensorstore_url = None


def configure_remote_libraries() -> None:
    """Makes Orbax's gs:// traffic take the seam's endpoint (idempotent; cheap):

    * etils.epath (Orbax's folders and metadata) uses TensorFlow's GCS client whenever
      TensorFlow is installed, and that client cannot be pointed at an emulator:
      EPATH_USE_TF=false makes it use fsspec's gcsfs, which honours STORAGE_EMULATOR_HOST and
      uses Application Default Credentials. gcsfs's listing cache is turned off, so a listing
      always shows the bucket as it is (as TF's did), and its experimental zonal-bucket
      probe (a gRPC call to the real control plane, even under an emulator) is turned off.
    * tensorstore (Orbax's arrays) reads its endpoint from TENSORSTORE_GCS_HTTP_URL: set from
      STORAGE_EMULATOR_HOST, so one variable moves all of the program to an emulator.
    A value the user set for any of these variables is kept."""
    global _mapped_tensorstore_url
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if "EPATH_USE_TF" not in os.environ:
        os.environ["EPATH_USE_TF"] = "false"
        gpath = sys.modules.get("etils.epath.gpath")
        tf_check = getattr(gpath, "_is_tf_installed", None)
        if hasattr(tf_check, "cache_clear"):
            tf_check.cache_clear()  # decided before the variable was set: decide again
    for name in ("gcsfs", "fsspec"):  # an INFO line for every file Orbax opens
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import fsspec.config
        fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    current = os.environ.get(_TENSORSTORE_URL)
    if emulator and (current is None or current == _mapped_tensorstore_url):
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ[_TENSORSTORE_URL] = _mapped_tensorstore_url = url
    elif not emulator and current is not None and current == _mapped_tensorstore_url:
        del os.environ[_TENSORSTORE_URL]  # the emulator is gone: back to GCS
        _mapped_tensorstore_url = None


# ------------------------------------------------------------------------------------------
# gfile (schemes other than gs://): its errors as the OSError family.

@contextlib.contextmanager
def _plain_errors(path: str):
    """TF's file-system errors as the standard OSError family, worded in one line."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only tf.errors.* are translated
        if not type(e).__module__.startswith("tensorflow"):
            raise
        detail = " ".join(str(getattr(e, "message", e)).split())
        if type(e).__name__ == "NotFoundError":
            raise FileNotFoundError(2, "not found", str(path)) from None
        if type(e).__name__ == "PermissionDeniedError":
            raise PermissionError(13, detail, str(path)) from None
        raise RemoteError(f"{path}: {detail}") from None


def _translated(fn):
    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        if not is_remote(path) or _is_gcs(path):
            return fn(path, *args, **kwargs)
        with _plain_errors(path):
            return fn(path, *args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------------------
# The seam.

def absolute(path: str) -> str:
    """Local paths made absolute (Orbax and other processes need them); remote unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


@_translated
def exists(path: str) -> bool:
    if _is_gcs(path):
        return _gcs().exists(path)
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


@_translated
def isdir(path: str) -> bool:
    if _is_gcs(path):
        return _gcs().isdir(path)
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


@_translated
def size(path: str) -> int:
    if _is_gcs(path):
        return _gcs().size(path)
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


@_translated
def mtime(path: str) -> float:
    """Last modification, seconds since the epoch (the store's clock)."""
    if _is_gcs(path):
        return _gcs().mtime(path)
    return _gfile().stat(path).mtime_nsec / 1e9 if is_remote(path) else os.path.getmtime(path)


@_translated
def listdir(path: str) -> list[str]:
    if _is_gcs(path):
        return _gcs().listdir(path)
    names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    if _is_gcs(path):
        yield from _gcs().walk(path)
    elif is_remote(path):
        for root, dirs, names in _gfile().walk(path):
            yield root, [d.rstrip("/") for d in dirs], list(names)
    else:
        yield from os.walk(path)


@_translated
def makedirs(path: str) -> None:
    """Creates a folder and its parents (gs:// has no folders: checks that the bucket
    exists, so a wrong bucket name is found before anything is written)."""
    if _is_gcs(path):
        _gcs().makedirs(path)
    elif is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


@_translated
def remove(path: str) -> None:
    """Removes a file or a whole folder."""
    if _is_gcs(path):
        _gcs().remove(path)
    elif is_remote(path):
        gfile = _gfile()
        gfile.rmtree(path) if gfile.isdir(path) else gfile.remove(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def open_read(path: str) -> IO[bytes]:
    """A binary file object (seekable; remote files are read lazily)."""
    if _is_gcs(path):
        return _gcs().open_read(path)
    return _gfile().GFile(path, "rb") if is_remote(path) else open(path, "rb")


def open_write(path: str) -> IO[bytes]:
    """A binary file object for writing (not atomic, except on gs://, where the object
    appears whole at close: prefer `write_bytes`)."""
    if _is_gcs(path):
        return _gcs().open_write(path)
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent)
    return _gfile().GFile(path, "wb") if is_remote(path) else open(path, "wb")


@_translated
def rename(src: str, dst: str) -> None:
    """Renames a file or a folder (remote folders: copied file by file, then removed)."""
    if _is_gcs(src):
        _gcs().rename(src, dst)
        return
    if not is_remote(src):
        os.rename(src, dst)
        return
    gfile = _gfile()
    if not gfile.isdir(src):
        gfile.rename(src, dst)
        return
    for root, _, names in walk(src):
        target = dst + root[len(src.rstrip("/")):]
        gfile.makedirs(target)
        for name in names:
            gfile.copy(os.path.join(root, name), os.path.join(target, name))
    gfile.rmtree(src)


@_translated
def read_bytes(path: str) -> bytes:
    if _is_gcs(path):
        return _gcs().read_bytes(path)
    with open_read(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


@_translated
def write_bytes(path: str, data: bytes) -> None:
    """Writes atomically: a reader (another process, a resumed run) sees the old file or the
    new one, never a partial one."""
    if _is_gcs(path):  # one upload: an object appears whole or not at all
        _gcs().write_bytes(path, data)
        return
    tmp = f"{path}.tmp"
    try:
        with open_write(tmp) as f:
            f.write(data)
            if not is_remote(path):
                f.flush()
                os.fsync(f.fileno())
    except BaseException:  # disk full, Ctrl-C ...: leave no half-written temp file behind
        with contextlib.suppress(OSError):
            if exists(tmp):
                remove(tmp)
        raise
    if is_remote(path):
        _gfile().rename(tmp, path, overwrite=True)
    else:
        os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def can_create_new(path: str) -> bool:
    """Whether `create_new` works where `path` is: local disks and gs://, not gfile's other
    schemes (no exclusive create there)."""
    return _is_gcs(path) or not is_remote(path)


def create_new(path: str, data: bytes) -> bool:
    """Creates `path` holding `data`, complete and atomically, only if nothing has that name;
    False if something has. Local: a complete temp file hard-linked to the name (O_EXCL where
    hard links are not supported); gs://: an upload with the precondition ifGenerationMatch=0."""
    if _is_gcs(path):
        return _gcs().write_bytes(path, data, if_absent=True)
    if is_remote(path):
        raise RemoteError(path, "this store has no exclusive create")
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        os.remove(tmp)
