"""Reading a `torch.save` file (`.pth`, `.pt`, `.bin`) without torch and without running it.

Since torch 1.6 `torch.save` writes a zip archive: `<name>/data.pkl` is a pickle of the saved
object in which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and every storage a persistent id `('storage', torch.FloatStorage, key, device,
numel)` whose raw bytes are the record `<name>/data/<key>`. Unpickling is running code: a
pickle may name any importable function (`os.system`) and call it. So the pickle is read by an
unpickler that knows a short allow-list of names (tensor rebuilds, storage types,
`collections.OrderedDict`) and maps each to a function of this module; any other name refuses
the file before anything is called. Tensors come back as numpy arrays (bfloat16 widened to
float32), containers as dicts, lists and tuples.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from lpt_jax.errors import CheckpointError, UnsafeCheckpointError

# torch's legacy storage classes, as they are named in the pickle -> their element type.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands for `torch.<Name>Storage` inside the pickle; only its element type matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """`torch._utils._rebuild_tensor_v2`: a strided view into the storage (no copy)."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size + stride) or offset < 0:
        raise CheckpointError(f"a tensor with size {size}, stride {stride}, offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise CheckpointError(f"a tensor of size {size} reaches past its storage "
                              f"({storage.size} elements)")
    if not all(size):
        return np.zeros(size, storage.dtype)
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride],
                                           writeable=False)


def _rebuild_parameter(data, *_ignored):
    """`torch._utils._rebuild_parameter(_with_state)`: an nn.Parameter is its tensor."""
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


# (module, name) in the pickle -> what this reader calls instead.
_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, load_storage):
        super().__init__(file)
        self._path, self._load_storage = path, load_storage

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refused without running it: its pickle names {module}.{name}, "
                "which is not a tensor, storage or container (lpt_jax reads only "
                "torch tensors, dicts, lists and numbers from .pth/.bin files)") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._path}: refused: an unknown persistent id "
                                        f"{str(pid)[:80]} in its pickle")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _archive_prefix(path: str, names: list[str]) -> str:
    if any(n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive, not a state dict saved with "
                              "torch.save: save model.state_dict() instead")
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip archive but not one written by torch.save "
                              "(no <name>/data.pkl)")
    return pickles[0][: -len("data.pkl")]


def read_torch_file(path: str, fileobj) -> Any:
    """The object saved in a torch zip archive, tensors as numpy arrays (see module doc).

    `fileobj` is the opened (seekable) file; `path` is only used in messages. Each storage is
    read once, straight into the array that its tensors view.
    """
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
            prefix = _archive_prefix(path, zf.namelist())
            byteorder = "little"
            if prefix + "byteorder" in zf.namelist():
                byteorder = zf.read(prefix + "byteorder").decode().strip()
            storages: dict[str, np.ndarray] = {}

            def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
                if key not in storages:
                    name = f"{prefix}data/{key}"
                    try:
                        info = zf.getinfo(name)
                    except KeyError:
                        raise CheckpointError(f"{path}: the record {name} is missing") from None
                    want = numel * dtype.itemsize
                    if info.file_size != want:
                        raise CheckpointError(f"{path}: {name} holds {info.file_size} bytes, "
                                              f"its tensor needs {want}")
                    raw = zf.read(name)
                    stored = dtype.newbyteorder("<" if byteorder == "little" else ">")
                    array = np.frombuffer(raw, stored, count=numel)
                    storages[key] = array if stored == dtype else array.astype(dtype)
                return storages[key]

            with zf.open(prefix + "data.pkl") as f:
                obj = _RestrictedUnpickler(f, path, load_storage).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable torch.save file ({msg})") from None
    return _widen(obj)


def _widen(obj):
    """bfloat16 arrays -> float32 (numpy computes poorly in bf16); containers -> plain dicts."""
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float32) if obj.dtype == ml_dtypes.bfloat16 else obj
    if isinstance(obj, dict):
        return {k: _widen(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_widen(v) for v in obj)
    return obj
