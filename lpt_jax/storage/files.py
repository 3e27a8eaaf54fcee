"""The one place that knows local paths from remote ones.

Every module reads and writes files through these functions:
  * local paths: the standard library;
  * `gs://`: fsspec's gcsfs (lpt_jax/storage/gcs.py): production GCS with Application Default
    Credentials (anonymous without any), or the emulator that STORAGE_EMULATOR_HOST names;
    each operation bounded by LPT_GCS_RETRY_SECONDS (10), retries included;
  * any other URL scheme (`memory://`, ...): fsspec, generically (storage/fsspec_store.py);
    readable and writable, but no workdir (no exclusive create).
Errors are the OSError family, worded in one line: FileNotFoundError, PermissionError, and
`RemoteError` for a store that cannot be reached or refused the operation. A local path read
through the seam must be a regular file: a FIFO, a device or a socket (reading one blocks
forever or never ends) is `NotRegularFileError`, a folder IsADirectoryError, before it is read.

    files.write_bytes(path, data)   # atomic: readers never see half a file
    files.create_new(path, data)    # atomic create-if-absent (local disks and gs://)
    files.read_text(path)
    with files.open_read(path) as f: ...
    with files.recording() as created: ...   # what this block created, by name


Orbax reaches gs:// through its own libraries (etils.epath -> gcsfs for folders and metadata,
tensorstore for arrays): `configure_remote_libraries()` points them at the same endpoint
(docs/storage.md lists every gs:// path of the project and what reads it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from typing import IO, Iterator

from lpt_jax.errors import RemoteError
from lpt_jax.storage import fsspec_store, gcs, remote_libraries

configure_remote_libraries = remote_libraries.configure


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def _store(path: str):
    """The module for a remote `path`: gcs for gs://, fsspec_store for any other scheme."""
    return gcs if _is_gcs(path) else fsspec_store


# ------------------------------------------------------------------------------------------
# What an invocation created, by name: the undo of a failed start removes these and nothing
# else (another run may have written beside it meanwhile).

_recorders: list[list[str]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
    """The files and folders created through the seam inside the block, in creation order
    (a path that existed before is not created, whatever is written to it)."""
    created: list[str] = []
    _recorders.append(created)
    try:
        yield created
    finally:
        _recorders.remove(created)


def _note_new(path: str) -> bool:
    """Whether a recorder listens and `path` does not exist yet (then the caller records it
    with `_created` once it is written)."""
    return bool(_recorders) and not exists(path)


def _created(path: str) -> None:
    for created in _recorders:
        created.append(path)


def absolute(path: str) -> str:
    """Local paths made absolute (Orbax and other processes need them); remote unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _store(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _store(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def size(path: str) -> int:
    return _store(path).size(path) if is_remote(path) else os.path.getsize(path)


def mtime(path: str) -> float:
    """Last modification, seconds since the epoch (the store's clock)."""
    return _store(path).mtime(path) if is_remote(path) else os.path.getmtime(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return _store(path).listdir(path)
    return sorted(os.listdir(path))


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    if is_remote(path):
        yield from _store(path).walk(path)
    else:
        yield from os.walk(path)


def makedirs(path: str) -> None:
    """Creates a folder and its parents (gs:// has no folders: checks that the bucket
    exists, so a wrong bucket name is found before anything is written)."""
    if is_remote(path):
        _store(path).makedirs(path)
        return
    missing = []
    if _recorders:
        head = os.path.abspath(path)
        while head and not os.path.exists(head):
            missing.append(head)
            head = os.path.dirname(head)
    os.makedirs(path, exist_ok=True)
    for folder in reversed(missing):
        _created(folder)


def remove(path: str) -> None:
    """Removes a file or a whole folder."""
    if is_remote(path):
        _store(path).remove(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


class NotRegularFileError(OSError):
    """A local path that is a FIFO, a device or a socket where a file is to be read."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str:
    """What a non-regular file is, from its st_mode (for messages)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _check_mode(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, f"{kind_of(mode)}, not a regular file: refusing to "
                                  "read it (it may never end); give the path of a file", path)


def check_regular(path: str) -> None:
    """Raises NotRegularFileError (IsADirectoryError for a folder) if the local `path` (after
    symlinks) is there and is not a regular file; a missing path or a remote one passes (the
    read says what is wrong with it). One stat."""
    if is_remote(path):
        return
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    _check_mode(path, mode)


def _open_local(path: str) -> IO[bytes]:
    """A local regular file opened for reading; anything else refused before it is opened
    (opening a FIFO blocks until a writer comes), and again on the open descriptor (O_NONBLOCK
    until then), so a swap between the two cannot slip through."""
    check_regular(path)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere the stat above must do
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        _check_mode(path, os.fstat(fd).st_mode)
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_read(path: str) -> IO[bytes]:
    """A binary file object (seekable; remote files are read lazily, in ranges; local ones
    must be regular files: see `check_regular`)."""
    return _store(path).open_read(path) if is_remote(path) else _open_local(path)


def open_write(path: str) -> IO[bytes]:
    """A binary file object for writing (not atomic, except on gs://, where the object
    appears whole at close: prefer `write_bytes`)."""
    new = _note_new(path)
    if is_remote(path):
        f = _store(path).open_write(path)
    else:
        parent = os.path.dirname(path)
        if parent:
            makedirs(parent)
        f = open(path, "wb")
    if new:
        _created(path)
    return f


def rename(src: str, dst: str) -> None:
    """Renames a file or a folder (remote folders: copied file by file, then removed)."""
    if is_remote(src):
        _store(src).rename(src, dst)
    else:
        os.rename(src, dst)


def read_bytes(path: str) -> bytes:
    """The whole file (local: a regular file, see `check_regular`)."""
    if is_remote(path):
        return _store(path).read_bytes(path)
    with _open_local(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """Writes atomically: a reader (another process, a resumed run) sees the old file or the
    new one, never a partial one (gs://: one upload; local: a temporary file, fsync'd, then
    renamed over the name)."""
    new = _note_new(path)
    if is_remote(path):
        _store(path).write_bytes(path, data)
    else:
        parent = os.path.dirname(path)
        if parent:
            makedirs(parent)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique: two writers never share one
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # disk full, Ctrl-C ...: leave no half-written temp file
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
                raise OSError(e.errno, e.strerror, path) from None
            raise
        os.replace(tmp, path)
    if new:
        _created(path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def can_create_new(path: str) -> bool:
    """Whether `create_new` works where `path` is: local disks and gs://, not the other
    schemes (no exclusive create there)."""
    return _is_gcs(path) or not is_remote(path)


def create_new(path: str, data: bytes) -> bool:
    """Creates `path` holding `data`, complete and atomically, only if nothing has that name;
    False if something has. Local: a complete temp file hard-linked to the name (O_EXCL where
    hard links are not supported); gs://: an upload with the precondition ifGenerationMatch=0."""
    if _is_gcs(path):
        made = gcs.write_bytes(path, data, if_absent=True)
        if made:
            _created(path)
        return made
    if is_remote(path):
        raise RemoteError(path, "this store has no exclusive create (local folders and gs:// "
                          "have one)")
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        _created(path)
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
        _created(path)
        return True
    finally:
        os.remove(tmp)
