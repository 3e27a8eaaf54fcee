"""Flat {name: array} weight files in numpy's formats (`.npz`, structured `.npy`), local or
remote, read member by member and never unpickled; and the identity of a big file."""

from __future__ import annotations

import functools
import hashlib
import zipfile
from typing import IO, Mapping

import ml_dtypes
import numpy as np

from lpt_jax.errors import CheckpointError, RemoteError, Setting
from lpt_jax.storage import files


def open_weights(path: str) -> IO[bytes]:
    """`files.open_read(path)`; a missing or unopenable file is a one-line `CheckpointError`."""
    try:
        if not files.exists(path):  # remote files open lazily: ask first
            raise CheckpointError(f"checkpoint not found: {path}", path=path)
        return files.open_read(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}", path=path) from None
    except RemoteError as e:
        raise CheckpointError(
            f"cannot reach {path} ({e}); without network, download it once where there is "
            "one (e.g. gsutil cp) and point ", Setting("backbone.checkpoint"),
            " at the local copy", path=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror or e}",
                              path=path) from None


_MIB = 1 << 20


_BLOCK = 8 * _MIB


def file_fingerprint(path: str) -> dict:
    """Identity of a (possibly huge, possibly remote) file, streamed in 8 MiB blocks:
    ``{"path", "size", "sha256", "sha256_head_tail"}``: the sha256 of the whole content, and
    the sha256 of its first and last MiB that exports written before the whole-file hash
    record (they are still compared by it). Computed once per file and process."""
    open_weights(path).close()  # a missing or unreadable file: one CheckpointError
    return dict(_fingerprint(path, files.size(path), files.mtime(path)))


@functools.lru_cache(maxsize=8)  # keyed on size and mtime: a rewritten file is hashed again
def _fingerprint(path: str, size: int, mtime: float) -> tuple:
    whole = hashlib.sha256()
    head = tail = b""
    with open_weights(path) as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            whole.update(block)
            if len(head) < _MIB:
                head += block[:_MIB - len(head)]
            tail = (tail + block)[-_MIB:]
    if size <= _MIB:
        tail = b""  # head_tail of a small file is its content once (as it always was)
    elif size <= 2 * _MIB:
        tail = tail[-(size - _MIB):]  # the bytes after the head
    return (("path", path), ("size", size), ("sha256", whole.hexdigest()),
            ("sha256_head_tail", hashlib.sha256(head + tail).hexdigest()))


def fix_dtype(a: np.ndarray) -> np.ndarray:
    """bfloat16 arrays as float32: numpy cannot name bfloat16 (np.save writes it as 2-byte
    void), so reinterpret, then widen."""
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        a = a.view(ml_dtypes.bfloat16)
    if a.dtype == ml_dtypes.bfloat16:
        a = a.astype(np.float32)
    return a


def read_npz(path: str) -> dict[str, np.ndarray]:
    """A flat {name: array} dict from an .npz (or structured .npy), never unpickling.

    The .npz is read member by member straight from the (local or `gs://`) file object, so
    peak host memory stays at the checkpoint's size (1.0x measured for ViT-B/16, see
    benchmarks/results/backbone_load_memory.md); reading a remote file into bytes first
    would cost 3x."""
    f = open_weights(path)
    try:
        loaded = np.load(f, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # .npy: only a structured array can hold a tree
            if loaded.dtype.names is None:
                raise CheckpointError(
                    f"{path} holds a single {loaded.dtype} array of shape {loaded.shape}, "
                    "not a parameter tree: save checkpoints with np.savez", path=path)
            record = loaded.reshape(-1)[0]
            return {k: fix_dtype(np.array(record[k])) for k in loaded.dtype.names}
        with loaded:
            return {k: fix_dtype(loaded[k]) for k in loaded.files}
    except CheckpointError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({msg})",
                              path=path) from None
    finally:
        f.close()


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez member by member (views are written without a full copy)."""
    with files.open_write(path) as f:
        np.savez(f, **arrays)
