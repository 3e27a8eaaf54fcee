"""Frozen backbones, found by name (`model.backbone`), as big_vision finds its models.

A backbone family is one module (`lpt_jax.backbones.vit`) that owns everything about it:

    FIELDS                        its config section `model.<name>` (lpt_jax.config.fields):
                                  defaults, accepted values, roles, rules
    from_config(cfg) -> module    the Flax module, from that section
    load_params(path, abstract_params, *, dont_load, ignore, model, subtree) -> params
                                  its pretrained `params` read from `path`, shaped like
                                  `abstract_params`; `dont_load` / `ignore`: full-match regexes
                                  over 'a/b/c' names of params that keep their init / file
                                  arrays that may stay unused; `model` is what from_config
                                  built; `subtree` one tower of a two-tower file ('' = none)

The module from_config builds is what the method runs (lpt_jax.method.lpt_model):

    depth, width                  number of blocks, token width D
    image_size: (H, W)            the input size
    dtype                         its compute dtype
    keep_float32: tuple           regexes over its param paths kept in float32 when the rest
                                  is stored in `dtype` (what its layers multiply in float32)
    embed(images) -> x            NHWC images in [-1, 1] -> tokens (B, T, D)
    encode(x, start, stop, extras, extra_position) -> x
                                  blocks start..stop-1; `extras[i]`: tokens (P, D) or (B, P, D)
                                  block i attends over as well ('append': after its tokens,
                                  'after_cls': after the first), not carried to the next block
    features(x) -> (B, D)         encoded tokens -> the normed, pooled feature
    encode_features(x, start, extras, extra_position) -> (B, D)
                                  features(encode(x, start, depth, ...)), free to skip work
                                  whose outputs the pooling discards

`register(name, module)` adds one (a test can register a toy backbone for its own duration).
The `backbone` section (which file, which tower, what to ignore) is declared here: it is
every family's.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Mapping, Optional

from lpt_jax.config.fields import LOCATION, SERVING, Field, Section, patterns, text
from lpt_jax.errors import CheckpointError, ConfigError

_BUILTIN = {"vit": "lpt_jax.backbones.vit"}   # name -> module
_REGISTERED: dict[str, ModuleType] = {}
_REQUIRED = ("FIELDS", "from_config", "load_params")

AUGREG_B16_IN21K = ("gs://vit_models/augreg/"
                    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")

LOADING = Section("the pretrained backbone file", dict(
    checkpoint=Field(AUGREG_B16_IN21K, "the backbone's weight file (.npz, .safetensors, .pth, "
                     ".bin; local or gs://)", text(), LOCATION, SERVING),
    subtree=Field("", "one tower of a two-tower file (SigLIP: 'img'); '' = the whole file",
                  text(r"([^/]+(/[^/]+)*)?", "a tower name such as 'img' (SigLIP two-tower "
                       "files), or '' for a single-tower file")),
    ignore=Field(("head/.*", "pre_logits/.*"), "file arrays that may stay unused (regexes)",
                 patterns()),
    dont_load=Field((), "model params that keep their init (regexes)", patterns())))


def register(name: str, module) -> Optional[ModuleType]:
    """Adds (or replaces) the backbone family `name`; returns the one it replaced."""
    missing = [a for a in _REQUIRED if not hasattr(module, a)]
    if missing:
        raise ValueError(f"backbone module {name!r} lacks {missing}")
    previous = _REGISTERED.get(name)
    _REGISTERED[name] = module
    return previous


def unregister(name: str, previous=None) -> None:
    if previous is None:
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = previous


def known() -> list[str]:
    return sorted(set(_REGISTERED) | set(_BUILTIN))


def get(name: str) -> ModuleType:
    """The backbone module `name`."""
    if name not in _REGISTERED and name in _BUILTIN:
        register(name, importlib.import_module(_BUILTIN[name]))
    if name not in _REGISTERED:
        raise ConfigError(f"model.backbone={name!r}: known backbones are {known()}",
                          field="model.backbone")
    return _REGISTERED[name]


def from_config(model_cfg):
    """The backbone module `model.backbone` names, built from its section `model.<name>`."""
    name = model_cfg.backbone
    section = getattr(model_cfg, name, None)
    if section is None:
        raise ConfigError(f"model.backbone={name!r} but the config has no model.{name}",
                          field="model.backbone")
    return get(name).from_config(section)


def check_finite(params: Mapping, path: str) -> None:
    """One CheckpointError if a loaded weight holds NaN or inf (a damaged or hostile file):
    every output would be, with nothing else to tell."""
    import numpy as np

    from lpt_jax.tree import flatten
    for name, value in flatten(params).items():
        a = np.asarray(value)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{path} holds non-finite values in {name} ({bad} of "
                                  f"{a.size}): a backbone with NaN or inf weights gives NaN "
                                  "outputs", path=path)


def stored_in_compute_dtype(params: Mapping, backbone) -> dict:
    """`params` with the frozen backbone's weights (`params['backbone']`) stored in the
    backbone's compute dtype, as its layers read them: a bfloat16 model then holds no float32
    copy of the frozen weights and converts none per step. The params the backbone names in
    `keep_float32` keep their dtype (e.g. LayerNorm scales, which Flax multiplies in float32)."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(getattr(backbone, "dtype", jnp.float32))
    if "backbone" not in params or dtype == jnp.float32:
        return params
    keep = tuple(getattr(backbone, "keep_float32", ()))

    def cast(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if any(re.search(p, name) for p in keep):
            return leaf
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    return {**params, "backbone": jax.tree_util.tree_map_with_path(cast, params["backbone"])}
