"""What ViT a converted (big_vision-named) backbone describes, and the strict check that the
arrays are exactly that model's parameters: every one present, nothing else, shapes equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpt_jax.backbones.vit_timm import expect_shape
from lpt_jax.backbones.vit_weights import check_floating
from lpt_jax.errors import CheckpointError

_BLOCK = "Transformer/encoderblock_"


def vit_shapes(backbone: dict, path: str) -> dict:
    """`model.vit` fields read from the shapes: width, depth, mlp_dim, patch_size, image_size,
    pool_type ('tok' with a class token, else 'gap'), representation_size, num_classes."""
    kernel = backbone["embedding/kernel"]  # (p, p, 3, D)
    depth = len({k[len(_BLOCK):].split("/")[0] for k in backbone if k.startswith(_BLOCK)})
    fc1 = backbone.get(f"{_BLOCK}0/MlpBlock_0/Dense_0/kernel")
    if depth == 0 or fc1 is None:
        raise CheckpointError(f"{path} is not a ViT state dict: it has no blocks.0.mlp.fc1.weight")
    for name in (f"{_BLOCK}0/MlpBlock_0/Dense_0/kernel", "head/kernel", "pre_logits/kernel"):
        if name in backbone:  # their widths become the model's: (in, out)
            expect_shape(path, name, backbone[name], backbone[name].ndim == 2, "(in, out)")
    pos = backbone.get("pos_embedding")
    grid = int(round(np.sqrt(pos.shape[1]))) if pos is not None else 0
    if pos is None or grid * grid != pos.shape[1]:
        raise CheckpointError(f"{path}: pos_embed {None if pos is None else tuple(pos.shape)} "
                              "is not a square patch grid (plus the class-token row)")
    head, pre = backbone.get("head/kernel"), backbone.get("pre_logits/kernel")
    return dict(width=int(kernel.shape[3]), depth=depth, mlp_dim=int(fc1.shape[1]),
                patch_size=int(kernel.shape[0]), image_size=grid * int(kernel.shape[0]),
                pool_type="tok" if "cls" in backbone else "gap",
                representation_size=int(pre.shape[1]) if pre is not None else 0,
                num_classes=int(head.shape[1]) if head is not None else None)


def abstract_params(model) -> dict:
    """Names, shapes and dtypes of a model's params (nothing computed)."""
    size = model.backbone.image_size if hasattr(model, "backbone") else model.image_size
    h, w = (size, size) if isinstance(size, int) else size
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def check_fits(path: str, have: dict, want: dict, what: str) -> None:
    """`have` (flat arrays) holds exactly the flat shapes `want`, floating point where the
    model's parameter is; else one CheckpointError."""
    check_floating(path, have, want)
    missing = sorted(f"{k} {tuple(want[k].shape)}" for k in want if k not in have)
    unexpected = sorted(f"{k} {tuple(have[k].shape)}" for k in have if k not in want)
    wrong = sorted(f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}" for k in want
                   if k in have and tuple(have[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{title} ({len(items)}): {'; '.join(items[:4])}"
                 + ("; ..." if len(items) > 4 else "")
                 for title, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", wrong)) if items]
        raise CheckpointError(f"{path} does not fit {what}: " + " | ".join(parts))
