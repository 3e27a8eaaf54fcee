"""timm's ViT state-dict names -> big_vision's (the names `lpt_jax.backbones.vit.ViT` uses).

    cls_token (1,1,D) + pos_embed (1,1+N,D)  -> cls = cls_token + pos_embed[:, :1] (exact),
                                                pos_embedding = pos_embed[:, 1:]
    patch_embed.proj.weight (D,3,p,p)        -> embedding/kernel (p,p,3,D)
    blocks.i.norm1 / norm2                   -> Transformer/encoderblock_i/LayerNorm_0 / _1
    blocks.i.attn.qkv.weight (3D,D)          -> MultiHeadDotProductAttention_0/{query,key,value}/kernel (D,H,D/H)
    blocks.i.attn.proj.weight (D,D)          -> MultiHeadDotProductAttention_0/out/kernel (H,D/H,D)
    blocks.i.mlp.fc1 / fc2                   -> MlpBlock_0/Dense_0 / Dense_1
    norm                                     -> Transformer/encoder_norm
    head, pre_logits.fc                      -> head, pre_logits
    (LayerNorm weight -> scale; Linear weight (out,in) -> kernel (in,out))

Every result is a view of the input arrays (transposes and reshapes, no copies). Names this
table does not know (layer scale, fc_norm, register tokens, ...) pass through unchanged, so
the strict loader reports them as unexpected rather than this module guessing.
An array whose rank or width the renaming cannot use (a 1-D pos_embed, a 0-D qkv weight, a
cls_token of another width than patch_embed's) is one CheckpointError line naming it, rather
than an IndexError or a silent broadcast; other sizes are the strict loader's to report.

The number of heads is not in the weights; the standard ViT sizes give it by width.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from lpt_jax.errors import CheckpointError

# Width -> heads of the standard ViT sizes (Ti, S, B, L, H).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def heads_for_width(width: int, num_heads: Optional[int], path: str) -> int:
    """`num_heads` if given, else the standard size's; checks that it divides the width."""
    if num_heads is None:
        if width not in STANDARD_HEADS:
            raise CheckpointError(
                f"{path}: width {width} is not a standard ViT size "
                f"({', '.join(f'{w}: {h} heads' for w, h in STANDARD_HEADS.items())}) and the "
                "number of heads cannot be read from the weights: pass --num_heads (num_heads=)")
        num_heads = STANDARD_HEADS[width]
    if num_heads < 1 or width % num_heads:
        raise CheckpointError(f"{path}: num_heads={num_heads} does not divide the width {width}")
    return num_heads


def width_of(state_dict: Mapping[str, np.ndarray], path: str) -> int:
    w = state_dict.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        have = ", ".join(sorted(state_dict)[:6]) or "nothing"
        raise CheckpointError(f"{path} is not a timm ViT state dict: it has no "
                              f"patch_embed.proj.weight (D, 3, p, p) (it has {have}, ...)")
    return int(w.shape[0])


def timm_to_big_vision(state_dict: Mapping[str, np.ndarray], *, num_heads: Optional[int] = None,
                       path: str = "checkpoint") -> dict[str, np.ndarray]:
    """The flat big_vision-named arrays of a timm ViT state dict (see module doc)."""
    rest = dict(state_dict)
    width = width_of(rest, path)
    heads = heads_for_width(width, num_heads, path)
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        if src + ".weight" in rest:
            out[dst + "/kernel"] = rest.pop(src + ".weight").T
        if src + ".bias" in rest:
            out[dst + "/bias"] = rest.pop(src + ".bias")

    def norm(src: str, dst: str) -> None:
        if src + ".weight" in rest:
            out[dst + "/scale"] = rest.pop(src + ".weight")
        if src + ".bias" in rest:
            out[dst + "/bias"] = rest.pop(src + ".bias")

    out["embedding/kernel"] = rest.pop("patch_embed.proj.weight").transpose(2, 3, 1, 0)
    if "patch_embed.proj.bias" in rest:
        out["embedding/bias"] = rest.pop("patch_embed.proj.bias")
    _position_and_cls(rest, out, width, path)

    blocks = sorted({int(m.group(1)) for k in rest if (m := _BLOCK.match(k))})
    for i in blocks:
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        norm(src + "norm1", dst + "LayerNorm_0")
        norm(src + "norm2", dst + "LayerNorm_1")
        _attention(rest, out, src + "attn.", dst + "MultiHeadDotProductAttention_0/", heads,
                   path)
        linear(src + "mlp.fc1", dst + "MlpBlock_0/Dense_0")
        linear(src + "mlp.fc2", dst + "MlpBlock_0/Dense_1")
    norm("norm", "Transformer/encoder_norm")
    linear("head", "head")
    linear("pre_logits.fc", "pre_logits")
    out.update(rest)  # unknown names: reported by the strict loader, never dropped here
    return out


def expect_shape(path: str, name: str, array: np.ndarray, ok: bool, expected: str) -> None:
    """One line when `array` (named `name`) does not have the shape the renaming needs; the
    strict loader reports sizes, this only what would make slicing and reshaping fail or
    broadcast (a 1-D pos_embed, a 0-D qkv, a class token of another width)."""
    if not ok:
        raise CheckpointError(f"{path}: {name} has shape {tuple(array.shape)}, expected "
                              f"{expected}")


def _position_and_cls(rest: dict, out: dict, width: int, path: str) -> None:
    pos = rest.pop("pos_embed", None)
    cls = rest.pop("cls_token", None)
    if pos is not None:
        expect_shape(path, "pos_embed", pos, pos.ndim == 3 and pos.shape[0] == 1
                     and pos.shape[2] == width, f"(1, N, {width})")
    if cls is not None:
        expect_shape(path, "cls_token", cls, cls.shape == (1, 1, width), f"(1, 1, {width})")
        if pos is not None and _has_cls_row(pos.shape[1]):
            cls = cls + pos[:, :1]  # the CLS token only ever sees their sum: exact
            pos = pos[:, 1:]
        out["cls"] = cls
    if pos is not None:
        out["pos_embedding"] = pos


def _has_cls_row(rows: int) -> bool:
    """timm puts the CLS position first unless the model was built with no_embed_class; a
    square grid's table without that row has a square number of rows."""
    square = lambda n: n > 0 and int(round(n ** 0.5)) ** 2 == n  # noqa: E731
    return not (square(rows) and not square(rows - 1))


def _attention(rest: dict, out: dict, src: str, dst: str, heads: int, path: str) -> None:
    split = f"D divisible by {heads} heads"
    if src + "qkv.weight" in rest:
        w = rest.pop(src + "qkv.weight")  # (3D, D): rows q, k, v
        d = w.shape[-1] if w.ndim else 0
        expect_shape(path, src + "qkv.weight", w,
                     w.ndim == 2 and w.shape[0] == 3 * d and d > 0 and d % heads == 0,
                     f"(3D, D) with {split}")
        for j, name in enumerate(("query", "key", "value")):
            out[f"{dst}{name}/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
    if src + "qkv.bias" in rest:
        b = rest.pop(src + "qkv.bias")
        d = b.shape[0] // 3 if b.ndim else 0
        expect_shape(path, src + "qkv.bias", b,
                     b.ndim == 1 and b.shape[0] == 3 * d and d > 0 and d % heads == 0,
                     f"(3D,) with {split}")
        for j, name in enumerate(("query", "key", "value")):
            out[f"{dst}{name}/bias"] = b[j * d:(j + 1) * d].reshape(heads, d // heads)
    if src + "proj.weight" in rest:
        w = rest.pop(src + "proj.weight")  # (D_out, D_in); D_in is heads x head_dim
        expect_shape(path, src + "proj.weight", w,
                     w.ndim == 2 and w.shape[1] > 0 and w.shape[1] % heads == 0,
                     f"(D, D) with {split}")
        out[f"{dst}out/kernel"] = w.T.reshape(heads, w.shape[1] // heads, w.shape[0])
    if src + "proj.bias" in rest:
        out[f"{dst}out/bias"] = rest.pop(src + "proj.bias")
