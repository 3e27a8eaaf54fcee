"""The train step: the one function every phase, test and benchmark runs.

Freezing has one mechanism, and it is structural: the parameter tree is split by the phase's
path regexes into a *trainable* subtree (the prompts, pool, keys and head) and a *frozen*
one (the backbone, and in phase 2 the shared prompt). `jax.value_and_grad` differentiates
the trainable subtree only, and the optimiser is built for that subtree only, so frozen
leaves have no gradient, no optimiser state and no update — there is nothing to mask.

    train_step = steps.make_train_step(model, phase, config, class_counts=...,
                                       steps_per_epoch=..., batch_size=...)
    state, frozen = train_step.init(params)
    step = train_step.jit(mesh)            # what the trainer runs
    state, metrics = step(state, frozen, batch)

`train.microbatches` = k > 1 computes the gradient of a batch from k slices of it in turn
(`accumulated`): the same update to float rounding, with one slice's activations in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpt_jax import backbones, parallel, tree
from lpt_jax.errors import ConfigError
from lpt_jax.method import optim, registry
from lpt_jax.method.phases import Phase


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A phase's step `fn(state, frozen, batch) -> (state, metrics)` and what it needs."""
    fn: Callable
    phase: Phase
    patterns: tuple[str, ...]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    seed: int
    model: Any = None

    def init(self, params: Mapping) -> tuple[dict, dict]:
        """(state, frozen): the state holds what is trained plus what resuming needs; the
        frozen backbone is stored in its compute dtype (`backbones.stored_in_compute_dtype`)."""
        trainable, frozen = tree.split(params, self.patterns)
        if self.model is not None:
            frozen = backbones.stored_in_compute_dtype(frozen, self.model.backbone)
        state = {"trainable": trainable, "opt_state": self.tx.init(trainable),
                 "step": jnp.int32(0), "rng": jax.random.PRNGKey(self.seed)}
        return state, frozen

    def jit(self, mesh) -> Callable:
        """Compiled for `mesh`: batch sharded along the data axis, everything else replicated,
        the state donated (updated in place)."""
        rep = parallel.replicated(mesh)
        return jax.jit(self.fn, in_shardings=(rep, rep, parallel.batch_sharding(mesh)),
                       out_shardings=(rep, rep), donate_argnums=(0,))


def make_train_step(model, phase: Phase, config, *, class_counts: np.ndarray,
                    steps_per_epoch: int, batch_size: int) -> TrainStep:
    """The train step of `phase` for `model` under `config`: the method's objective
    (config.model.method), the optim section and the phase's section."""
    epochs = phase.section(config).epochs
    method_objective = registry.of(config).objective(config, class_counts, epochs)
    schedule = optim.make_schedule(config.optim, batch_size=batch_size, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config.optim)

    def objective(trainable, frozen, batch, rng, epoch):
        # A trained param the forward would stop the gradient of (phase 2's trunk): through it.
        through = any(tree.matches(p, phase.trunk) for p in tree.flatten(trainable))
        total, parts, picked = method_objective(phase.forward(model, through),
                                                tree.merge(trainable, frozen), batch, rng, epoch)
        return total, (parts, picked)

    gradient = accumulated(jax.value_and_grad(objective, has_aux=True),
                           int(config.train.microbatches))

    def step(state, frozen, batch):
        step_no = state["step"]
        rng = jax.random.fold_in(state["rng"], step_no)
        epoch = (step_no // steps_per_epoch).astype(jnp.float32)
        (loss, (parts, indices)), grads = gradient(state["trainable"], frozen, batch, rng, epoch)
        grad_norm = optax.tree.norm(grads)
        direction, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        lr = schedule(step_no)
        trainable = optax.apply_updates(state["trainable"],
                                        jax.tree.map(lambda d: -lr * d, direction))
        # A non-finite step never reaches the state: keep the old one (and report it). The
        # updated parameters are checked too (a finite gradient can still overflow them).
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(trainable)))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"trainable": keep(trainable, state["trainable"]),
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "step": step_no + 1, "rng": state["rng"]}
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                                   "nonfinite": (~finite).astype(jnp.int32), **parts}
        if indices[0].shape[-1]:  # the pool entries picked: collapse shows here
            metrics["pool_selection"] = jnp.concatenate([i.reshape(-1) for i in indices])
        return new_state, metrics

    return TrainStep(step, phase, phase.trainable_patterns(config), tx, schedule,
                     phase.seed(config), model)


def accumulated(value_and_grad: Callable, k: int) -> Callable:
    """`value_and_grad(trainable, frozen, batch, rng, epoch)` -> ((loss, (parts, picked)),
    grads) of the whole batch computed from k slices of it, one after the other (a
    `lax.scan`: memory holds one slice's activations); k = 1 is `value_and_grad` itself.

    Every term of an objective is a mean over the batch (the branch losses, the matching
    term S; the dual-sampling weight is the epoch's), so the mean over k equal slices of
    loss, parts and gradient is the full batch's up to float rounding. Slice i holds rows
    i, i+k, i+2k, ... of every stream: a device's contiguous rows hold an equal share of each
    slice (`train.microbatches` divides batch / devices), so no slice moves between devices.
    The picked indices are put back in the batch's row order.

    Randomness: slice i draws from `fold_in(rng, i)` (split by the objective as the full batch's
    rng is). Head dropout and A-GCL's noise draw per row and element from the shape they are
    given, so the slices cannot reproduce the full batch's numbers without the objective taking
    pre-drawn noise; they get draws of the same distribution instead, independent between
    slices (one shared key would repeat a slice's noise in every slice). The update equals
    k = 1's to rounding where neither draws (head_dropout 0, cloud_weight 0), and is another
    sample of the same stochastic update otherwise.
    """
    if k == 1:
        return value_and_grad

    def split(x):  # (B, ...) -> (k, B / k, ...), slice i = rows i, i+k, ...
        if x.shape[0] % k:
            raise ConfigError(f"train.microbatches={k} does not divide the batch of "
                              f"{x.shape[0]} rows", field="train.microbatches")
        return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)

    def unsplit(x):  # the inverse of `split`
        return jnp.moveaxis(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    def accumulate(trainable, frozen, batch, rng, epoch):
        def one(grads, xs):  # the gradient summed in the carry: one copy, not k
            i, piece = xs
            (loss, (parts, picked)), g = value_and_grad(
                trainable, frozen, piece, jax.random.fold_in(rng, i), epoch)
            return jax.tree.map(jnp.add, grads, g), (loss, parts, picked)
        grads, (loss, parts, picked) = jax.lax.scan(
            one, jax.tree.map(jnp.zeros_like, trainable),
            (jnp.arange(k, dtype=jnp.int32), jax.tree.map(split, batch)))
        mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
        return ((mean(loss), (jax.tree.map(mean, parts), [unsplit(p) for p in picked])),
                jax.tree.map(lambda g: g / k, grads))
    return accumulate
