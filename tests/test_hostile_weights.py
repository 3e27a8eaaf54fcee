"""Hostile weight files (issue 27, item 5): each is refused with ONE CheckpointError line that
names the file and what is wrong, before memory grows past what the file's size justifies.

Every file is made here, byte by byte: pickles from raw opcodes or from a pickler that writes
torch's globals, zip archives and safetensors by hand (torch is not installed, nor needed).
The memory bombs are read in a subprocess whose address space is capped at what it uses
after its imports plus HEADROOM: a reader that allocates what such a file claims dies there
of MemoryError (the test fails) instead of taking the machine's memory; the refusal's time
and peak memory growth are printed (pytest -s) and bounded.
"""

import collections
import io
import json
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from lpt_jax import convert
from lpt_jax.backbones import vit_weights
from lpt_jax.errors import CheckpointError, UnsafeCheckpointError
from lpt_jax.weights.state_dict import read_state_dict

from helpers import DATA, REPO

FIX = DATA / "convert"
MIB = 1 << 20
HEADROOM = 256 * MIB  # the probe's address space beyond its imports


# ------------------------------------------------------------------------------------------
# Writing torch.save archives without torch.

class Global:
    """`module.name` in the pickle (a GLOBAL opcode); callable, so the pickler REDUCEs with it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("never called")


class Storage:
    """A storage record: its key, bytes and torch type; `numel` as the pickle declares it."""

    def __init__(self, key, data, kind="FloatStorage", numel=None, itemsize=4):
        self.key, self.data, self.kind = key, data, kind
        self.numel = len(data) // itemsize if numel is None else numel


class Tensor:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage, size, stride=None, offset=0):
        if stride is None:  # contiguous
            stride, step = [], 1
            for n in reversed(size):
                stride.insert(0, step)
                step *= n
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset


STORAGES = {"float32": "FloatStorage", "bfloat16": "BFloat16Storage", "int32": "IntStorage"}


def tensor(array):
    """A Tensor of its own storage holding `array` (float32, bfloat16 or int32)."""
    a = np.ascontiguousarray(array)
    return Tensor(Storage(None, a.tobytes(), STORAGES[a.dtype.name], itemsize=a.dtype.itemsize),
                  list(a.shape))


class TorchPickler(pickle._Pickler):
    """The pickle torch.save writes, for objects holding `Tensor`s and `Global`s."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol=2):
        super().__init__(file, protocol=protocol)
        self.storages = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if obj.key is None:
            obj.key = str(len(self.storages))
        self.storages[obj.key] = obj
        return ("storage", Global("torch", obj.kind), obj.key, "cpu", obj.numel)

    def save_torch_global(self, obj):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def save_tensor(self, t):
        self.save_reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                         (t.storage, t.offset, tuple(t.size), tuple(t.stride), False,
                          collections.OrderedDict()), obj=t)

    dispatch[Global] = save_torch_global
    dispatch[Tensor] = save_tensor


def local_header(name, method, crc, csize, size):
    n = name.encode()
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc, csize, size,
                       len(n), 0) + n


def zip_bytes(entries):
    """A zip archive written by hand, so a test can declare what zipfile's writer never would.
    Each entry is a dict: name, payload, and optionally method (0 stored, 8 deflated), size
    and csize (declared sizes), crc; header_only writes its local header alone (its bytes
    are whatever follows it); name None writes the payload bare."""
    out, central = bytearray(), bytearray()
    for e in entries:
        payload = e["payload"]
        if e["name"] is None:
            out += payload
            continue
        method, n = e.get("method", 0), e["name"].encode()
        crc = e.get("crc", zlib.crc32(payload) if method == 0 else 0)
        size, csize = e.get("size", len(payload)), e.get("csize", len(payload))
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc,
                               csize, size, len(n), 0, 0, 0, 0, 0, len(out)) + n
        out += local_header(e["name"], method, crc, csize, size)
        if not e.get("header_only"):
            out += payload
    count = len([e for e in entries if e["name"] is not None])
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0)
    return bytes(out + central + end)


def write_pth(path, obj=None, *, pkl=None, records=(), protocol=2):
    """A torch.save archive of `obj` (or of the raw pickle `pkl`) as zip_bytes entries;
    `records` are more entries, after the others; the storages the pickle names are stored
    unless `records` names them."""
    storages = {}
    if pkl is None:
        f = io.BytesIO()
        pickler = TorchPickler(f, protocol)
        pickler.dump(obj)
        pkl, storages = f.getvalue(), pickler.storages
    entries = [dict(name="archive/data.pkl", payload=pkl),
               dict(name="archive/byteorder", payload=b"little")]
    entries += [dict(name=f"archive/data/{k}", payload=s.data) for k, s in storages.items()]
    given = {r["name"] for r in records}
    path.write_bytes(zip_bytes([e for e in entries if e["name"] not in given] + list(records)))
    return str(path)


def raw_pickle(*ops):
    return pickle.PROTO + b"\x02" + b"".join(ops) + pickle.STOP


def binunicode(s):
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


# ------------------------------------------------------------------------------------------
# Reading a file in a capped subprocess.

_PROBE = r"""
import json, resource, sys, time
import numpy as np
from lpt_jax.errors import CheckpointError
from lpt_jax.weights.state_dict import read_state_dict

def status(field):
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) << 10

cap = status("VmSize") + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:  # peak RSS from here on (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
rss = status("VmRSS")
t0 = time.perf_counter()
try:
    arrays = read_state_dict(sys.argv[1])
    copies = [np.array(a) for a in arrays.values()]  # what a caller of the reader will do
    out = {"error": None}
except CheckpointError as e:
    out = {"error": type(e).__name__, "message": str(e)}
except BaseException as e:  # the test reports what the reader let through
    out = {"error": type(e).__name__, "message": str(e)[:300]}
out["seconds"] = time.perf_counter() - t0
out["peak_growth_mib"] = (status("VmHWM") - rss) / 2**20
print(json.dumps(out))
"""


def refused_in_probe(path, match, unsafe=False):
    """Reads `path` in a subprocess capped at HEADROOM; asserts one refusal line naming the
    file and `match` (or one of a tuple of them), and little memory and time for it."""
    run = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(HEADROOM)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    size = (path.stat().st_size if hasattr(path, "stat") else 0) / MIB
    print(f"\n{path.name} ({size:.2f} MiB): {out}")
    want = "UnsafeCheckpointError" if unsafe else "CheckpointError"
    assert out["error"] == want, out
    matches = (match,) if isinstance(match, str) else match
    assert str(path) in out["message"] and any(m in out["message"] for m in matches), out
    assert "\n" not in out["message"]
    assert out["peak_growth_mib"] < 32 and out["seconds"] < 10, out
    return out


def one_line(fn, match, unsafe=False, where=None):
    """fn() raises one CheckpointError line (UnsafeCheckpointError if `unsafe`) naming `where`
    and containing `match`."""
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, UnsafeCheckpointError) == unsafe, msg
    assert match in msg and "\n" not in msg, msg
    if where is not None:
        assert str(where) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------
# The pickle: nesting, cycles, the memo, what it may do to the reader.

def _nested_lists(n):  # [[[...]]]: the stack grows
    return raw_pickle(pickle.EMPTY_LIST * n, pickle.APPEND * (n - 1))


def _nested_tuples(n):  # ((((None,),),),): one stack slot
    return raw_pickle(pickle.NONE, pickle.TUPLE1 * n)


def _nested_through_the_memo(n):  # [[[...]]] built on a stack two deep
    ops = [pickle.EMPTY_LIST, pickle.LONG_BINPUT + struct.pack("<I", 0)]
    for i in range(1, n):
        ops += [pickle.EMPTY_LIST, pickle.LONG_BINPUT + struct.pack("<I", i), pickle.APPEND,
                pickle.POP, pickle.LONG_BINGET + struct.pack("<I", i)]
    return raw_pickle(*ops, pickle.POP, pickle.LONG_BINGET + struct.pack("<I", 0))


@pytest.mark.parametrize("make,depth", [(_nested_lists, 100_000), (_nested_tuples, 100_000),
                                        (_nested_through_the_memo, 20_000)])
def test_deeply_nested_pickles_are_one_line(tmp_path, make, depth):
    path = write_pth(tmp_path / "deep.pth", pkl=make(depth))
    one_line(lambda: read_state_dict(path), "nests containers deeper than", where=path)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_a_container_holding_itself_is_one_line(tmp_path, kind):
    if kind == "list":
        ops = [pickle.EMPTY_LIST, pickle.BINPUT + b"\0", pickle.BINGET + b"\0", pickle.APPEND]
    else:
        ops = [pickle.EMPTY_DICT, pickle.BINPUT + b"\0", binunicode("me"),
               pickle.BINGET + b"\0", pickle.SETITEM]
    path = write_pth(tmp_path / "cycle.pth", pkl=raw_pickle(*ops))
    one_line(lambda: read_state_dict(path), "contains itself", where=path)


def test_a_memo_index_far_beyond_the_pickle_is_refused_before_allocating(tmp_path):
    bomb = raw_pickle(pickle.EMPTY_LIST, pickle.LONG_BINPUT + struct.pack("<I", 0x7FFFFFF0))
    path = tmp_path / "memo.pth"
    write_pth(path, pkl=bomb)
    assert path.stat().st_size < 400
    refused_in_probe(path, "memo index 2147483632")


@pytest.mark.parametrize("target", ["torch\nFloatStorage", "torch._utils\n_rebuild_tensor_v2",
                                    "tensor"])
@pytest.mark.parametrize("slots", [False, True])
def test_build_cannot_change_the_reader(tmp_path, target, slots):
    """BUILD sets an object's state; onto the allow-list's stand-ins it would change the
    reader for the rest of the process (every FloatStorage read as something else)."""
    state = binunicode("dtype") + binunicode("x")
    state = (pickle.EMPTY_DICT + state + pickle.SETITEM if not slots else
             pickle.NONE + pickle.EMPTY_DICT + state + pickle.SETITEM + pickle.TUPLE2)
    if target == "tensor":
        f = io.BytesIO()
        TorchPickler(f).dump(tensor(np.zeros(2, np.float32)))
        obj, records = f.getvalue()[2:-1], [dict(name="archive/data/0", payload=bytes(8))]
    else:
        obj, records = pickle.GLOBAL + target.encode() + b"\n", []
    path = write_pth(tmp_path / "build.pth", pkl=raw_pickle(obj, state, pickle.BUILD),
                     records=records)
    one_line(lambda: read_state_dict(path), "sets the state of", unsafe=True, where=path)
    bin_, st = (read_state_dict(str(FIX / n)) for n in ("timm_vit.bin", "timm_vit.safetensors"))
    assert sorted(bin_) == sorted(st)  # and the reader is what it was
    for k in st:
        np.testing.assert_array_equal(bin_[k], st[k], err_msg=k)


@pytest.mark.parametrize("case,match,unsafe", [
    ("append_to_a_global", "not a readable torch.save file", False),
    ("newobj", "NEWOBJ", True),
    ("ext1", "EXT1", True),
    ("set", "EMPTY_SET", False),
    ("bare_storage_type", "torch.FloatStorage itself", False),
])
def test_what_torch_never_writes_is_one_line(tmp_path, case, match, unsafe):
    od = pickle.GLOBAL + b"collections\nOrderedDict\n"
    ops = {"append_to_a_global": [od, pickle.NONE, pickle.APPEND],
           "newobj": [pickle.GLOBAL + b"torch\nFloatStorage\n", pickle.EMPTY_TUPLE,
                      pickle.NEWOBJ],
           "ext1": [pickle.EXT1 + b"\x01"],
           "set": [pickle.EMPTY_SET],
           "bare_storage_type": [pickle.EMPTY_DICT, binunicode("w"),
                                 pickle.GLOBAL + b"torch\nFloatStorage\n", pickle.SETITEM],
           }[case]
    path = write_pth(tmp_path / f"{case}.pth", pkl=raw_pickle(*ops))
    one_line(lambda: read_state_dict(path), match, unsafe=unsafe, where=path)


@pytest.mark.parametrize("key,match,unsafe", [
    (pickle.NONE + pickle.TUPLE1 * 100_000, "nests containers deeper than", False),
    (binunicode("0\n1"), "persistent id that is not a torch storage", True),
])
def test_a_storage_key_that_is_not_a_name_is_refused(tmp_path, key, match, unsafe):
    """The key names a record and ends up in messages: a 100,000-deep tuple must not reach
    str(), a line break must not reach a one-line message."""
    pid = (pickle.MARK + binunicode("storage") + pickle.GLOBAL + b"torch\nFloatStorage\n"
           + key + binunicode("cpu") + pickle.BININT1 + b"\x02" + pickle.TUPLE)
    path = write_pth(tmp_path / "key.pth", pkl=raw_pickle(pid, pickle.BINPERSID))
    one_line(lambda: read_state_dict(path), match, unsafe=unsafe, where=path)


# ------------------------------------------------------------------------------------------
# The archive: records that claim more than the file holds, views that repeat bytes.

def test_a_deflated_storage_bomb_is_refused_before_inflating(tmp_path):
    """3 GiB of zeros deflate to 3.2 MB; torch.save never compresses a record."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = z.compress(bytes(MIB)) + z.flush(zlib.Z_FULL_FLUSH)
    chunk = z.compress(bytes(MIB)) + z.flush(zlib.Z_FULL_FLUSH)  # from now on all alike
    bomb = chunk * 3072 + z.flush()
    numel = 3 * 2**30 // 4
    w = Tensor(Storage("0", b"", numel=numel), [numel])
    path = tmp_path / "bomb.pth"
    write_pth(path, {"w": w},
              records=[dict(name="archive/data/0", payload=bomb, method=8, size=3 * 2**30)])
    refused_in_probe(path, "archive/data/0 is compressed")


def test_a_compressed_pickle_is_refused(tmp_path):
    """A valid state dict, its pickle deflated (correct CRC): read before, refused now."""
    f = io.BytesIO()
    TorchPickler(f).dump({"w": tensor(np.ones(2, np.float32))})
    pkl, z = f.getvalue(), zlib.compressobj(9, zlib.DEFLATED, -15)
    path = write_pth(tmp_path / "z.pth", pkl=pkl, records=[
        dict(name="archive/data/0", payload=np.ones(2, np.float32).tobytes()),
        dict(name="archive/data.pkl", payload=z.compress(pkl) + z.flush(), method=8,
             size=len(pkl), crc=zlib.crc32(pkl))])
    one_line(lambda: read_state_dict(path), "archive/data.pkl is compressed", where=path)


def test_a_record_larger_than_the_archive_is_refused(tmp_path):
    numel = 2**29
    w = Tensor(Storage("0", b"", numel=numel), [numel])
    path = tmp_path / "big.pth"
    write_pth(path, {"w": w}, records=[dict(name="archive/data/0", payload=bytes(64),
                                            size=4 * numel, csize=4 * numel)])
    refused_in_probe(path, "more than the archive holds")


def test_overlapping_zip_records_are_refused(tmp_path):
    """k records whose stored bytes all run on to the end of one shared 1 MiB tail: k MiB of
    storages from a 1 MiB file (zipfile before Python 3.11.8 does not notice). Built back to
    front: a record's bytes are the local headers after it and the tail; CRCs correct."""
    k, data = 200, bytes(MIB)
    records = [dict(name=None, payload=data)]
    for i in reversed(range(k)):
        name, crc = f"archive/data/{i:03d}", zlib.crc32(data)
        records.insert(0, dict(name=name, payload=b"", size=len(data), csize=len(data),
                               crc=crc, header_only=True))
        data = local_header(name, 0, crc, len(data), len(data)) + data
    state = {f"w{i}": Tensor(Storage(r["name"][-3:], b"", "ByteStorage", numel=r["size"]),
                             [r["size"]]) for i, r in enumerate(records[:k])}
    path = tmp_path / "overlap.pth"
    write_pth(path, state, records=records)
    # Our check's words, or zipfile's own where it finds the overlap first (Python 3.13).
    refused_in_probe(path, ("more than the archive's", "Overlapped entries"))


def test_stride_zero_tensors_are_refused(tmp_path):
    """One float (4 bytes) viewed as 2**15 x 2**15: 4 GiB for whoever copies it."""
    s = Storage("0", bytes(4))
    path = tmp_path / "stride0.pth"
    write_pth(path, {"w": Tensor(s, [2**15, 2**15], [0, 0])})
    refused_in_probe(path, "more elements")


def test_many_names_for_one_storage_are_refused(tmp_path):
    """300 tensors each viewing the same 1 MiB storage: 300 MiB for whoever copies them."""
    s = Storage("0", bytes(MIB))
    path = tmp_path / "shared.pth"
    write_pth(path, {f"w{i}": Tensor(s, [MIB // 4]) for i in range(300)})
    refused_in_probe(path, "shared or overlapping")


def test_a_real_state_dict_layout_still_reads(tmp_path):
    """What torch.save writes for model.state_dict() and more: an OrderedDict with `_metadata`
    (BUILD), views of one storage (disjoint slices), a transposed view, bfloat16, an empty
    tensor, protocol 2 and 4."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(3, 4)).astype(np.float32)
    s = Storage(None, qkv.tobytes())
    bf16 = rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16)
    sd = collections.OrderedDict(
        q=Tensor(s, [4]), k=Tensor(s, [4], offset=4), v=Tensor(s, [2, 2], [2, 1], offset=8),
        t=Tensor(Storage(None, qkv.tobytes()), [4, 3], [1, 4]), b=tensor(bf16),
        e=Tensor(Storage(None, b""), [0, 3]))
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    for protocol in (2, 4):
        got = read_state_dict(write_pth(tmp_path / f"p{protocol}.pth", {"state_dict": sd},
                                        protocol=protocol))
        flat = qkv.reshape(-1)
        np.testing.assert_array_equal(got["q"], flat[:4])
        np.testing.assert_array_equal(got["k"], flat[4:8])
        np.testing.assert_array_equal(got["v"], flat[8:].reshape(2, 2))
        np.testing.assert_array_equal(got["t"], qkv.T)
        np.testing.assert_array_equal(got["b"], bf16.astype(np.float32))
        assert got["b"].dtype == np.float32 and got["e"].shape == (0, 3)


# ------------------------------------------------------------------------------------------
# safetensors.

ST_DTYPES = {"<f4": "F32", "<i4": "I32", "<i8": "I64", "|u1": "U8", "|b1": "BOOL"}


def safetensors_bytes(arrays=None, *, header=None, data=b""):
    """The file of `arrays` (contiguous, in order), or of a given header (dict or raw bytes)
    and data."""
    if arrays is not None:
        header, chunks, at = {}, [], 0
        for name, a in arrays.items():
            raw = np.ascontiguousarray(a).tobytes()
            header[name] = {"dtype": ST_DTYPES[a.dtype.str], "shape": list(a.shape),
                            "data_offsets": [at, at + len(raw)]}
            chunks.append(raw)
            at += len(raw)
        data = b"".join(chunks)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("closed", [True, False])
def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path, closed):
    deep = b"[" * 200_000 + (b"]" * 200_000 if closed else b"")
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes(header=b'{"a": ' + deep + b"}"))
    one_line(lambda: read_state_dict(str(path)), "nested deeper than", where=path)


def test_a_safetensors_size_that_overflows_is_refused(tmp_path):
    path = tmp_path / "overflow.safetensors"
    path.write_bytes(safetensors_bytes(header={"w": {"dtype": "F32", "shape": [2**32, 2**32],
                                                     "data_offsets": [0, 0]}}))
    one_line(lambda: read_state_dict(str(path)), "needs 73786976294838206464 bytes",
             where=path)


def _entry(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("case,header,size,match", [
    ("shared", {"a": _entry(0, 8), "b": _entry(0, 8)}, 8, "overlaps"),
    ("overlap", {"a": _entry(0, 8), "b": _entry(4, 12)}, 12, "overlaps"),
    ("gap", {"a": _entry(0, 8), "b": _entry(12, 20)}, 20, "4 bytes before tensor b"),
    ("trailing", {"a": _entry(0, 8)}, 16, "8 bytes after its last tensor"),
    ("dtype_list", {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8,
     "dtype"),
    ("bool_shape", {"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8,
     "malformed"),
    ("float_offset", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, 8,
     "malformed"),
])
def test_safetensors_byte_ranges_are_the_official_readers(tmp_path, case, header, size, match):
    """Each tensor starts where the one before ends, from 0 to the end of the file: no shared
    bytes, no gaps, nothing after (the official reader refuses the same)."""
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(safetensors_bytes(header=header, data=bytes(size)))
    one_line(lambda: read_state_dict(str(path)), match, where=path)


def test_a_tensor_name_with_a_line_break_is_one_line(tmp_path):
    path = tmp_path / "names.safetensors"
    path.write_bytes(safetensors_bytes({"w\nerror: injected": np.zeros(2, np.float32)}))
    one_line(lambda: read_state_dict(str(path)), "names a tensor with control characters",
             where=path)


# ------------------------------------------------------------------------------------------
# Arrays that do not fit what the model makes of them.

@pytest.fixture(scope="module")
def timm_state():
    return read_state_dict(str(FIX / "timm_vit.safetensors"))


@pytest.fixture(scope="module")
def tiny_vit():
    import jax

    from lpt_jax.backbones.vit import ViT
    t = json.loads((FIX / "timm_vit.json").read_text())
    model = ViT(num_classes=t["num_classes"], image_size=(t["image_size"],) * 2,
                patch_size=(t["patch_size"],) * 2, width=t["width"], depth=t["depth"],
                num_heads=t["num_heads"], mlp_dim=t["mlp_dim"])
    images = np.zeros((1, t["image_size"], t["image_size"], 3), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


@pytest.mark.parametrize("name,shape,match", [
    ("pos_embed", (5 * 32,), "pos_embed has shape (160,), expected (1, N, 32)"),
    ("pos_embed", (5, 32), "pos_embed has shape (5, 32), expected (1, N, 32)"),
    ("cls_token", (1, 1, 16), "cls_token has shape (1, 1, 16), expected (1, 1, 32)"),
    ("cls_token", (1, 1, 1), "cls_token has shape (1, 1, 1), expected (1, 1, 32)"),
    ("blocks.0.attn.qkv.weight", (), "blocks.0.attn.qkv.weight has shape (), expected (3D, D)"),
    ("blocks.0.attn.qkv.bias", (3, 32), "blocks.0.attn.qkv.bias has shape (3, 32), expected"),
    ("blocks.1.attn.proj.weight", (32 * 32,), "blocks.1.attn.proj.weight has shape (1024,)"),
])
def test_timm_arrays_of_the_wrong_rank_or_width_are_one_line(tmp_path, timm_state, name,
                                                              shape, match):
    state = dict(timm_state)
    state[name] = np.zeros(shape, np.float32)
    path = tmp_path / "vit.safetensors"
    path.write_bytes(safetensors_bytes(state))
    one_line(lambda: vit_weights.read_arrays(str(path), num_heads=4), match, where=path)


def test_a_vit_jax_position_table_of_the_wrong_rank_is_one_line(tmp_path, tiny_vit):
    from lpt_jax.tree import flatten
    arrays = {k: np.zeros(v.shape, v.dtype) for k, v in flatten(tiny_vit).items()}
    arrays.pop("pos_embedding")
    arrays["Transformer/posembed_input/pos_embedding"] = np.zeros(5 * 32, np.float32)
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    one_line(lambda: vit_weights.load_params(str(path), tiny_vit),
             "pos_embedding has shape (160,), expected (1, N, 32)", where=path)


@pytest.mark.parametrize("name", ["blocks.0.mlp.fc1.weight", "head.weight"])
def test_a_converted_backbone_of_the_wrong_rank_is_one_line(tmp_path, timm_state, name):
    state = dict(timm_state)
    state[name] = np.zeros(7, np.float32)
    path = tmp_path / "vit.safetensors"
    path.write_bytes(safetensors_bytes(state))
    one_line(lambda: convert.convert_backbone(str(path), str(tmp_path / "o.npz"), num_heads=4),
             "has shape (7,)", where=path)
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize("how", ["load_params", "convert_backbone"])
def test_integer_weights_are_refused(tmp_path, timm_state, tiny_vit, dtype, how):
    state = dict(timm_state)
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].astype(dtype)
    path = tmp_path / "vit.safetensors"
    path.write_bytes(safetensors_bytes(state))
    match = f"MlpBlock_0/Dense_0/kernel is {np.dtype(dtype).name}"
    if how == "load_params":
        one_line(lambda: vit_weights.load_params(str(path), tiny_vit), match, where=path)
    else:
        one_line(lambda: convert.convert_backbone(str(path), str(tmp_path / "o.npz"),
                                                  num_heads=4), match, where=path)


def test_integer_prompts_of_a_release_are_refused(tmp_path):
    release = json.loads((FIX / "release.json").read_text())
    state = read_state_dict(str(FIX / "release_plain.pth"))
    state["prompt_learner.Prompt_Keys"] = state["prompt_learner.Prompt_Keys"].astype(np.int32)
    path = write_pth(tmp_path / "release.pth", {"state_dict": {k: tensor(v)
                                                               for k, v in state.items()}})
    one_line(lambda: convert.load_release(path, num_heads=release["num_heads"]),
             "pool_keys is int32, but the model's parameter is float32", where=path)
