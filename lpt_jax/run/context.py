"""What every phase, evaluation and prediction of a run shares, built once and checked before
anything is written: the mesh, the data source, the method, the model and its parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lpt_jax import backbones, data, parallel, tree
from lpt_jax.config import schema
from lpt_jax.errors import CheckpointError, ConfigError, Setting
from lpt_jax.method import registry
from lpt_jax.method.registry import Method
from lpt_jax.run import head_init
from lpt_jax.text import head as text_head
from lpt_jax.weights.npz import file_fingerprint


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    source: Any               # lpt_jax.data.Source: counts, class names, splits
    method: Method            # lpt_jax.method.registry: phases, objective, ...
    model: Any                # the method's Flax model around the backbone
    params: dict              # the full param tree (host arrays; the backbone loaded)
    backbone_identity: dict   # size + hash of the backbone file, recorded in exports


def build_context(config, workdir: str, *, load_backbone: bool = True,
                  trained_head: bool = False) -> Context:
    """Validates config, data and checkpoint, and builds the model and its parameters.
    `trained_head`: an export will supply the head (eval, predict), so model.head_init='text'
    or 'class_mean' need not run the text tower or the training images."""
    schema.check(config)
    method = registry.of(config)
    n = config.train.num_devices
    if n and n > jax.device_count():
        raise ConfigError(f"train.num_devices={n} but only {jax.device_count()} devices exist",
                          field="train.num_devices")
    mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
    for phase in method.phases:
        batch = phase.section(config).batch_size
        parallel.check_batch_size(batch, mesh, f"{phase.name}.batch_size")
        group = config.data.cb_images_per_class * jax.process_count()
        if batch % group:
            raise ConfigError(
                f"{phase.name}.batch_size={batch} must be a multiple of "
                f"data.cb_images_per_class x processes = {group}: the class-balanced batch "
                "comes in same-class groups", field=f"{phase.name}.batch_size")
        _check_microbatches(config.train.microbatches, batch, mesh.devices.size, phase.name)
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    source = data.get_source(config.data)
    _check_against_data(config, source)
    family = backbones.get(config.model.backbone)
    model = method.build(config.model, source.num_classes, family.from_config(
        config.model[config.model.backbone]))
    params = init_params(model, config)
    identity = {}
    if load_backbone:
        try:
            params["backbone"] = family.load_params(
                config.backbone.checkpoint, params["backbone"],
                dont_load=tuple(config.backbone.dont_load) + _initialised(model.backbone),
                ignore=config.backbone.ignore,
                model=model.backbone, subtree=config.backbone.subtree)
            backbones.check_finite(params["backbone"], config.backbone.checkpoint)
            identity = file_fingerprint(config.backbone.checkpoint)
        except CheckpointError as e:
            raise e.with_hint("check ", Setting("backbone.checkpoint"), " and ",
                              Setting(f"model.{config.model.backbone}"),
                              field="backbone.checkpoint") from None
        if config.model.head_init == "text" and not trained_head:
            params["head"] = _text_head(config, source, params["head"])
        if config.model.head_init == "class_mean" and not trained_head:
            kernel = head_init.class_mean_kernel(config, source, model.backbone,
                                                 params["backbone"], mesh)
            params["head"] = {**params["head"], "kernel": kernel}
    return Context(config, workdir, mesh, source, method, model, params, identity)


def _check_microbatches(k: int, batch: int, devices: int, phase: str) -> None:
    """Each device cuts its share of every stream into k equal slices (steps.py): k must
    divide batch / devices (then it divides the stream's batch too)."""
    share = batch // devices
    if share % k:
        where = "on the one device" if devices == 1 else f"on each of {devices} devices"
        raise ConfigError(
            f"train.microbatches={k} does not divide {phase}.batch_size={batch} per device "
            f"({share} image{'s' * (share != 1)} per stream {where}): choose a divisor of "
            f"{share}",
            field="train.microbatches")


def _text_head(config, source, head: dict) -> dict:
    """The cosine head's kernel from the class names through the text tower (computed once
    here; the tower's params are gone again when this returns)."""
    kernel = text_head.text_head_kernel(config, source.class_names, head["kernel"].shape[0])
    if kernel.shape != tuple(head["kernel"].shape):  # a bug, not a user error
        raise AssertionError(f"text head {kernel.shape} vs head {head['kernel'].shape}")
    return {**head, "kernel": kernel.astype(head["kernel"].dtype)}


def _check_against_data(config, source) -> None:
    """The config values that need the data to be judged."""
    split = config.eval.final_split
    if split not in source.splits:
        raise ConfigError(f"eval.final_split={split!r}, but {config.data.name} has the splits "
                          f"{sorted(source.splits)}", field="eval.final_split")


def expected_class_names(ctx: Context):
    """The class names an export loaded in this run must have been trained on (None when
    eval.allow_other_class_names lets any export through)."""
    return None if ctx.config.eval.allow_other_class_names else ctx.source.class_names


def init_params(model, config) -> dict:
    """Initialises the model's tree; the backbone part is only created abstractly (shapes),
    since it will be loaded (XLA drops its unused random init)."""
    size = model.backbone.image_size
    h, w = (size, size) if isinstance(size, int) else size
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(0)}

    def init_all():
        return model.init(rngs, dummy)["params"]

    initialised = _initialised(model.backbone)

    def init_prompts():
        params = dict(init_all())
        backbone = params.pop("backbone")  # what a method added to it is initialised here
        return params, tree.split(backbone, initialised)[0] if initialised else {}

    params, added = jax.jit(init_prompts)()
    params = dict(params)
    params["backbone"] = tree.unflatten({**tree.flatten(jax.eval_shape(init_all)["backbone"]),
                                         **tree.flatten(added)})
    return params


def _initialised(backbone) -> tuple[str, ...]:
    """The backbone's params no checkpoint holds (a method's block tuner), as regexes."""
    return tuple(getattr(backbone, "initialised_params", ()))
