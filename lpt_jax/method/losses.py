"""LPT's losses: A-GCL, its baselines, and the per-step phase objective (docs/spec.md §3).

Every loss takes raw cosine logits ``(B, C)`` and integer labels ``(B,)`` and returns a scalar.
Cosines are multiplied by ``scale`` inside the loss (the head has none). Computation runs in
float32 at least: bf16 / f16 logits are upcast, float64 logits (x64 mode) stay float64.

A-GCL of one batch, with n_c the training images of class c:

1. mu_c = log n_max - log n_c, mu_bar = mu / max(mu)          (0 for the head, 1 for the rarest)
2. nu = |clip(N(0, std^2), -1, 1)|, fresh per sample, class and call
3. z' = z - cloud_weight * nu * mu_bar                         (every logit of a tail class)
4. log p = log_softmax(scale * (z' - margin * onehot))
5. w = (1 - p_y)^gamma_pos on the target, p_c^gamma_neg elsewhere (not detached)
6. t = (1 - eps) * onehot + eps / C
7. loss = mean_b [ -sum_c t * w * log p ]

Cross-entropy and label smoothing are optax's (``optax.losses.softmax_cross_entropy``,
``optax.smooth_labels``); A-GCL passes its weighted targets ``t * w`` to the same
cross-entropy. Both keep the input's dtype, so float64 stays float64.

Registry ``LOSSES`` maps a config name to a loss; ``make_branch_loss`` binds class counts and
constants into ``f(logits, labels, rng)``; ``branch_fields`` declares a branch's config section.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpt_jax.config.fields import Field, Section, number, one_of

# ----------------------------------------------------------------------------- helpers


def _compute_dtype(logits: jnp.ndarray) -> jnp.dtype:
    """float32 at least; a wider input (float64 under x64) keeps its width."""
    return jnp.promote_types(logits.dtype, jnp.float32)


def _validated_counts(class_counts: Any) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D array, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        bad = np.flatnonzero(~np.isfinite(counts) | (counts <= 0))
        raise ValueError(
            f"class_counts must be positive and finite; classes {bad[:10].tolist()} have "
            f"counts {counts[bad[:10]].tolist()} (every class needs at least one training image)"
        )
    return counts


def _is_static_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _smoothed_targets(onehot: jnp.ndarray, label_smoothing: float) -> jnp.ndarray:
    """(1 - eps) * onehot + eps / C."""
    return optax.smooth_labels(onehot, label_smoothing)


def _cross_entropy(scaled_logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Mean over the batch of -sum_c t_c log softmax(scaled)_c (targets need not sum to 1)."""
    return jnp.mean(optax.losses.softmax_cross_entropy(scaled_logits, targets))


# ----------------------------------------------------------------------------- noise


def relative_log_counts(class_counts: Any, dtype: Any = jnp.float32) -> jnp.ndarray:
    """mu_bar_c = (log n_max - log n_c) / max_c(...), in [0, 1]; all zeros if all counts are equal.

    Concrete counts are checked (positive, finite, 1-D) and computed in float64 NumPy; traced
    counts (inside jit) are computed with jnp in ``dtype``.
    """
    try:
        counts = _validated_counts(class_counts)
    except jax.errors.TracerArrayConversionError:
        log_n = jnp.log(jnp.asarray(class_counts, dtype))
        mu = jnp.max(log_n) - log_n
        top = jnp.max(mu)
        return jnp.where(top > 0, mu / jnp.where(top > 0, top, 1.0), 0.0).astype(dtype)
    mu = np.log(counts.max()) - np.log(counts)
    top = mu.max()
    rel = mu / top if top > 0 else np.zeros_like(mu)  # all-equal counts: no class is a tail
    return jnp.asarray(rel, dtype)


def gaussian_cloud(rng: jax.Array, shape: tuple[int, ...], std: float = 1 / 3,
                   dtype: Any = jnp.float32) -> jnp.ndarray:
    """nu = |clip(N(0, std^2), -1, 1)|, i.i.d. per element, in [0, 1]."""
    sample = std * jax.random.normal(rng, shape, dtype)
    return jnp.abs(jnp.clip(sample, -1.0, 1.0))


def clouded_logits(logits: jnp.ndarray, class_counts: Any, rng: Optional[jax.Array] = None, *,
                   cloud_weight: float = 0.5, cloud_std: float = 1 / 3,
                   noise: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """z' = z - cloud_weight * nu * mu_bar_c (steps 1-3), in the compute dtype.

    ``noise`` (B, C) replaces the draw ``gaussian_cloud(rng, logits.shape, cloud_std)``; one of
    ``rng`` and ``noise`` is required. The head class (mu_bar = 0) is never moved.
    """
    logits = jnp.asarray(logits)
    dtype = _compute_dtype(logits)
    logits = logits.astype(dtype)
    if noise is None:
        if rng is None:
            raise ValueError("the Gaussian cloud needs an rng (or an explicit `noise` array)")
        noise = gaussian_cloud(rng, logits.shape, cloud_std, dtype)
    noise = jnp.asarray(noise, dtype)
    if noise.shape != logits.shape:
        raise ValueError(f"noise shape {noise.shape} != logits shape {logits.shape}")
    mu_bar = relative_log_counts(class_counts, dtype)
    if mu_bar.shape != logits.shape[-1:]:
        raise ValueError(f"{mu_bar.shape[0]} class counts for {logits.shape[-1]} logits per sample")
    return logits - cloud_weight * noise * mu_bar


# ----------------------------------------------------------------------------- losses


def agcl_loss(logits: jnp.ndarray, labels: jnp.ndarray, class_counts: Any,
              rng: Optional[jax.Array] = None, *, gamma_pos: float, gamma_neg: float,
              scale: float = 20.0, margin: float = 0.1, cloud_weight: float = 0.5,
              cloud_std: float = 1 / 3, label_smoothing: float = 0.1,
              noise: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Asymmetric Gaussian-clouded logit loss (docs/spec.md §3, steps 1-7); a scalar.

    Parameters
    ----------
    logits : (B, C) raw cosines.  labels : (B,) int.  class_counts : (C,) training counts.
    rng : key for the cloud; ignored when ``noise`` (B, C) is given (tests pass it explicitly).
    gamma_pos, gamma_neg : focusing exponents (LPT's per branch: lpt_jax.method.lpt).
    """
    z = clouded_logits(logits, class_counts, rng, cloud_weight=cloud_weight,
                       cloud_std=cloud_std, noise=noise)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    scaled = scale * (z - margin * onehot)
    # The weights depend on log p and are not detached; XLA computes log_softmax once.
    weights = _asymmetric_weights(jax.nn.log_softmax(scaled, axis=-1), onehot, gamma_pos,
                                  gamma_neg)
    targets = _smoothed_targets(onehot, label_smoothing)
    return _cross_entropy(scaled, targets * weights)


def _asymmetric_weights(log_p: jnp.ndarray, onehot: jnp.ndarray, gamma_pos: float,
                        gamma_neg: float) -> jnp.ndarray:
    """(1 - p_y)^gamma_pos on the target, p_c^gamma_neg elsewhere, computed in log space.

    base^gamma = exp(gamma * log base) is finite with a finite gradient for every finite
    logit: log(1 - p_y) is the logsumexp of the non-target log-probabilities, which stays
    accurate (and finite) where p_y rounds to 1, so neither 0^gamma' = inf nor inf * 0 appear.
    gamma = 0 gives exactly 1 (the 0^0 = 1 convention).
    """
    if _is_static_zero(gamma_pos) and _is_static_zero(gamma_neg):
        return jnp.ones_like(log_p)
    is_target = onehot > 0
    # A finite mask value (not -inf) keeps logsumexp's gradient finite even for C = 1.
    masked = jnp.where(is_target, jnp.finfo(log_p.dtype).min, log_p)
    log_one_minus_py = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    log_base = jnp.where(is_target, log_one_minus_py, log_p)
    gamma = jnp.where(is_target, jnp.asarray(gamma_pos, log_p.dtype),
                      jnp.asarray(gamma_neg, log_p.dtype))
    return jnp.exp(gamma * log_base)


def gcl_loss(logits: jnp.ndarray, labels: jnp.ndarray, class_counts: Any,
             rng: Optional[jax.Array] = None, *, scale: float = 20.0, margin: float = 0.1,
             cloud_weight: float = 0.5, cloud_std: float = 1 / 3,
             noise: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """GCL (Li et al., CVPR 2022): cross-entropy of scale * (z' - margin * onehot).

    A-GCL without the asymmetric weights and without label smoothing.
    """
    z = clouded_logits(logits, class_counts, rng, cloud_weight=cloud_weight,
                       cloud_std=cloud_std, noise=noise)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    return _cross_entropy(scale * (z - margin * onehot), onehot)


def softmax_xent(logits: jnp.ndarray, labels: jnp.ndarray, class_counts: Any = None,
                 rng: Optional[jax.Array] = None, *, scale: float = 20.0,
                 label_smoothing: float = 0.0) -> jnp.ndarray:
    """Plain softmax cross-entropy of scale * z (counts and rng are accepted and unused)."""
    del class_counts, rng
    z = jnp.asarray(logits)
    z = z.astype(_compute_dtype(z))
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    return _cross_entropy(scale * z, _smoothed_targets(onehot, label_smoothing))


def balanced_softmax_xent(logits: jnp.ndarray, labels: jnp.ndarray, class_counts: Any,
                          rng: Optional[jax.Array] = None, *, scale: float = 20.0,
                          tau: float = 1.0) -> jnp.ndarray:
    """Logit-adjusted cross-entropy: CE(scale * z + tau * log prior), prior_c = n_c / sum n.

    tau = 1 is the balanced softmax (Ren et al. 2020) / logit adjustment (Menon et al. 2021).
    """
    del rng
    z = jnp.asarray(logits)
    dtype = _compute_dtype(z)
    z = z.astype(dtype)
    try:
        counts = _validated_counts(class_counts)
        log_prior = jnp.asarray(np.log(counts) - np.log(counts.sum()), dtype)
    except jax.errors.TracerArrayConversionError:
        counts = jnp.asarray(class_counts, dtype)
        log_prior = jnp.log(counts) - jnp.log(jnp.sum(counts))
    if log_prior.shape != z.shape[-1:]:
        raise ValueError(f"{log_prior.shape[0]} class counts for {z.shape[-1]} logits per sample")
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=dtype)
    return _cross_entropy(scale * z + tau * log_prior, onehot)


LossFn = Callable[..., jnp.ndarray]

# Config name -> loss f(logits, labels, class_counts, rng, **constants).
LOSSES: dict[str, LossFn] = {
    "agcl": agcl_loss,
    "gcl": gcl_loss,
    "ce": softmax_xent,
    "balanced_ce": balanced_softmax_xent,
    "logit_adjusted": balanced_softmax_xent,  # LIFT's name for it (Menon et al. 2021)
}


def branch_fields(doc: str, *, gamma_pos: float, gamma_neg: float) -> Section:
    """A loss branch's config section: the loss by name and every constant of the losses
    (a constant the chosen loss does not take is ignored: the A-GCL constants stay when a
    branch switches to a baseline)."""
    return Section(doc, dict(
        name=Field("agcl", "the loss (LOSSES)", one_of(lambda: LOSSES)),
        scale=Field(20.0, "s: the cosines' scale inside the loss", number(above=0)),
        margin=Field(0.1, "m: the target's margin", number()),
        cloud_weight=Field(0.5, "the Gaussian cloud's weight", number(at_least=0)),
        cloud_std=Field(1 / 3, "the Gaussian cloud's std before clipping", number(above=0)),
        label_smoothing=Field(0.1, "label smoothing eps", number(at_least=0, below=1)),
        gamma_pos=Field(gamma_pos, "A-GCL's focusing exponent on the target", number(at_least=0)),
        gamma_neg=Field(gamma_neg, "A-GCL's focusing exponent elsewhere", number(at_least=0))))


def _keyword_constants(fn: LossFn) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_branch_loss(name: str, class_counts: Any, **overrides: Any) -> Callable[..., jnp.ndarray]:
    """Bind a registered loss to class counts and constants: ``f(logits, labels, rng) -> scalar``.

    A constant that some other registered loss takes is dropped (a config's branch dict keeps
    A-GCL's constants when its name is switched to a baseline); a constant no loss takes (a
    typo), an unknown name and a missing required constant (A-GCL's gammas) fail here.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    fn = LOSSES[name]
    allowed = _keyword_constants(fn)
    known_anywhere = set().union(*(_keyword_constants(f) for f in LOSSES.values()))
    unknown = sorted(set(overrides) - known_anywhere)
    if unknown:
        raise ValueError(f"no loss takes the constants {unknown}; {name!r} takes {sorted(allowed)}")
    overrides = {k: v for k, v in overrides.items() if k in allowed}
    missing = sorted(k for k, p in allowed.items()
                     if p.default is inspect.Parameter.empty and k not in overrides)
    if missing:
        raise ValueError(f"loss {name!r} needs {missing}")
    counts = None if class_counts is None else _validated_counts(class_counts)
    if counts is None and name in ("agcl", "gcl", "balanced_ce", "logit_adjusted"):
        raise ValueError(f"loss {name!r} needs the training class counts")
    constants = dict(overrides)

    def branch_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                    rng: Optional[jax.Array] = None) -> jnp.ndarray:
        return fn(logits, labels, counts, rng, **constants)

    branch_loss.__name__ = f"{name}_branch_loss"
    return branch_loss


# ----------------------------------------------------------------------------- phase objective


def eta(epoch: Any, num_epochs: int) -> Any:
    """Weight of the instance-balanced branch: 0.5 * (E - e) / E, e the 0-based epoch."""
    if isinstance(num_epochs, (int, float)) and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}")
    return 0.5 * (num_epochs - epoch) / num_epochs


def phase_objective(loss_cb: jnp.ndarray, loss_ib: jnp.ndarray, match_cb: Any, match_ib: Any,
                    eta_e: Any, match_weight: float = 0.5) -> tuple[jnp.ndarray, dict]:
    """L = loss_cb - w * S_cb + eta_e * (loss_ib - w * S_ib); phase 1 passes S = 0.

    Returns ``(total, parts)``; ``parts`` holds every term for logging.
    """
    total = loss_cb - match_weight * match_cb + eta_e * (loss_ib - match_weight * match_ib)
    parts = {"total": total, "loss_cb": loss_cb, "loss_ib": loss_ib,
             "match_cb": match_cb, "match_ib": match_ib, "eta": eta_e}
    return total, parts
