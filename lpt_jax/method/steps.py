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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpt_jax import parallel, tree
from lpt_jax.method import losses, optim
from lpt_jax.method.lpt import backbone_in_compute_dtype
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
        frozen backbone is stored in the model's compute dtype (`backbone_in_compute_dtype`)."""
        trainable, frozen = tree.split(params, self.patterns)
        if self.model is not None:
            frozen = backbone_in_compute_dtype(frozen, self.model)
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
    """The train step of `phase` for `model` under `config` (loss, optim, phase sections)."""
    epochs = phase.section(config).epochs
    forward = phase.forward(model)
    branch_loss = {b: losses.make_branch_loss(
        config.loss[b].name, class_counts,
        **{k: v for k, v in config.loss[b].items() if k != "name"}) for b in ("cb", "ib")}
    w_match, dual = config.loss.match_weight, config.loss.dual_sampling
    schedule = optim.make_schedule(config.optim, batch_size=batch_size, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config.optim)

    def branch(params, images, labels, which, loss_rng, dropout_rng):
        out = forward(params, images, True, dropout_rng)
        return branch_loss[which](out["logits"], labels, loss_rng), out

    def objective(trainable, frozen, batch, rng, epoch):
        params = tree.merge(trainable, frozen)
        r_cb, r_ib, d_cb, d_ib = jax.random.split(rng, 4)
        loss_ib, out_ib = branch(params, batch["ib"]["image"], batch["ib"]["label"], "ib",
                                 r_ib, d_ib)
        if not dual:  # ablation: the instance-balanced branch alone, weight 1
            return loss_ib - w_match * out_ib["match"], (
                {"loss_ib": loss_ib, "match_ib": out_ib["match"]}, [out_ib["indices"]])
        loss_cb, out_cb = branch(params, batch["cb"]["image"], batch["cb"]["label"], "cb",
                                 r_cb, d_cb)
        total, parts = losses.phase_objective(loss_cb, loss_ib, out_cb["match"], out_ib["match"],
                                              losses.eta(epoch, epochs), w_match)
        parts.pop("total")
        parts["ib_weight"] = parts.pop("eta")  # TensorBoard: "eta" reads as time remaining
        return total, (parts, [out_cb["indices"], out_ib["indices"]])

    def step(state, frozen, batch):
        step_no = state["step"]
        rng = jax.random.fold_in(state["rng"], step_no)
        epoch = (step_no // steps_per_epoch).astype(jnp.float32)
        (loss, (parts, indices)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["trainable"], frozen, batch, rng, epoch)
        grad_norm = optax.global_norm(grads)
        direction, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        lr = schedule(step_no)
        trainable = optax.apply_updates(state["trainable"],
                                        jax.tree.map(lambda d: -lr * d, direction))
        # A non-finite step never reaches the state: keep the old one (and report it). The
        # updated parameters are checked too (a finite gradient can still overflow them).
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.global_norm(trainable)))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"trainable": keep(trainable, state["trainable"]),
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "step": step_no + 1, "rng": state["rng"]}
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                                   "nonfinite": (~finite).astype(jnp.int32), **parts}
        if phase.selects_prompts:  # which pool prompts are picked: collapse shows here
            idx = jnp.concatenate([i.reshape(-1) for i in indices])
            metrics["pool_selection"] = jnp.bincount(idx, length=model.pool_size)
        else:  # no matching term in this phase: do not log constant zeros
            for key in ("match_cb", "match_ib"):
                metrics.pop(key, None)
        return new_state, metrics

    return TrainStep(step, phase, phase.trainable_patterns(config), tx, schedule,
                     phase.seed(config), model)
