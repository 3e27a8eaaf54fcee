"""Loading big_vision and vit_jax/AugReg ViT checkpoints into `lpt_jax.models.vit.ViT` params.

Both layouts are normalised to big_vision's names before matching:
  * optional `params/` prefix is stripped;
  * vit_jax/AugReg: `Transformer/posembed_input/pos_embedding` holds a CLS row first; it is
    folded into `cls` (exact: the CLS token only ever sees cls + posemb[0]); block modules use
    global numbering (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`);
  * scan layout (`Transformer/encoderblock/...` with a leading depth axis) is unstacked.
Position embeddings are resampled bilinearly to the model's grid when they differ
(`scipy.ndimage.zoom(order=1)`, as big_vision does).

Then every model parameter must be loaded or match a `dont_load` pattern (it keeps its init),
and every checkpoint array must be used or match an `ignore` pattern; shapes must agree.
Anything else is one `CheckpointError` listing all problems with their shapes.
"""

from __future__ import annotations

import hashlib
import zipfile
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import scipy.ndimage

from lpt_jax import files
from lpt_jax.tree import flatten, matches as _matches, unflatten


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ------------------------------------------------------------------------------------------
# Reading arrays.

def _open_checkpoint(path: str):
    """`files.open_read(path)`; a missing or unopenable file is a one-line `CheckpointError`."""
    try:
        if not files.exists(path):  # remote files open lazily: ask first
            raise CheckpointError(f"checkpoint not found: {path}")
        return files.open_read(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except files.RemoteError as e:
        raise CheckpointError(
            f"cannot reach {path} ({e}); without network, download it once where there is "
            "one (e.g. gsutil cp) and point --config.backbone.checkpoint at the local copy"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror or e}") from None


_MIB = 1 << 20


def file_fingerprint(path: str) -> dict:
    """Identity of a (possibly huge, possibly remote) file without reading all of it:
    ``{"path", "size", "sha256_head_tail"}``, the sha256 over its first and last MiB."""
    with _open_checkpoint(path) as f:
        size = files.size(path)
        head = f.read(_MIB)
        if size > 2 * _MIB:
            f.seek(size - _MIB)
        tail = f.read(_MIB) if size > _MIB else b""  # 1-2 MiB: the bytes after the head
    return {"path": path, "size": size,
            "sha256_head_tail": hashlib.sha256(head + tail).hexdigest()}


def _fix_dtype(a: np.ndarray) -> np.ndarray:
    # numpy cannot name bfloat16: np.save writes it as 2-byte void. Reinterpret, then widen.
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        a = a.view(ml_dtypes.bfloat16)
    if a.dtype == ml_dtypes.bfloat16:
        a = a.astype(np.float32)
    return a


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """Reads a flat {name: array} dict from an .npz (or structured .npy), never unpickling.

    The .npz is read member by member straight from the (local or `gs://`) file object, so
    peak host memory stays at the checkpoint's size (1.0x measured for ViT-B/16, see
    benchmarks/results/backbone_load_memory.md); reading a remote file into bytes first
    would cost 3x.
    """
    f = _open_checkpoint(path)
    try:
        loaded = np.load(f, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # .npy: only a structured array can hold a tree
            if loaded.dtype.names is None:
                raise CheckpointError(
                    f"{path} holds a single {loaded.dtype} array of shape {loaded.shape}, "
                    "not a parameter tree: save checkpoints with np.savez")
            record = loaded.reshape(-1)[0]
            return {k: _fix_dtype(np.array(record[k])) for k in loaded.dtype.names}
        with loaded:
            return {k: _fix_dtype(loaded[k]) for k in loaded.files}
    except CheckpointError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({msg})") from None
    finally:
        f.close()


# ------------------------------------------------------------------------------------------
# Layout normalisation.

_VIT_JAX_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def to_big_vision_layout(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a flat checkpoint dict of either layout to big_vision's unscanned names."""
    out = {}
    for key, a in arrays.items():
        key = key[len("params/"):] if key.startswith("params/") else key
        parts = key.split("/")
        parts = [_VIT_JAX_BLOCK_NAMES.get(p, p) for p in parts]
        out["/".join(parts)] = a

    old_pos = out.pop("Transformer/posembed_input/pos_embedding", None)
    if old_pos is not None:
        if "cls" in out:  # vit_jax adds posemb[0] to the CLS token; fold it in (exact)
            out["cls"] = out["cls"] + old_pos[:, :1]
            old_pos = old_pos[:, 1:]
        out["pos_embedding"] = old_pos

    scanned = [k for k in out if k.startswith("Transformer/encoderblock/")]
    for key in scanned:
        stacked = out.pop(key)
        rest = key[len("Transformer/encoderblock/"):]
        for i in range(stacked.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = stacked[i]
    return out


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
    """(1, g*g, D) on a square grid -> (1, nh*nw, D), bilinear with end points aligned, as
    big_vision's `resample_posemb` (scipy.ndimage.zoom, order=1)."""
    n, d = posemb.shape[1], posemb.shape[2]
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise CheckpointError(f"pos_embedding has {n} rows, not a square grid: cannot resample")
    nh, nw = new_grid
    grid = np.asarray(posemb, np.float32).reshape(g, g, d)
    grid = scipy.ndimage.zoom(grid, (nh / g, nw / g, 1), order=1)
    return grid.reshape(1, nh * nw, d)


# ------------------------------------------------------------------------------------------
# Matching against the model.

def load_params(path: str, init_params: Mapping, *, dont_load: Iterable[str] = (),
                ignore: Iterable[str] = (), grid: tuple[int, int] | None = None) -> dict:
    """Loads a ViT checkpoint into a copy of `init_params` (the ViT's `params` collection).

    Args:
      path: local or remote (`gs://`) `.npz` checkpoint in big_vision or vit_jax layout.
      init_params: the freshly initialised ViT params; gives names, shapes and dtypes.
      dont_load: regexes (full match on 'a/b/c' names) of model params that keep their init.
      ignore: regexes of checkpoint arrays that may stay unused (e.g. 'head/.*').
      grid: the model's patch grid (`ViT.grid`); inferred as square when omitted.
    """
    dont_load, ignore = tuple(dont_load), tuple(ignore)
    ckpt = to_big_vision_layout(read_arrays(path))
    model = flatten(init_params)

    if "pos_embedding" in ckpt and "pos_embedding" in model:
        want = model["pos_embedding"].shape
        have = ckpt["pos_embedding"].shape
        if have != want and have[-1] == want[-1]:
            g = int(round(np.sqrt(want[1])))
            ckpt["pos_embedding"] = resample_posemb(ckpt["pos_embedding"], grid or (g, g))

    loaded, missing, mismatched = {}, [], []
    for key, init in model.items():
        if _matches(key, dont_load):
            loaded[key] = init
        elif key not in ckpt:
            missing.append(f"{key} {tuple(init.shape)}")
        elif tuple(ckpt[key].shape) != tuple(init.shape):
            mismatched.append(f"{key}: checkpoint {tuple(ckpt[key].shape)} vs model "
                              f"{tuple(init.shape)}")
        else:
            loaded[key] = np.asarray(ckpt[key], dtype=init.dtype)
    used = {k for k in model if k in ckpt and not _matches(k, dont_load)}
    unexpected = [f"{k} {tuple(a.shape)}" for k, a in ckpt.items()
                  if k not in used and not _matches(k, ignore) and not _matches(k, dont_load)]

    if missing or mismatched or unexpected:
        lines = [f"checkpoint {path} does not fit the model:"]
        for title, items in (("missing from checkpoint", missing),
                             ("shape mismatch", mismatched),
                             ("unexpected in checkpoint (add to ignore if intended)", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(sorted(items)))
        raise CheckpointError("\n".join(lines))
    return unflatten(loaded)


def save_big_vision_npz(path: str, params: Mapping, *, scan: bool = False) -> None:
    """Writes ViT params as a big_vision .npz (optionally in scan layout)."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    if scan:
        blocks: dict[str, list] = {}
        for key in sorted(k for k in flat if k.startswith("Transformer/encoderblock_")):
            idx, rest = key[len("Transformer/encoderblock_"):].split("/", 1)
            blocks.setdefault(rest, []).append((int(idx), flat.pop(key)))
        for rest, items in blocks.items():
            flat[f"Transformer/encoderblock/{rest}"] = np.stack([a for _, a in sorted(items)])
    with files.open_write(path) as f:
        np.savez(f, **flat)
