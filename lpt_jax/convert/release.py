"""The PyTorch LPT release's whole-model checkpoint (e.g. `LPT_places.pth`) as our LPT.

The release saves `{'state_dict': model.state_dict(), ...}` of its `VPT_ViT`, a timm
`VisionTransformer` (names as in `timm_names`) with a `prompt_learner`:

    prompt_learner.Prompt_Tokens       (depth, P, D)       -> shared_prompt
    prompt_learner.Prompt_Tokens_pool  (M, depth-K, P, D)  -> pool_prompts
    prompt_learner.Prompt_Keys         (M, D)              -> pool_keys
    prompt_learner.head.weight         (D, C), (in, out)   -> head/kernel (same layout)

Depth, width, MLP width, patch, image size, P, M, K and C follow from the shapes; the heads
from the width (`timm_names.STANDARD_HEADS`) or `num_heads`; top-k is the release's 2 unless
given. Its numerics (spec §1): every LayerNorm built by `nn.LayerNorm` (eps 1e-5), exact erf
GELU, class-token pooling, inputs normalised with mean = std = 0.5; eval resize to a square
of image_size * 8 // 7, centre crop image_size.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections
import numpy as np

from lpt_jax.backbones.vit_timm import heads_for_width, timm_to_big_vision, width_of
from lpt_jax.convert.fit import abstract_params, check_fits, vit_shapes
from lpt_jax.errors import CheckpointError
from lpt_jax.method.lpt_model import LPT, lpt_from_config
from lpt_jax.tree import flatten, unflatten
from lpt_jax.weights.state_dict import read_state_dict

PREFIX = "prompt_learner."
PROMPT_NAMES = {  # release name -> our parameter path
    "Prompt_Tokens": "shared_prompt",
    "Prompt_Tokens_pool": "pool_prompts",
    "Prompt_Keys": "pool_keys",
    "head.weight": "head/kernel",
}
RELEASE_TOP_K = 2
# The release's fixed numerics and settings (spec §1, §2): model.vit / model.lpt fields.
RELEASE_VIT = dict(variant=None, pool_type="tok", representation_size=0,
                   layernorm_epsilon=1e-5, gelu_approximate=False, dtype="float32", remat=False)
RELEASE_LPT = dict(head_dropout=0.1, prompt_init_std=0.02, prompt_position="append")
# The published LPT_places.pth: ViT-B/16 at 224 px, 10-token prompts, 20 x 6-block pool,
# top-2, 365 classes. configs/places_lt.py has exactly these defaults (tests check it).
PLACES_RELEASE = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16,
                      image_size=224, prompt_length=10, pool_size=20, shared_depth=6, top_k=2,
                      num_classes=365)


@dataclasses.dataclass
class Release:
    """A release checkpoint read into our names: model sections and flat arrays."""
    path: str
    vit: dict              # the `model.vit` config section
    lpt: dict              # the `model.lpt` config section
    num_classes: int
    backbone: dict         # flat big_vision-named arrays (views of the file's storages)
    prompts: dict          # flat: shared_prompt, pool_prompts, pool_keys, head/kernel

    def model_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(backbone="vit", vit=dict(self.vit),
                                              lpt=dict(self.lpt)))

    def shapes(self) -> dict:
        """The release's sizes, in PLACES_RELEASE's terms."""
        return dict(**{k: self.vit[k] for k in ("width", "depth", "num_heads", "mlp_dim",
                                                  "patch_size", "image_size")},
                    **{k: self.lpt[k] for k in ("prompt_length", "pool_size", "shared_depth",
                                                  "top_k")},
                    num_classes=self.num_classes)

    def params(self) -> dict:
        return unflatten({**{f"backbone/{k}": v for k, v in self.backbone.items()},
                          **self.prompts})


def read_release(path: str, num_heads: Optional[int] = None,
                 top_k: int = RELEASE_TOP_K) -> Release:
    """Reads and checks a release checkpoint; every problem is one `CheckpointError`."""
    state = read_state_dict(path)
    found = {name: state.pop(PREFIX + name) for name in PROMPT_NAMES if PREFIX + name in state}
    missing = [PREFIX + n for n in PROMPT_NAMES if n not in found]
    if missing:
        raise CheckpointError(f"{path} is not an LPT release checkpoint: it has no "
                              f"{', '.join(missing)}")
    stray = sorted(k for k in state if k.startswith(PREFIX))
    if stray:
        raise CheckpointError(f"{path}: unknown prompt_learner entries {', '.join(stray)}")

    shared, pool = found["Prompt_Tokens"], found["Prompt_Tokens_pool"]
    keys, head = found["Prompt_Keys"], found["head.weight"]
    width = width_of(state, path)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    _expect(path, "Prompt_Tokens", shared, f"(depth={depth}, P, D={width})",
            shared.ndim == 3 and shared.shape[0] == depth and shared.shape[2] == width)
    prompt_length = shared.shape[1]
    _expect(path, "Prompt_Tokens_pool", pool, f"(M, depth - K, P={prompt_length}, D={width})",
            pool.ndim == 4 and pool.shape[2:] == (prompt_length, width)
            and 0 < pool.shape[1] <= depth)
    pool_size = pool.shape[0]
    _expect(path, "Prompt_Keys", keys, f"(M={pool_size}, D={width})",
            keys.shape == (pool_size, width))
    _expect(path, "head.weight", head, f"(D={width}, C), stored (in, out)",
            head.ndim == 2 and head.shape[0] == width)
    if not 1 <= top_k <= pool_size:
        raise CheckpointError(f"top_k={top_k} must be within [1, {pool_size}] (the pool size)")

    heads = heads_for_width(width, num_heads, path)
    backbone = timm_to_big_vision(state, num_heads=heads, path=path)
    if "cls" not in backbone:
        raise CheckpointError(f"{path}: no cls_token; the release's ViT pools its class token")
    shapes = vit_shapes(backbone, path)
    shapes.pop("num_classes")  # a timm head is not the release's: check_fits reports it
    vit = dict(RELEASE_VIT, **shapes, num_heads=heads)  # pre-logits, if any: applied as timm does
    lpt = dict(RELEASE_LPT, prompt_length=prompt_length, pool_size=pool_size,
               shared_depth=depth - pool.shape[1], top_k=top_k)
    prompts = {"shared_prompt": shared, "pool_prompts": pool, "pool_keys": keys,
               "head/kernel": head}
    release = Release(path, vit, lpt, int(head.shape[1]), backbone, prompts)
    _check_fits(release)  # before the cast: int32 prompts are refused, not converted
    release.prompts = {k: np.asarray(v, np.float32) for k, v in prompts.items()}
    return release


def _expect(path, name, array, shape, ok) -> None:
    if not ok:
        raise CheckpointError(f"{path}: {PREFIX}{name} has shape {tuple(array.shape)}, "
                              f"expected {shape}")


def build_model(release: Release) -> LPT:
    return lpt_from_config(release.model_config(), release.num_classes)


def _check_fits(release: Release) -> None:
    """The backbone loader's strict rule, on the arrays in memory, against the LPT model the
    shapes describe."""
    have = {f"backbone/{k}": v for k, v in release.backbone.items()}
    have.update(release.prompts)
    check_fits(release.path, have, flatten(abstract_params(build_model(release))),
               f"the LPT model its shapes describe ({release.vit['width']} wide, "
               f"{release.vit['depth']} blocks)")


def load_release(path: str, num_heads: Optional[int] = None,
                 top_k: int = RELEASE_TOP_K) -> tuple[LPT, dict]:
    """(model, params) of a release checkpoint: `model.apply({'params': params}, images,
    method=LPT.phase2)` gives the release model's outputs for NHWC images normalised as the
    release does ((x / 255 - 0.5) / 0.5, i.e. in [-1, 1])."""
    release = read_release(path, num_heads, top_k)
    return build_model(release), release.params()
