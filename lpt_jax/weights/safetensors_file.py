"""Reading a `.safetensors` file (Hugging Face's format) into numpy arrays, without the package.

The format is an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes, offsets counted from the end of the header. Nothing in it is
executable. The reader checks what the official one does before reading any tensor: the
header is JSON nested at most MAX_NESTING deep (checked before parsing: json recurses), each
entry's shape and offsets are non-negative integers whose size (computed exactly, no int64
wrap-around) is its byte range, and the ranges tile the data exactly: each tensor starts where
the one before ends, from 0 to the end of the file (no shared bytes, no gaps, nothing after).
"""

from __future__ import annotations

import json
import math
import re
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
MAX_NESTING = 8  # {name: {"shape": [...]}} is 3 deep
_MAX_DIMS = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_INNERMOST = re.compile(rb"[\[{][^\[\]{}]*+[\]}]")


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
    text = fileobj.read(n)
    if _too_deep(text):
        raise CheckpointError(f"{path} is not a .safetensors file (its header is JSON nested "
                              f"deeper than {MAX_NESTING} levels, or leaves brackets open)")
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a .safetensors file (header: "
                              f"{str(e)[:160]})") from None
    header.pop("__metadata__", None)
    start, data_size = 8 + n, file_size - 8 - n
    entries = sorted(((_check_entry(path, name, entry), name) for name, entry in header.items()),
                     key=lambda e: (e[0][:2], e[1]))  # by byte range
    _check_tiling(path, entries, data_size)
    out = {}
    for (begin, end, dtype, shape), name in entries:
        fileobj.seek(start + begin)
        data = fileobj.read(end - begin)
        if len(data) != end - begin:
            raise CheckpointError(f"{path} is truncated (tensor {_shown(name)})")
        a = np.frombuffer(data, dtype).reshape(shape)
        if a.dtype in (np.float16, ml_dtypes.bfloat16):
            a = a.astype(np.float32)
        out[name] = a
    return out


def _too_deep(text: bytes) -> bool:
    """Whether the JSON `text` nests brackets deeper than MAX_NESTING (or leaves some open):
    strings blanked, then innermost groups removed MAX_NESTING times; linear, no recursion."""
    bare = _JSON_STRING.sub(b"0", text)
    for _ in range(MAX_NESTING):
        bare, removed = _INNERMOST.subn(b"0", bare)
        if not removed:
            break
    return re.search(rb"[\[\]{}]", bare) is not None


def _is_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path, name, entry) -> tuple[int, int, np.dtype, tuple]:
    """(begin, end, dtype, shape) of a header entry whose byte range is exactly its size."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        what = dtype if isinstance(entry, dict) else entry
        raise CheckpointError(f"{path}: tensor {_shown(name)} has dtype {str(what)[:40]!r}; "
                              f"readable dtypes: {', '.join(DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(map(_is_size, shape))
            and isinstance(offsets, list) and len(offsets) == 2
            and all(map(_is_size, offsets))):
        raise CheckpointError(f"{path}: tensor {_shown(name)} has a malformed header entry "
                              f"{str(entry)[:120]} (shape and data_offsets are lists of "
                              "non-negative integers)")
    begin, end = offsets
    need = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no wrap-around
    if end - begin != need:
        raise CheckpointError(f"{path}: tensor {_shown(name)} ({dtype} {shape}) needs {need} "
                              f"bytes, but its byte range [{begin}, {end}) holds "
                              f"{max(end - begin, 0)}")
    return begin, end, DTYPES[dtype], tuple(shape)


def _check_tiling(path, entries, data_size) -> None:
    """The sorted byte ranges cover [0, data_size) exactly once, as the official reader
    requires: shared bytes would be read twice (two names, one tensor), gaps and a tail are
    bytes no tensor accounts for."""
    at, before = 0, None
    for (begin, end, _, _), name in entries:
        if begin < at:
            raise CheckpointError(f"{path}: tensor {_shown(name)} (bytes [{begin}, {end})) "
                                  f"overlaps tensor {_shown(before)}; each tensor has bytes "
                                  "of its own")
        if begin > at:
            raise CheckpointError(f"{path}: the data leaves {begin - at} bytes before tensor "
                                  f"{_shown(name)} that no tensor holds")
        at, before = end, name
    if at != data_size:
        what = (f"has {data_size - at} bytes after its last tensor" if at < data_size else
                f"is truncated: its tensors need {at} data bytes, it has {data_size}")
        raise CheckpointError(f"{path} {what}")


def _shown(name: str) -> str:
    return name if name.isprintable() and len(name) <= 120 else repr(name[:120])
