"""The one place that knows local paths from remote ones (`gs://`, `s3://`, ...).

Every module reads and writes files through these functions; remote paths go through
`tf.io.gfile` (imported only when a remote path is used, so local work never loads
TensorFlow for I/O), local paths through the standard library.

    files.write_bytes(path, data)   # atomic: temp file + rename, readers never see half a file
    files.read_text(path)
    with files.open_read(path) as f: ...
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from typing import IO, Iterator


class RemoteError(OSError):
    """A remote file system could not be reached or refused the operation (no network,
    no credentials, a bucket that does not exist): one line, never TF's trace."""


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


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
        if not is_remote(path):
            return fn(path, *args, **kwargs)
        with _plain_errors(path):
            return fn(path, *args, **kwargs)
    return wrapper


def absolute(path: str) -> str:
    """Local paths made absolute (Orbax and other processes need them); remote unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


@_translated
def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


@_translated
def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


@_translated
def size(path: str) -> int:
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


@_translated
def listdir(path: str) -> list[str]:
    names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    if is_remote(path):
        for root, dirs, names in _gfile().walk(path):
            yield root, [d.rstrip("/") for d in dirs], list(names)
    else:
        yield from os.walk(path)


@_translated
def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


@_translated
def remove(path: str) -> None:
    """Removes a file or a whole folder."""
    if is_remote(path):
        gfile = _gfile()
        gfile.rmtree(path) if gfile.isdir(path) else gfile.remove(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def open_read(path: str) -> IO[bytes]:
    """A binary file object (seekable; remote files are read lazily)."""
    return _gfile().GFile(path, "rb") if is_remote(path) else open(path, "rb")


def open_write(path: str) -> IO[bytes]:
    """A binary file object for writing (not atomic: prefer `write_bytes`)."""
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent)
    return _gfile().GFile(path, "wb") if is_remote(path) else open(path, "wb")


@_translated
def rename(src: str, dst: str) -> None:
    """Renames a file or a folder (remote folders: copied file by file, then removed)."""
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
    with open_read(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


@_translated
def write_bytes(path: str, data: bytes) -> None:
    """Writes atomically: a reader (another process, a resumed run) sees the old file or the
    new one, never a partial one."""
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
