"""Reading a `.safetensors` file (Hugging Face's format) into numpy arrays, without the package.

The format is an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes, offsets counted from the end of the header. Nothing in it is
executable; the reader checks every entry against the file size before reading it.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from lpt_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 << 20  # the format's own limit


def read_safetensors(path: str, fileobj, file_size: int) -> dict[str, np.ndarray]:
    """{name: array} of the file (bfloat16 and float16 widened to float32); `fileobj` is the
    opened file, `path` only named in messages."""
    raw = fileobj.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{path} is not a .safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, file_size - 8):
        raise CheckpointError(f"{path} is not a .safetensors file (its header length {n} does "
                              f"not fit in {file_size} bytes)")
    try:
        header = json.loads(fileobj.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a .safetensors file (header: {e})") from None
    header.pop("__metadata__", None)
    start, data_size = 8 + n, file_size - 8 - n
    entries = []
    for name, entry in header.items():
        entries.append((_check_entry(path, name, entry, data_size), name, entry))
    out = {}
    for (begin, end), name, entry in sorted(entries):
        dtype = DTYPES[entry["dtype"]]
        fileobj.seek(start + begin)
        data = fileobj.read(end - begin)
        if len(data) != end - begin:
            raise CheckpointError(f"{path} is truncated (tensor {name})")
        a = np.frombuffer(data, dtype).reshape(entry["shape"])
        if a.dtype in (np.float16, ml_dtypes.bfloat16):
            a = a.astype(np.float32)
        out[name] = a
    return out


def _check_entry(path, name, entry, data_size) -> tuple[int, int]:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        what = entry.get("dtype") if isinstance(entry, dict) else entry
        raise CheckpointError(f"{path}: tensor {name} has dtype {str(what)[:40]!r}; readable "
                              f"dtypes: {', '.join(DTYPES)}")
    try:
        shape = [int(s) for s in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name} has a malformed header entry "
                              f"{str(entry)[:120]}") from None
    need = int(np.prod(shape, dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != need:
        raise CheckpointError(f"{path}: tensor {name} ({entry['dtype']} {shape}) has the byte "
                              f"range [{begin}, {end}), which does not fit it or the file")
    return begin, end
