"""Models: the frozen backbones and the LPT prompts around them (`lpt_jax.models.lpt`).

Backbones are found by name, as big_vision finds its models: `get_backbone("vit")` imports
and returns the module `lpt_jax.models.vit`. The config picks one with `model.backbone`
(default "vit"), and its settings live in the section of the same name (`model.vit`). A new
backbone family (e.g. a SigLIP image tower) is one new file `lpt_jax/models/<name>.py` plus a
config that sets `model.backbone = "<name>"` and `model.<name> = {...}`.

A backbone module provides two functions:

    from_config(cfg) -> flax.linen.Module
        builds the backbone from its config section (`model.<name>`);
    load_params(path, abstract_params, *, dont_load, ignore, model) -> params
        the backbone's pretrained `params` collection read from `path`, shaped like
        `abstract_params` (a tree of arrays or jax.ShapeDtypeStruct); `dont_load` / `ignore`
        are full-match regexes over 'a/b/c' names of model params that keep their init /
        checkpoint arrays that may stay unused; `model` is the module from_config built;
        a `subtree` keyword (one tower of a two-tower file, `backbone.subtree`) is passed
        only when the config sets one (the ViT's load_params takes it).

The module it builds is what `LPT` runs (`lpt_jax.models.lpt`); LPT uses exactly:

    depth: int, width: int       attributes: number of blocks, token width D
    image_size: (H, W)           attribute: the input size (callers build the dummy init input)
    embed(images) -> x           NHWC images in [-1, 1] -> tokens (B, T, D)
    encode(x, start, stop, extras, extra_position) -> x
                                 blocks start..stop-1; `extras` maps a block index i to
                                 tokens (P, D) or (B, P, D) that block i's tokens attend over
                                 as well ('append': after them, or 'after_cls': after the
                                 first); they are not carried to the next block, so the
                                 sequence length is unchanged
    features(x) -> (B, D)        encoded tokens -> the normed, pooled feature (its width must
                                 be D: the prompt keys are matched against it)
    encode_features(x, start, extras, extra_position) -> (B, D)
                                 features(encode(x, start, depth, ...)), free to skip work
                                 whose outputs the pooling discards

Its parameters live under `params['backbone']` of the LPT tree and are frozen in both phases.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from lpt_jax.errors import ConfigError

# Modules of this package that are not backbones (siglip_text: the text tower that
# initialises the head, lpt_jax.text_head).
_NOT_BACKBONES = frozenset({"vit_weights", "vit_timm"})
_REQUIRED = ("from_config", "load_params")


def known_backbones() -> list[str]:
    """Names of the backbone modules in this package (found without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_BACKBONES)


def get_backbone(name: str) -> ModuleType:
    """The backbone module `lpt_jax.models.<name>` (see this package's docstring)."""
    if not isinstance(name, str) or not name.isidentifier() or name in _NOT_BACKBONES:
        raise ConfigError(f"model.backbone={name!r}: known backbones are {known_backbones()}")
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its imports is missing
            raise
        raise ConfigError(
            f"model.backbone={name!r}: no module {module_name}; known backbones are "
            f"{known_backbones()}") from None
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ConfigError(f"{module_name} is not a backbone module: it lacks {missing}")
    return module
