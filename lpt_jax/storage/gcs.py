"""`gs://` paths for the file seam (lpt_jax/storage/files.py), through fsspec's gcsfs (the
library Orbax's etils.epath uses for the same buckets). Only files.py calls this module.

gcsfs gives the endpoint (STORAGE_EMULATOR_HOST), the credentials, the HTTP session and
Cloud Storage's JSON API; lpt_jax/storage/gcs_client.py adds the time budget of each operation
(LPT_GCS_RETRY_SECONDS) and words every failure as one line naming the path.

A write is one upload (gcsfs `pipe_file`: one request up to 8 MiB, a resumable upload in
8 MiB requests above; the object appears only when its upload completes, so a reader sees the
old object or the new one, never part of one; gcsfs checks the MD5 that Cloud Storage
reports); `write_bytes(...,
if_absent=True)` creates only if no object has the name (`mode="create"`: the precondition
ifGenerationMatch=0), which the workdir lease relies on. `open_read` is seekable and reads
ranges, each pinned to the generation the object had at open: an object replaced while it is
read is an error, never a mix of two files.
"""

from __future__ import annotations

import asyncio
import datetime
import io
from typing import Iterator, Optional

from lpt_jax.errors import RemoteError
from lpt_jax.storage.gcs_client import CHUNK, EMULATOR_ENV, RETRY_ENV, call  # noqa: F401

BLOCK = CHUNK            # open_read's buffer, and the most one ranged read fetches
_DELETE_BATCH = 32       # deletes of one folder that run as one operation


def split(path: str) -> tuple[str, str]:
    """('bucket', 'key/without/trailing/slash') of gs://bucket/key/."""
    rest = str(path)[len("gs://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise RemoteError(f"{path}: a gs:// path needs a bucket name (gs://bucket/...)")
    return bucket, key.strip("/")


# ------------------------------------------------------------------------------------------
# Requests (coroutines run by gcs_client.call; `fs` is the gcsfs client).

async def _get_bucket(fs, bucket):
    return await fs._call("GET", "b/{}", bucket, json_out=True)


async def _get_object(fs, bucket, key):
    return await fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True)


async def _list(fs, bucket, prefix, delimiter, max_results):
    items, prefixes, token = [], set(), None
    while True:
        page = await fs._call("GET", "b/{}/o", bucket, json_out=True, prefix=prefix or None,
                              delimiter=delimiter, maxResults=max_results, pageToken=token)
        items += page.get("items", [])
        prefixes.update(page.get("prefixes", []))
        token = page.get("nextPageToken")
        if not token or (max_results and items):
            return items, sorted(prefixes)


async def _delete(fs, bucket, key):
    await fs._call("DELETE", "b/{}/o/{}", bucket, key)
    return True


async def _delete_all(fs, bucket, keys):
    async def one(key):
        try:
            await _delete(fs, bucket, key)
        except FileNotFoundError:
            pass  # gone meanwhile (or an earlier try of this delete landed)
    await asyncio.gather(*(one(k) for k in keys))


async def _read_range(fs, bucket, key, generation, start, length):
    _, data = await fs._call("GET", "b/{}/o/{}", bucket, key, alt="media",
                             generation=generation,
                             headers={"Range": f"bytes={start}-{start + length - 1}"})
    return data


async def _upload(fs, bucket, key, data, mode):
    await fs._pipe_file(f"{bucket}/{key}", data, chunksize=CHUNK, mode=mode)
    return True


async def _copy(fs, bucket, key, dst_bucket, dst_key):
    await fs._cp_file(f"{bucket}/{key}", f"{dst_bucket}/{dst_key}")
    return True


# ------------------------------------------------------------------------------------------
# Buckets.

_known_buckets: set = set()  # (endpoint, bucket) seen to exist: buckets do not go away


def _bucket_known(name: str) -> bool:
    """Whether the bucket exists (True also when this account may not ask: a 403 on the
    bucket itself says nothing about its objects)."""
    from lpt_jax.storage.gcs_client import endpoint
    if (endpoint(), name) in _known_buckets:
        return True
    try:
        found = call(f"gs://{name}", _get_bucket, name, missing_ok=True) is not None
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


def _missing(path: str) -> FileNotFoundError:
    """No such object (or folder) at `path`, saying so when its bucket is what is missing."""
    require_bucket(path)
    return FileNotFoundError(2, "no such object in Cloud Storage", str(path))


# ------------------------------------------------------------------------------------------
# Operations (paths are full gs:// paths).

def _objects(path: str, *, delimiter: Optional[str] = None,
             max_results: Optional[int] = None) -> tuple[list, list]:
    """(objects, sub-prefixes) under the folder `path`; ([], []) if its bucket is missing."""
    bucket, key = split(path)
    prefix = f"{key}/" if key else ""
    return call(path, _list, bucket, prefix, delimiter, max_results, missing_ok=True) or ([], [])


def _metadata(path: str) -> Optional[dict]:
    bucket, key = split(path)
    return call(path, _get_object, bucket, key, missing_ok=True) if key else None


def isdir(path: str) -> bool:
    bucket, key = split(path)
    if not key:
        return _bucket_known(bucket)
    return bool(_objects(path, max_results=1)[0])


def exists(path: str) -> bool:
    return _metadata(path) is not None or isdir(path)


def _object(path: str) -> dict:
    meta = _metadata(path)
    if meta is None:
        raise FileNotFoundError(2, "no such object in Cloud Storage", str(path))
    return meta


def size(path: str) -> int:
    return int(_object(path)["size"])


def mtime(path: str) -> float:
    updated = _object(path)["updated"].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(updated).timestamp()


def listdir(path: str) -> list[str]:
    items, prefixes = _objects(path, delimiter="/")
    _, key = split(path)
    prefix = f"{key}/" if key else ""
    names = [o["name"][len(prefix):] for o in items if o["name"] != prefix]
    names += [p[len(prefix):].rstrip("/") for p in prefixes]
    if not names and not isdir(path):
        raise FileNotFoundError(2, "no such folder in Cloud Storage", str(path))
    return sorted(names)


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """Like os.walk, top-down, from one listing of every object under `path`."""
    root = str(path).rstrip("/")
    items, _ = _objects(path)
    _, key = split(path)
    prefix = f"{key}/" if key else ""
    folders: dict[str, tuple[set, list]] = {}
    for item in items:
        parts = item["name"][len(prefix):].split("/")
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


def _delete_objects(path: str, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), _DELETE_BATCH):
        call(path, _delete_all, bucket, keys[i:i + _DELETE_BATCH])


def remove(path: str) -> None:
    """Removes an object, or every object under a folder."""
    bucket, key = split(path)
    if key and call(path, _delete, bucket, key, missing_ok=True):
        return
    items, _ = _objects(path)
    if not items:
        raise FileNotFoundError(2, "no such object or folder in Cloud Storage", str(path))
    _delete_objects(path, bucket, [o["name"] for o in items])


def write_bytes(path: str, data: bytes, *, if_absent: bool = False) -> bool:
    """Uploads `data` as one object; with `if_absent`, only if the name is free (returns
    False if an object has it)."""
    bucket, key = split(path)
    if not key:
        raise RemoteError(path, "a bucket is no file: name an object in it")
    try:
        done = call(path, _upload, bucket, key, bytes(data),
                    "create" if if_absent else "overwrite", missing_ok=True,
                    transfer=len(data))
    except FileExistsError:
        return False
    if done is None:  # 404 on an upload: the bucket is missing
        raise _missing(path)
    return True


def rename(src: str, dst: str) -> None:
    """Copies the object (or every object under the folder) to `dst`, then deletes the
    originals. Not atomic for folders: a reader may see both for a moment."""
    src_bucket, src_key = split(src)
    dst_bucket, dst_key = split(dst)
    single = _metadata(src)
    items = [single] if single is not None else _objects(src)[0]
    if not items:
        raise FileNotFoundError(2, "no such object or folder in Cloud Storage", str(src))
    for item in items:
        name = item["name"]
        if call(dst, _copy, src_bucket, name, dst_bucket, dst_key + name[len(src_key):],
                missing_ok=True) is None and not _bucket_known(dst_bucket):
            raise _missing(dst)
    _delete_objects(src, src_bucket, [o["name"] for o in items])


class _Reader(io.RawIOBase):
    """A seekable read-only view of one object generation, read by ranged GETs of at most
    BLOCK bytes (wrapped in a BufferedReader of BLOCK bytes by `open_read`), so a large .npz
    streams member by member."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.bucket, self.key = split(path)
        meta = _object(path)
        self.size, self.generation, self.pos = int(meta["size"]), meta["generation"], 0

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

    def _fetch(self, length: int) -> bytes:
        data = call(self.path, _read_range, self.bucket, self.key, self.generation, self.pos,
                    length, missing_ok=True, transfer=length)
        if data is None:  # pinned to the generation measured at open
            raise RemoteError(self.path, f"the object was replaced or removed while being read "
                              f"(generation {self.generation} is gone): read it again")
        if len(data) != length:
            raise RemoteError(self.path, f"asked for {length} bytes at {self.pos}, got "
                              f"{len(data)}")
        self.pos += length
        return data

    def readinto(self, buffer) -> int:
        n = max(min(len(buffer), self.size - self.pos), 0)
        for at in range(0, n, BLOCK):
            length = min(BLOCK, n - at)
            buffer[at:at + length] = self._fetch(length)
        return n

    def readall(self) -> bytes:
        parts = []
        while self.pos < self.size:
            parts.append(self._fetch(min(BLOCK, self.size - self.pos)))
        return b"".join(parts)


def open_read(path: str) -> io.BufferedReader:
    return io.BufferedReader(_Reader(path), buffer_size=BLOCK)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


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
