"""Reading a `torch.save` file (`.pth`, `.pt`, `.bin`) without torch and without running it.

Since torch 1.6 `torch.save` writes a zip archive: `<name>/data.pkl` is a pickle of the saved
object in which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and every storage a persistent id `('storage', torch.FloatStorage, key, device,
numel)` whose raw bytes are the record `<name>/data/<key>`. Unpickling is running code: a
pickle may name any importable function (`os.system`) and call it. So the pickle is read by an
unpickler that knows a short allow-list of names (`torch_pickle`); any other name refuses the
file before anything is called. Tensors come back as numpy arrays (bfloat16 widened to
float32), containers as dicts, lists and tuples.

A hostile file is refused in one line before memory grows past what its size justifies:
  * the pickle's opcodes are checked before it runs (`pickle_scan`: no memo index beyond the
    memo, nothing torch does not write, a bounded number of opcodes);
  * every record read is stored uncompressed, as torch.save writes them (a deflated record
    can claim 3 GiB in 3 MB), and lies inside the archive; the storages together are no
    bigger than the archive (zip records that share bytes);
  * what the pickle builds is checked by `torch_pickle` (BUILD on the allow-list's stand-ins,
    stride-0 and shared views, nesting, cycles).
"""

from __future__ import annotations

import pickle
import zipfile
from typing import Any

import numpy as np

from lpt_jax.errors import CheckpointError, UnsafeCheckpointError
from lpt_jax.weights.pickle_scan import check_opcodes
from lpt_jax.weights.torch_pickle import Refused, RestrictedUnpickler, Storage, plain

MAX_PICKLE_BYTES = 16 << 20  # a state dict's pickle: ~5 KB for 46 tensors (the fixtures)


# ------------------------------------------------------------------------------------------
# The archive.

class _Archive:
    """One torch.save zip being read: its records, checked before they are read."""

    def __init__(self, path: str, zf: zipfile.ZipFile, size: int):
        self.path, self.zf, self.size = path, zf, size
        self.prefix = _archive_prefix(path, zf.namelist())
        self.storages: dict[str, Storage] = {}
        self.storage_bytes = 0
        order = self.read(self.prefix + "byteorder", 16) if self.has("byteorder") else b"little"
        if order.strip() not in (b"little", b"big"):
            raise CheckpointError(f"{path}: its byteorder record says {order[:16]!r}, not "
                                  "little or big")
        self.byteorder = "<" if order.strip() == b"little" else ">"

    def has(self, name: str) -> bool:
        return self.prefix + name in self.zf.namelist()

    def record(self, name: str) -> zipfile.ZipInfo:
        """The record's entry; it is stored uncompressed and lies inside the archive."""
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: the record {name} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{self.path}: the record {name} is compressed (zip method "
                f"{info.compress_type}); torch.save stores records uncompressed, and a "
                f"compressed one can claim any size ({info.file_size} bytes here)")
        if info.compress_size != info.file_size or info.header_offset + info.file_size > self.size:
            raise CheckpointError(f"{self.path}: the record {name} declares {info.file_size} "
                                  f"bytes, more than the archive holds ({self.size} bytes)")
        return info

    def read(self, name: str, limit: int) -> bytes:
        info = self.record(name)
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: the record {name} has {info.file_size} bytes, "
                                  f"more than the {limit} such a record needs")
        return self.zf.read(info)

    def storage(self, key: str, dtype: np.dtype, numel: int) -> Storage:
        """The storage `key` as a 1-D array, read once; all storages together fit the file."""
        if key in self.storages:
            have = self.storages[key].array.dtype
            if have != dtype:
                raise CheckpointError(f"{self.path}: the storage {key} is named as both "
                                      f"{have} and {dtype}")
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        info = self.record(name)
        want = numel * dtype.itemsize
        if info.file_size != want:
            raise CheckpointError(f"{self.path}: {name} holds {info.file_size} bytes, its "
                                  f"tensor needs {want}")
        self.storage_bytes += want
        if self.storage_bytes > self.size:
            raise CheckpointError(
                f"{self.path}: its storages declare {self.storage_bytes} bytes by {name}, more "
                f"than the archive's {self.size} (zip records that share bytes)")
        stored = dtype.newbyteorder(self.byteorder)
        array = np.frombuffer(self.zf.read(info), stored, count=numel)
        self.storages[key] = Storage(key, array if stored == dtype else array.astype(dtype))
        return self.storages[key]


def _archive_prefix(path: str, names: list[str]) -> str:
    if any(n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive, not a state dict saved with "
                              "torch.save: save model.state_dict() instead")
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip archive but not one written by torch.save "
                              "(no <name>/data.pkl)")
    return pickles[0][: -len("data.pkl")]


def read_torch_file(path: str, fileobj, file_size: int) -> Any:
    """The object saved in a torch zip archive of `file_size` bytes, tensors as numpy arrays
    (see module doc). `fileobj` is the opened (seekable) file; `path` is only named in
    messages. Each storage is read once, straight into the array its tensors view."""
    head = fileobj.read(4)
    fileobj.seek(0)
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path} uses torch's legacy serialization (torch < 1.6), which "
                              "lpt_jax does not read: load and re-save it once with a recent "
                              "torch (torch.save(torch.load(f, weights_only=True), g))")
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a torch.save file (no zip archive)")
    try:
        with zipfile.ZipFile(fileobj) as zf:
            archive = _Archive(path, zf, file_size)
            name = archive.prefix + "data.pkl"
            data = archive.read(name, MAX_PICKLE_BYTES)
            check_opcodes(data, path, name)
            obj = RestrictedUnpickler(data, path, archive.storage).load()
            return plain(obj, archive.storage_bytes)
    except Refused as e:
        if e.unsafe:
            raise UnsafeCheckpointError(f"{path}: refused without running it: {e}") from None
        raise CheckpointError(f"{path}: refused: {e}") from None
    except CheckpointError:
        raise
    # What the unpickler raises for a pickle that is malformed: a short stack, a call with
    # the wrong arguments, APPEND onto something that is not a list, ...
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, AttributeError, IndexError, OverflowError, OSError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable torch.save file ({msg})") from None
