"""One pass over every config value a run reads, before anything is built or written: each
bad value is one `ConfigError` line naming the field, the value and what it accepts."""

from __future__ import annotations

import math

from lpt_jax import losses
from lpt_jax.errors import ConfigError
from lpt_jax.phases import PHASES, parse_phases


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (test, what it accepts); sections of every phase are added below.
_RULES = {
    "optim.base_lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.lr_reference_batch": (lambda v: v >= 1, "an integer >= 1"),
    "optim.warmup_lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "optim.momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "model.lpt.prompt_length": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.pool_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.shared_depth": (lambda v: v >= 0, "an integer >= 0"),
    "model.lpt.top_k": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.head_dropout": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.lpt.prompt_init_std": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "model.lpt.prompt_position": (lambda v: v in ("append", "after_cls"),
                                  "'append' or 'after_cls'"),
    "loss.match_weight": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "data.cb_images_per_class": (lambda v: v >= 1, "an integer >= 1"),
    "data.ib_sampling": (lambda v: v in ("epoch_permutation", "independent"),
                         "'epoch_permutation' or 'independent'"),
    "train.log_every_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.checkpoint_every_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, "an integer >= 1 (0 would keep no "
                                                 "checkpoint to resume from)"),
    "train.max_steps": (lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
    "train.stop_after_steps": (lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
    "train.num_devices": (lambda v: v >= 0, "an integer >= 0 (0: all devices)"),
    "train.on_nonfinite": (lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.every_epochs": (lambda v: v >= 0, "an integer >= 0 (0: only at the end of a phase)"),
    "eval.max_examples": (lambda v: v >= 0, "an integer >= 0 (0: the whole split)"),
    "eval.final_split": (lambda v: v in ("val", "test"), "'val' or 'test'"),
    "predict.top_k": (lambda v: v >= 1, "an integer >= 1"),
    "predict.batch_size": (lambda v: v >= 1, "an integer >= 1"),
}
for _phase in PHASES.values():
    _RULES[f"{_phase.name}.epochs"] = (lambda v: v >= 1, "an integer >= 1")
    _RULES[f"{_phase.name}.batch_size"] = (lambda v: v >= 1, "an integer >= 1")
for _branch in ("cb", "ib"):
    _RULES[f"loss.{_branch}.name"] = (lambda v: v in losses.LOSSES,
                                      f"one of {sorted(losses.LOSSES)}")
    _RULES[f"loss.{_branch}.scale"] = (lambda v: _finite(v) and v > 0, "a finite number > 0")


def check(config) -> None:
    """Raises ConfigError for the first value that cannot work."""
    for field, (ok, accepts) in _RULES.items():
        value = _get(config, field)
        if not ok(value):
            raise ConfigError(f"{field}={value!r}: expected {accepts}")
    parse_phases(config.train.phases)
    lpt = config.model.lpt
    if lpt.top_k > lpt.pool_size:
        raise ConfigError(f"model.lpt.top_k={lpt.top_k}: expected an integer in "
                          f"[1, model.lpt.pool_size={lpt.pool_size}]")
    name = config.model.get("backbone", "vit")
    size = config.model[name].image_size
    if size != config.data.image_size:
        raise ConfigError(f"model.{name}.image_size={size} but data.image_size="
                          f"{config.data.image_size}: the backbone is built for the training "
                          "crop size")
