"""The optimiser of docs/spec.md §5: SGD with momentum and coupled weight decay, stepped per
epoch, applied to the trainable subtree only (the frozen tree never reaches it)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from lpt_jax.config.fields import TRAINING, Field, Section, integer, number

FIELDS = Section("SGD with momentum and coupled weight decay, stepped per epoch (spec §5)", dict(
    base_lr=Field(0.02, "peak learning rate at batch lr_reference_batch (lr = base_lr * B / "
                  "lr_reference_batch)", number(above=0)),
    lr_reference_batch=Field(256, "the batch base_lr is given for", integer(at_least=1)),
    momentum=Field(0.9, "SGD momentum", number(at_least=0, below=1)),
    weight_decay=Field(0.01, "coupled weight decay (added to the gradient)", number(at_least=0)),
    warmup_lr=Field(1e-6, "the learning rate of epoch 0 (the warm-up ramps from it)",
                    number(at_least=0)),
    warmup_epochs=Field(1, "epochs of linear warm-up from warmup_lr to the peak",
                        integer(at_least=0))), roles=frozenset({TRAINING}))


def epoch_learning_rates(base_lr: float, epochs: int, *, warmup_lr: float = 1e-6,
                         warmup_epochs: int = 1) -> np.ndarray:
    """lr per epoch, as the release's timm CosineLRScheduler (t_in_epochs, lr_min 0, no
    warm-up prefix): epoch e < W ramps linearly from `warmup_lr` towards `base_lr`,
    warmup_lr + e * (base_lr - warmup_lr) / W; then 0.5 * base_lr * (1 + cos(pi * e / E)).
    With W = 1 that is `warmup_lr` for epoch 0 and the cosine after it."""
    def rate(e):
        if e < warmup_epochs:
            return warmup_lr + e * (base_lr - warmup_lr) / warmup_epochs
        return 0.5 * base_lr * (1 + math.cos(math.pi * e / epochs))
    return np.array([rate(e) for e in range(epochs)], dtype=np.float32)


def peak_learning_rate(optim_cfg, batch_size: int) -> float:
    """Linear scaling rule of the spec: lr = base_lr * B / 256."""
    return optim_cfg.base_lr * batch_size / optim_cfg.lr_reference_batch


def epoch_schedule(rates: np.ndarray, steps_per_epoch: int) -> optax.Schedule:
    """Step -> lr, constant within an epoch (the schedule is stepped per epoch)."""
    table = jnp.asarray(rates)

    def schedule(count):
        return table[jnp.minimum(count // steps_per_epoch, len(rates) - 1)]
    return schedule


def make_schedule(optim_cfg, *, batch_size: int, epochs: int,
                  steps_per_epoch: int) -> optax.Schedule:
    rates = epoch_learning_rates(peak_learning_rate(optim_cfg, batch_size), epochs,
                                 warmup_lr=optim_cfg.warmup_lr,
                                 warmup_epochs=optim_cfg.warmup_epochs)
    return epoch_schedule(rates, steps_per_epoch)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """SGD with coupled decay and momentum, *without* the learning rate: the train step scales
    the direction by `schedule(step)` itself, so the train step's counter is the one clock
    for data position, lr and the loss weights (a skipped step moves none of them apart).

    Equal to optax.chain(add_decayed_weights(wd), optax.sgd(schedule, momentum)): sgd is
    trace(momentum) then a scale by -lr.
    """
    return optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay),  # before momentum
                       optax.trace(decay=optim_cfg.momentum, nesterov=False))
