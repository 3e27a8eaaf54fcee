"""What every phase, evaluation and prediction of a run shares, built once and checked before
anything is written: the mesh, the data source, the model and its parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lpt_jax import data, losses, models, parallel
from lpt_jax.backbone import file_fingerprint
from lpt_jax.errors import ConfigError
from lpt_jax.models.lpt import LPT, lpt_from_config
from lpt_jax.phases import PHASES, parse_phases


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    source: Any               # lpt_jax.data.Source: counts, class names, splits
    model: LPT
    params: dict              # the full LPT tree (host arrays; the backbone loaded)
    backbone_identity: dict   # size + hash of the backbone file, recorded in exports


def build_context(config, workdir: str, *, load_backbone: bool = True) -> Context:
    """Validates config, data and checkpoint, and builds the model and its parameters."""
    check_config(config)
    n = config.train.num_devices
    if n and n > jax.device_count():
        raise ConfigError(f"train.num_devices={n} but only {jax.device_count()} devices exist")
    mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
    for phase in PHASES.values():
        batch = phase.section(config).batch_size
        parallel.check_batch_size(batch, mesh, f"{phase.name}.batch_size")
        group = config.data.cb_images_per_class * jax.process_count()
        if batch % group:
            raise ConfigError(
                f"{phase.name}.batch_size={batch} must be a multiple of "
                f"data.cb_images_per_class x processes = {group}: the class-balanced batch "
                "comes in same-class groups")
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    source = data.get_source(config.data)
    model = lpt_from_config(config.model, source.num_classes)
    params = init_params(model, config)
    identity = {}
    if load_backbone:
        family = models.get_backbone(config.model.get("backbone", "vit"))
        params["backbone"] = family.load_params(
            config.backbone.checkpoint, params["backbone"], dont_load=config.backbone.dont_load,
            ignore=config.backbone.ignore, model=model.backbone)
        identity = file_fingerprint(config.backbone.checkpoint)
    return Context(config, workdir, mesh, source, model, params, identity)


def check_config(config) -> None:
    name = config.model.get("backbone", "vit")
    size = config.model[name].image_size
    if size != config.data.image_size:
        raise ConfigError(f"model.{name}.image_size={size} but data.image_size="
                          f"{config.data.image_size}: the backbone is built for the training "
                          "crop size")
    parse_phases(config.train.phases)
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={config.train.on_nonfinite!r}: 'stop' or 'skip'")
    for branch in ("cb", "ib"):
        name = config.loss[branch].name
        if name not in losses.LOSSES:
            raise ConfigError(f"loss.{branch}.name={name!r}; known: {sorted(losses.LOSSES)}")


def init_params(model: LPT, config) -> dict:
    """Initialises the LPT tree; the backbone part is only created abstractly (shapes), since
    it will be loaded (XLA drops its unused random init)."""
    size = model.backbone.image_size
    h, w = (size, size) if isinstance(size, int) else size
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(0)}

    def init_all():
        return model.init(rngs, dummy)["params"]

    def init_prompts():
        params = dict(init_all())
        params.pop("backbone")
        return params

    params = dict(jax.jit(init_prompts)())
    params["backbone"] = jax.eval_shape(init_all)["backbone"]
    return params
