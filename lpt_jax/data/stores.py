"""Image stores: random access from an example index to what the decoder needs.

A store's `fetch` is called once per step with all indices of that step (inside
`tf.numpy_function`), so Python work is per batch, never per pixel. What it
returns depends on `kind`:
  'path'   full file paths (bytes); tf.data reads them with `tf.io.read_file`.
  'bytes'  encoded images (JPEG/PNG/...) held in memory or a random-access source.
  'pixels' decoded uint8 images (n, h, w, 3) of one fixed size held in memory.
"""

import hashlib
import os

import numpy as np


def _digest(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


class FileStore:
    """Images as files under a root: local, or any scheme `tf.io.read_file` reads (gs://)."""

    kind = "path"

    def __init__(self, root: str, rel_paths):
        root = root.rstrip("/")
        self._paths = np.array([f"{root}/{p}".encode("utf-8") for p in rel_paths], dtype=object)

    def __len__(self):
        return len(self._paths)

    def fetch(self, indices: np.ndarray) -> np.ndarray:
        return self._paths[indices]

    def describe(self, index: int) -> str:
        return self._paths[index].decode("utf-8")

    def content_digest(self):
        """sha256 of every file's size, in order (-1: unreadable), for a local root; None
        for a remote one (one request per image would be its cost)."""
        first = self._paths[0].decode("utf-8") if len(self._paths) else ""
        if "://" in first:
            return None
        sizes = np.empty(len(self._paths), np.int64)
        for i, p in enumerate(self._paths):
            try:
                sizes[i] = os.stat(p).st_size
            except OSError:
                sizes[i] = -1
        return _digest(sizes)


class BytesStore:
    """Encoded images packed in one uint8 buffer (the prepared format, loaded to RAM)."""

    kind = "bytes"

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, names):
        self._buffer = buffer
        self._offsets = offsets  # (n + 1,) int64, image i is buffer[offsets[i]:offsets[i + 1]]
        self._names = names

    def __len__(self):
        return len(self._offsets) - 1

    def fetch(self, indices: np.ndarray) -> np.ndarray:
        o = self._offsets
        return np.array([self._buffer[o[i]:o[i + 1]].tobytes() for i in indices], dtype=object)

    def describe(self, index: int) -> str:
        return str(self._names[index])

    def content_digest(self) -> str:
        return _digest(np.diff(self._offsets))  # every packed image's size


class PixelStore:
    """Decoded uint8 images of one size held in memory (CIFAR)."""

    kind = "pixels"

    def __init__(self, images: np.ndarray, names):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"PixelStore wants uint8 (n, h, w, 3), got {images.dtype} {images.shape}")
        self._images = images
        self._names = names

    @property
    def pixel_shape(self) -> tuple:
        return tuple(self._images.shape[1:])

    def __len__(self):
        return len(self._images)

    def fetch(self, indices: np.ndarray) -> np.ndarray:
        return self._images[indices]

    def content_digest(self) -> str:
        return _digest(self._images)

    def describe(self, index: int) -> str:
        return str(self._names[index])


class RandomAccessStore:
    """A random-access record source, e.g. `tfds.data_source` with SkipDecoding images."""

    kind = "bytes"

    def __init__(self, records, image_key: str, label: str):
        self._records = records
        self._key = image_key
        self._label = label  # e.g. 'i_naturalist2018[train]', for messages
        self._batched = _supports_getitems(records)

    def __len__(self):
        return len(self._records)

    def read_records(self, indices) -> list:
        indices = [int(i) for i in indices]
        if self._batched:
            return list(self._records.__getitems__(indices))
        return [self._records[i] for i in indices]

    def fetch(self, indices: np.ndarray) -> np.ndarray:
        return np.array([r[self._key] for r in self.read_records(indices)], dtype=object)

    def describe(self, index: int) -> str:
        record_id = ""
        try:
            rid = self._records[int(index)].get("id")
            if rid is not None:
                rid = np.asarray(rid).item()
                record_id = f", id {rid.decode() if isinstance(rid, bytes) else rid}"
        except Exception:  # a description must never raise
            pass
        return f"{self._label} record {int(index)}{record_id}"


def _supports_getitems(records) -> bool:
    """Batched reads when the source has a working `__getitems__` (array_record has)."""
    getitems = getattr(records, "__getitems__", None)
    if getitems is None or len(records) == 0:
        return False
    try:
        getitems([0])
        return True
    except Exception:  # e.g. a mock without it
        return False
