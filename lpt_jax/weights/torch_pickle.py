"""The pickle of a `torch.save` archive, unpickled without running it, made plain data.

The unpickler knows a short allow-list of names (tensor rebuilds, storage types,
`collections.OrderedDict`) and maps each to a stand-in of this module, made for each file:
any other name refuses the file before anything is called. A stand-in has no `__dict__` and
refuses BUILD (the one opcode that changes an object it did not make), so no pickle can change
the reader for the next file. A tensor is a checked view of its storage: inside it, and with
no more elements than the span it covers (a stride-0 view of 4 bytes can claim 4 GiB).
`plain` then walks the built object without recursion, once per object: it refuses nesting
deeper than MAX_NESTING, a container holding itself, anything but containers, numbers,
strings and tensors, and tensors that view (counted per reference) more bytes than the
storages hold; tensors become numpy arrays (bfloat16 widened to float32), containers plain
dicts, lists and tuples.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from types import MappingProxyType
from typing import Any, Callable

import ml_dtypes
import numpy as np

from lpt_jax.errors import UnsafeCheckpointError
from lpt_jax.weights.pickle_scan import MAX_NESTING

# torch's legacy storage classes, as they are named in the pickle -> their element type.
STORAGE_DTYPES = MappingProxyType({
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
})
_MAX_DIMS = 32
_LEAVES = (str, bytes, int, float, type(None))  # bool is an int


class Refused(Exception):
    """Raised inside the unpickler, where the file's path is not known; `unsafe`: the pickle
    tried what a torch.save pickle never does."""

    def __init__(self, what: str, unsafe: bool = False):
        super().__init__(what)
        self.unsafe = unsafe


# ------------------------------------------------------------------------------------------
# What the pickle gets for the allowed names, and from them.

class _StandIn:
    __slots__ = ("label",)

    def __init__(self, label: str):
        self.label = label

    def __setstate__(self, state):
        raise Refused(f"its pickle sets the state of {self.label} (BUILD)", unsafe=True)


class _Call(_StandIn):
    """An allowed function (`torch._utils._rebuild_tensor_v2`, ...): calls this module's."""
    __slots__ = ("fn",)

    def __init__(self, label: str, fn):
        super().__init__(label)
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _StorageType(_StandIn):
    """`torch.<Name>Storage`: only its element type matters."""
    __slots__ = ("dtype",)

    def __init__(self, name: str):
        super().__init__(f"torch.{name}")
        self.dtype = STORAGE_DTYPES[name]


class Storage(_StandIn):
    """A storage record read into a 1-D array (what persistent ids become)."""
    __slots__ = ("array",)

    def __init__(self, key: str, array: np.ndarray):
        super().__init__(f"the storage {key}")
        self.array = array


class _Tensor(_StandIn):
    """A checked strided view of a storage, made an array once the whole pickle is read."""
    __slots__ = ("storage", "offset", "size", "stride")
    __hash__ = None  # never a dict key

    def __init__(self, storage, offset, size, stride):
        super().__init__("a tensor")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.storage.array.itemsize

    def array(self) -> np.ndarray:
        base = self.storage.array
        if not all(self.size):
            a = np.zeros(self.size, base.dtype)
        else:
            a = np.lib.stride_tricks.as_strided(
                base[self.offset:], self.size, [s * base.itemsize for s in self.stride],
                writeable=False)
        return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


class _PickledDict(collections.OrderedDict):
    """What `collections.OrderedDict` makes: torch.save BUILDs a state dict's `_metadata`
    onto it, which nothing here needs."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise Refused("its pickle sets attributes of an OrderedDict (BUILD)", unsafe=True)


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """`torch._utils._rebuild_tensor_v2`, checked: inside the storage, no element seen twice."""
    if not (isinstance(storage, Storage) and _is_index(offset)
            and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= _MAX_DIMS and all(map(_is_index, size + stride))):
        raise Refused("a tensor rebuild with malformed arguments (storage, offset, size, "
                      "stride)")
    numel, have = math.prod(size), storage.array.size
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= have:
            raise Refused(f"a tensor of size {list(size)} reaches past its storage ({have} "
                          "elements)")
        if numel > last - offset + 1:
            raise Refused(f"a tensor of size {list(size)} with stride {list(stride)} has more "
                          f"elements ({numel}) than the {last - offset + 1} it spans in its "
                          "storage (stride-0 or overlapping views are not saved weights)")
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    """`torch._utils._rebuild_parameter(_with_state)`: an nn.Parameter is its tensor."""
    return data


# (module, name) in the pickle -> the function its stand-in calls.
_CALLS = MappingProxyType({
    ("collections", "OrderedDict"): _PickledDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `data` (already checked by `pickle_scan`); `load_storage(key, dtype, numel)`
    reads a storage record."""

    def __init__(self, data: bytes, path: str,
                 load_storage: Callable[[str, np.dtype, int], Storage]):
        super().__init__(io.BytesIO(data))
        self._path, self._load_storage = path, load_storage
        self._names: dict = {}  # this file's stand-ins

    def find_class(self, module, name):
        key = (module, name)
        if key not in self._names:
            if key in _CALLS:
                self._names[key] = _Call(f"{module}.{name}", _CALLS[key])
            elif module == "torch" and name in STORAGE_DTYPES:
                self._names[key] = _StorageType(name)
            else:
                raise UnsafeCheckpointError(
                    f"{self._path}: refused without running it: its pickle names "
                    f"{shown(f'{module}.{name}')}, which is not a tensor, storage or container "
                    "(lpt_jax reads only torch tensors, dicts, lists and numbers from "
                    ".pth/.bin files)")
        return self._names[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and 0 < len(pid[2]) <= 64 and pid[2].isprintable() and isinstance(pid[3], str)
                and _is_index(pid[4])):
            what = (f"a tuple of {', '.join(type(p).__name__ for p in pid[:6])}"
                    if isinstance(pid, tuple) else f"a {type(pid).__name__}")
            raise Refused(f"a persistent id that is not a torch storage ({what})", unsafe=True)
        _, storage_type, key, _location, numel = pid
        return self._load_storage(key, storage_type.dtype, numel)


def shown(text: str) -> str:
    """`text` for a one-line message: as it is if short and printable, else its repr, cut."""
    return text if text.isprintable() and len(text) <= 120 else repr(text[:120])


# ------------------------------------------------------------------------------------------
# The built object as plain data.

def plain(root, storage_bytes: int):
    """`root` with dicts, lists and tuples rebuilt plain and tensors made arrays (see module
    doc); `storage_bytes`: what the storages read hold."""
    done: dict[int, Any] = {}  # id of a container or tensor -> what it becomes
    path: set[int] = set()  # the containers being built: the current one's ancestors
    viewed = root.nbytes if isinstance(root, _Tensor) else 0
    stack = [(root, False)]
    while stack:
        obj, children_done = stack.pop()
        if isinstance(obj, _LEAVES) or (not children_done and id(obj) in done):
            continue
        if children_done:
            path.discard(id(obj))
            done[id(obj)] = _rebuilt(obj, done)
            continue
        if id(obj) in path:
            raise Refused("its pickle holds a container that contains itself")
        if isinstance(obj, _Tensor):
            done[id(obj)] = obj.array()
            continue
        if not isinstance(obj, (dict, list, tuple)):
            raise Refused(f"its pickle holds {getattr(obj, 'label', type(obj).__name__)} "
                          "itself, which is not data")
        if len(path) >= MAX_NESTING:
            raise Refused(f"its pickle nests containers deeper than {MAX_NESTING} levels")
        path.add(id(obj))
        stack.append((obj, True))
        for child in [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj:
            if isinstance(child, _Tensor):
                viewed += child.nbytes
            stack.append((child, False))
        if viewed > storage_bytes:
            raise Refused(f"its tensors view {viewed} bytes, more than its storages hold "
                          f"({storage_bytes}): shared or overlapping views are not saved "
                          "weights")
    return root if isinstance(root, _LEAVES) else done[id(root)]


def _rebuilt(obj, done: dict):
    def get(x):
        return x if isinstance(x, _LEAVES) else done[id(x)]

    if isinstance(obj, dict):
        return {get(k): get(v) for k, v in obj.items()}
    return [get(x) for x in obj] if isinstance(obj, list) else tuple(get(x) for x in obj)
