"""The optimizer of LPT_SPEC.md §5: SGD + coupled decay on the trainable leaves, per-epoch lr."""

from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np
import optax

from lpt_jax import tree

_partition = getattr(optax, "partition", None) or optax.multi_transform  # renamed in optax 0.2.5


def epoch_learning_rates(base_lr: float, epochs: int, *, warmup_lr: float = 1e-6,
                         warmup_epochs: int = 1) -> np.ndarray:
    """lr per epoch: warm-up epochs at `warmup_lr`, then 0.5*lr*(1 + cos(pi*e/E))."""
    return np.array([warmup_lr if e < warmup_epochs
                     else 0.5 * base_lr * (1 + math.cos(math.pi * e / epochs))
                     for e in range(epochs)], dtype=np.float32)


def peak_learning_rate(optim_cfg, batch_size: int) -> float:
    """Linear scaling rule of the spec: lr = base_lr * B / 256."""
    return optim_cfg.base_lr * batch_size / optim_cfg.lr_reference_batch


def epoch_schedule(rates: np.ndarray, steps_per_epoch: int) -> optax.Schedule:
    """Step -> lr, constant within an epoch (the schedule is stepped per epoch)."""
    table = jnp.asarray(rates)

    def schedule(count):
        return table[jnp.minimum(count // steps_per_epoch, len(rates) - 1)]
    return schedule


def make_optimizer(params: Mapping, trainable_patterns, optim_cfg, *, batch_size: int,
                   epochs: int, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    """An optax partition over the full LPT tree: the trainable leaves (by path regex) get
    coupled weight decay then SGD with momentum; every other leaf is frozen (zero update).

    Frozen leaves carry no optimizer state, so `init` on the full tree stays small.
    """
    rates = epoch_learning_rates(peak_learning_rate(optim_cfg, batch_size), epochs,
                                 warmup_lr=optim_cfg.warmup_lr,
                                 warmup_epochs=optim_cfg.warmup_epochs)
    schedule = epoch_schedule(rates, steps_per_epoch)
    trainable = optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay),  # before momentum
                            optax.sgd(schedule, momentum=optim_cfg.momentum))
    tx = _partition({"trainable": trainable, "frozen": optax.set_to_zero()},
                    tree.labels(params, trainable_patterns))
    return tx, schedule
