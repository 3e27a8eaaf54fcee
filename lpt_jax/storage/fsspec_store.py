"""Paths of other URL schemes (`memory://`, `s3://` where s3fs is installed, ...): through
fsspec, generically. Only files.py calls this module.

Enough to read a backbone or an export from such a store, or to write one there; not for a
workdir, whose lease needs an exclusive create (lpt_jax/run/lease.py accepts local folders and
gs:// only). A write is one `pipe_file`: atomic as far as the store's single write is.
Errors are the OSError family, one line each, naming the path."""

from __future__ import annotations

import contextlib
from typing import IO, Iterator

from lpt_jax.errors import RemoteError


def _fs(path: str):
    """(file system, its path) for the URL `path`."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:
        raise RemoteError(path, f"no file system for this kind of path ({' '.join(str(e).split())})"
                          ) from None


@contextlib.contextmanager
def _errors(path: str):
    """The store's failures as the OSError family, worded in one line about `path`."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(2, "not found", str(path)) from None
    except PermissionError as e:
        raise PermissionError(13, f"access refused ({' '.join(str(e).split())})",
                              str(path)) from None
    except RemoteError:
        raise
    except OSError as e:
        raise RemoteError(path, " ".join(str(e).split()) or type(e).__name__) from None


def _call(path: str, method: str, *args, **kwargs):
    fs, p = _fs(path)
    with _errors(path):
        return getattr(fs, method)(p, *args, **kwargs)


def exists(path: str) -> bool:
    return _call(path, "exists")


def isdir(path: str) -> bool:
    return _call(path, "isdir")


def size(path: str) -> int:
    return int(_call(path, "size"))


def mtime(path: str) -> float:
    return _call(path, "modified").timestamp()


def listdir(path: str) -> list[str]:
    if not isdir(path):
        raise FileNotFoundError(2, "no such folder", str(path))
    here = _fs(path)[1].rstrip("/")
    return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in _call(path, "ls", detail=False)
                  if n.rstrip("/") != here)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    fs, p = _fs(path)
    with _errors(path):
        for root, dirs, names in fs.walk(p):  # roots as `path` was written: scheme://...
            yield str(path).rstrip("/") + root.rstrip("/")[len(p.rstrip("/")):], dirs, names


def makedirs(path: str) -> None:
    _call(path, "makedirs", exist_ok=True)


def remove(path: str) -> None:
    if not exists(path):
        raise FileNotFoundError(2, "not found", str(path))
    _call(path, "rm", recursive=True)


def open_read(path: str) -> IO[bytes]:
    return _call(path, "open", "rb")


def open_write(path: str) -> IO[bytes]:
    return _call(path, "open", "wb")


def rename(src: str, dst: str) -> None:
    _call(src, "mv", _fs(dst)[1], recursive=True)


def read_bytes(path: str) -> bytes:
    return _call(path, "cat_file")


def write_bytes(path: str, data: bytes) -> None:
    _call(path, "pipe_file", bytes(data))
