"""The ViT's loader: big_vision, vit_jax/AugReg and timm checkpoints into `backbones.vit.ViT` params.

Both layouts are normalised to big_vision's names before matching:
  * optional `params/` prefix is stripped;
  * a big_vision two-tower file (SigLIP: `params/img/...`, `params/txt/...`, `params/t`,
    `params/b`) loads one tower, chosen with `subtree` ('img' or 'txt'); without a choice it
    is refused (one line), as is a choice the file does not have;
  * vit_jax/AugReg: `Transformer/posembed_input/pos_embedding` holds a CLS row first; it is
    folded into `cls` (exact: the CLS token only ever sees cls + posemb[0]); block modules use
    global numbering (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`);
  * scan layout (`Transformer/encoderblock/...` with a leading depth axis) is unstacked;
  * timm / Hugging Face state dicts (`.safetensors`, `.pth`, `.pt`, `.bin`) are read without
    torch (`lpt_jax.weights`) and renamed to big_vision's names (`vit_timm`).
Position embeddings are resampled bilinearly to the model's grid when they differ
(`scipy.ndimage.zoom(order=1)`, as big_vision does).

The checkpoint's pooling (a `MAPHead_0` -> 'map', a `cls` token -> 'tok', else 'gap') must be
the model's; a mismatch is one line naming both. Then every model parameter must be loaded
or match a `dont_load` pattern (it keeps its init),
and every checkpoint array must be used or match an `ignore` pattern; shapes must agree.
Anything else is one `CheckpointError` listing all problems with their shapes.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from lpt_jax.backbones import vit_timm
from lpt_jax.errors import CheckpointError, Setting
from lpt_jax.tree import flatten, unflatten
from lpt_jax.tree import matches as _matches
from lpt_jax.weights import state_dict
from lpt_jax.weights.npz import read_npz, write_npz

# ------------------------------------------------------------------------------------------
# Reading arrays.

def read_arrays(path: str, *, num_heads: int | None = None) -> dict[str, np.ndarray]:
    """A flat {name: array} dict of a ViT weight file: an .npz (or structured .npy) as stored,
    never unpickled; `.safetensors`, `.pth`, `.pt` and `.bin` files are timm / Hugging Face
    ViT state dicts, read without torch and without running anything from them
    (`lpt_jax.weights`) and renamed to big_vision's names (`vit_timm`); `num_heads` splits
    their fused qkv weights (default: the standard ViT size of that width)."""
    if state_dict.is_torch_world(path):
        return vit_timm.timm_to_big_vision(state_dict.read_state_dict(path),
                                           num_heads=num_heads, path=path)
    return read_npz(path)


def num_heads_of(params: Mapping) -> int | None:
    """The attention heads of a ViT params tree (its first query kernel is (D, heads, D/heads)),
    which a timm state dict's fused qkv weights need; None if it has no such kernel."""
    for key, value in flatten(params).items():
        if key.endswith("MultiHeadDotProductAttention_0/query/kernel") and len(value.shape) == 3:
            return int(value.shape[1])
    return None


# ------------------------------------------------------------------------------------------
# Layout normalisation.

_VIT_JAX_BLOCK_NAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


# First path components of the towers of a big_vision two-tower (image-text) checkpoint.
TOWERS = ("img", "txt")


def select_subtree(arrays: Mapping[str, np.ndarray], subtree: str = "",
                   source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The arrays under `subtree/` (prefix removed); with no `subtree`, all of them, unless
    the file is a two-tower one (then a one-line `CheckpointError` asks for a tower)."""
    arrays = {(k[len("params/"):] if k.startswith("params/") else k): a
              for k, a in arrays.items()}
    groups = sorted({k.split("/", 1)[0] for k in arrays if "/" in k})
    towers = [g for g in groups if g in TOWERS]
    if not subtree:
        if towers:
            raise CheckpointError(
                f"{source} is a two-tower (image + text) file with the subtrees {towers}: "
                "choose the image tower with ", Setting("backbone.subtree", "img"))
        return dict(arrays)
    prefix = subtree.strip("/") + "/"
    out = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
    if not out:
        have = (f"its subtrees are {groups}" if towers else
                "it is a single-tower file: leave backbone.subtree empty")
        raise CheckpointError(f"{source} has no subtree {subtree!r} ({have})")
    return out


def pool_type_of(names: Iterable[str]) -> str:
    """The pooling a ViT parameter set implies: 'map' (a MAPHead_0), 'tok' (a cls token) or
    'gap' (neither)."""
    names = set(names)
    if any(n.startswith("MAPHead_0/") for n in names):
        return "map"
    return "tok" if "cls" in names else "gap"


def to_big_vision_layout(arrays: Mapping[str, np.ndarray], subtree: str = "",
                         source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Renames a flat checkpoint dict of either layout to big_vision's unscanned names;
    `subtree` picks a tower of a two-tower file (`select_subtree`)."""
    out = {}
    for key, a in select_subtree(arrays, subtree, source).items():
        parts = key.split("/")
        parts = [_VIT_JAX_BLOCK_NAMES.get(p, p) for p in parts]
        out["/".join(parts)] = a

    old_pos = out.pop("Transformer/posembed_input/pos_embedding", None)
    if old_pos is not None:
        kernel = out.get("embedding/kernel")  # (p, p, 3, D)
        width = kernel.shape[3] if kernel is not None and kernel.ndim == 4 else None
        vit_timm.expect_shape(source, "Transformer/posembed_input/pos_embedding", old_pos,
                              old_pos.ndim == 3 and old_pos.shape[0] == 1
                              and old_pos.shape[2] == (width or old_pos.shape[2]),
                              f"(1, N, {width or 'D'})")
        width = old_pos.shape[2]
        if "cls" in out:  # vit_jax adds posemb[0] to the CLS token; fold it in (exact)
            vit_timm.expect_shape(source, "cls", out["cls"], out["cls"].shape == (1, 1, width),
                                  f"(1, 1, {width})")
            out["cls"] = out["cls"] + old_pos[:, :1]
            old_pos = old_pos[:, 1:]
        out["pos_embedding"] = old_pos

    # Scan layout: the image tower's `Transformer/encoderblock/...`, the text tower's
    # `Encoder_0/encoderblock/...`, with the depth as the leading axis.
    scanned = [k for k in out if k.split("/")[:2] in (["Transformer", "encoderblock"],
                                                      ["Encoder_0", "encoderblock"])]
    for key in scanned:
        stacked = out.pop(key)
        vit_timm.expect_shape(source, key, stacked, stacked.ndim >= 1, "(depth, ...)")
        encoder, _, rest = key.split("/", 2)
        for i in range(stacked.shape[0]):
            out[f"{encoder}/encoderblock_{i}/{rest}"] = stacked[i]
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
                ignore: Iterable[str] = (), grid: tuple[int, int] | None = None,
                subtree: str = "", resample: bool = True) -> dict:
    """Loads a ViT checkpoint into a copy of `init_params` (the ViT's `params` collection).

    Args:
      path: local or remote (`gs://`) `.npz` checkpoint in big_vision or vit_jax layout.
      init_params: the freshly initialised ViT params; gives names, shapes and dtypes.
      dont_load: regexes (full match on 'a/b/c' names) of model params that keep their init.
      ignore: regexes of checkpoint arrays that may stay unused (e.g. 'head/.*').
      grid: the model's patch grid (`ViT.grid`); inferred as square when omitted.
      subtree: the tower of a two-tower file ('img' or 'txt'); '' for a single-tower file.
      resample: False for a text tower, whose position table is not a patch grid.
    """
    dont_load, ignore = tuple(dont_load), tuple(ignore)
    ckpt = to_big_vision_layout(read_arrays(path, num_heads=num_heads_of(init_params)),
                                subtree, f"checkpoint {path}")
    model = flatten(init_params)
    _check_pooling(path, ckpt, model, dont_load, ignore)
    check_floating(f"checkpoint {path}", ckpt, model, dont_load)

    if resample and "pos_embedding" in ckpt and "pos_embedding" in model:
        want = model["pos_embedding"].shape
        have = ckpt["pos_embedding"].shape
        if have != want and len(have) == 3 and have[0] == 1 and have[-1] == want[-1]:
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


def _check_pooling(path, ckpt, model, dont_load, ignore) -> None:
    """One line when the checkpoint was trained with another pooling than the model's (a MAP
    head or a class token too many or too few), instead of a list of odd names."""
    have = pool_type_of(k for k in ckpt if not _matches(k, ignore))
    want = pool_type_of(k for k in model if not _matches(k, dont_load))
    if have != want:
        raise CheckpointError(
            f"checkpoint {path} has {_POOL_WORDS[have]} (pool_type={have!r}) but the model is "
            f"built with pool_type={want!r}: set ", Setting("model.vit.pool_type", have))


def check_floating(source: str, ckpt: Mapping, model: Mapping,
                   dont_load: Iterable[str] = ()) -> None:
    """One line when an array the model would load as floating point is not (int32, bool,
    ...): casting it would silently turn the weights into something else. `ckpt`: flat
    arrays, `model`: flat params (anything with a dtype), `source` names the file."""
    bad = sorted(k for k, init in model.items() if k in ckpt and not _matches(k, dont_load)
                 and is_floating(init.dtype) and not is_floating(ckpt[k].dtype))
    if bad:
        more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{source}: {bad[0]} is {np.dtype(ckpt[bad[0]].dtype).name}, but the model's "
            f"parameter is {np.dtype(model[bad[0]].dtype).name}{more}: weights are floating "
            "point")


def is_floating(dtype) -> bool:
    """float16/32/64 and bfloat16 (which numpy does not count as floating)."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


_POOL_WORDS = {"map": "a MAP head (MAPHead_0/...)", "tok": "a class token (cls)",
               "gap": "neither a MAP head nor a class token"}


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
    write_npz(path, flat)
