"""LPT around a frozen backbone: shared prompt, group-prompt pool with keys, cosine head.

The backbone is any module with the interface documented in `lpt_jax.backbones` (the ViT of
`lpt_jax.backbones.vit` by default); `lpt_from_config` picks it by `model.backbone`. The
phases, objective and config sections that make LPT a method are in `lpt_jax.method.lpt`.

Parameters (`LPT.init(...)['params']`):
    backbone/...                  the backbone (ViT: big_vision names), frozen in both phases
    shared_prompt (L, P, D)       VPT-deep prompt, trained in phase 1
    pool_prompts (M, L-K, P, D)   group prompts for blocks K..L-1, trained in phase 2
    pool_keys (M, D)              keys matched against the phase-1 query, trained in phase 2
    head/kernel (D, C)            cosine classifier, trained in both phases

Forward functions (use as `model.apply(variables, images, method=...)`), each returning
dict(logits (B, C), match (), indices (B, k), query (B, D)) (lpt_jax.method.phases):
    `phase1`          the shared prompt only (nothing picked: match 0, indices (B, 0));
    `phase2`          training/inference of phase 2 on the exact shared trunk: blocks 0..K-1
                      run once, then branch into the query path and the group-prompt path;
    `phase2_reference` the release's way (two full passes), for tests and benchmarks.
    `__call__`        = `phase2` (initialises every parameter).

Mixed-task batches (`lpt_jax.serving`): `PromptedBackbone` runs the same blocks with every
prompt given per example instead of read from its own parameters, so one frozen backbone serves
the examples of several trained tasks in one call; `select_per_example` and
`average_selected` are phase 2's key matching and group averaging with each example's own
pool and keys.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _unit_columns_init(key, shape, dtype=jnp.float32):
    w = jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    return l2_normalize(w, axis=0)


class CosineHead(nn.Module):
    """z = normalize(f) . normalize(W) per class column; raw cosines, the scale is the loss's."""
    num_classes: int

    @nn.compact
    def __call__(self, feature):
        w = self.param("kernel", _unit_columns_init, (feature.shape[-1], self.num_classes))
        f = l2_normalize(feature.astype(jnp.float32))
        return jnp.matmul(f, l2_normalize(w, axis=0), precision=jax.lax.Precision.HIGHEST)


class _PromptedBlocks:
    """The block runs of `LPT` and `PromptedBackbone`: a module with `backbone` and
    `prompt_position`, whose prompts for block i come from `extra_for_block(i)`."""

    def _run(self, x, start, stop, extra_for_block):
        """Blocks start..stop-1 -> tokens."""
        extras = {i: extra_for_block(i) for i in range(start, stop)}
        return self.backbone.encode(x, start, stop, extras, self.prompt_position)

    def _feature(self, x, start, extra_for_block):
        """Blocks start..L-1, then the backbone's pooled feature (B, D)."""
        extras = {i: extra_for_block(i) for i in range(start, self.backbone.depth)}
        return self.backbone.encode_features(x, start, extras, self.prompt_position)


class LPT(_PromptedBlocks, nn.Module):
    backbone: nn.Module            # depth, width, embed, encode, encode_features (lpt_jax.models)
    num_classes: int
    prompt_length: int = 10
    pool_size: int = 20
    shared_depth: int = 6          # K: blocks 0..K-1 see the shared prompt only
    top_k: int = 2
    head_dropout: float = 0.1
    prompt_init_std: float = 0.02
    prompt_position: str = "append"  # or 'after_cls' (equivalent: prompts have no posemb)

    def setup(self):
        depth, width = self.backbone.depth, self.backbone.width
        if not 0 <= self.shared_depth <= depth:
            raise ValueError(f"shared_depth {self.shared_depth} must be within [0, {depth}]")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"top_k {self.top_k} must be within [1, pool_size={self.pool_size}]")
        init = nn.initializers.normal(self.prompt_init_std)  # untruncated N(0, std^2)
        self.shared_prompt = self.param("shared_prompt", init,
                                        (depth, self.prompt_length, width))
        self.pool_prompts = self.param(
            "pool_prompts", init,
            (self.pool_size, depth - self.shared_depth, self.prompt_length, width))
        self.pool_keys = self.param("pool_keys", init, (self.pool_size, width))
        self.head = CosineHead(self.num_classes, name="head")
        self.dropout = nn.Dropout(self.head_dropout)

    # ---- building blocks ------------------------------------------------------------------
    def _shared(self, i):
        return self.shared_prompt[i]

    def _classify(self, feature, train: bool):
        feature = self.dropout(feature, deterministic=not train)
        return self.head(feature)

    def trunk(self, images):
        """Tokens after blocks 0..K-1 with the shared prompt (identical for query and main pass)."""
        x = self.backbone.embed(images)
        return self._run(x, 0, self.shared_depth, self._shared)

    def query_from_trunk(self, x):
        """Blocks K..L-1 with the shared prompt only -> CLS feature, gradient stopped."""
        return jax.lax.stop_gradient(self._feature(x, self.shared_depth, self._shared))

    def select(self, query):
        """Per-sample cosine top-k of the keys. Returns (indices (B,k), cosines (B,k))."""
        sims = jnp.matmul(l2_normalize(query.astype(jnp.float32)), l2_normalize(
            self.pool_keys.astype(jnp.float32)).T, precision=jax.lax.Precision.HIGHEST)
        cos, idx = jax.lax.top_k(sims, self.top_k)
        return idx, cos

    def main_from_trunk(self, x, idx, train: bool):
        """Blocks K..L-1 with [shared_i ; mean of the selected group prompts] -> logits."""
        group = jnp.mean(jnp.take(self.pool_prompts, idx, axis=0), axis=1)  # (B, L-K, P, D)
        b = x.shape[0]

        def extra(i):
            shared = jnp.broadcast_to(self._shared(i), (b,) + self._shared(i).shape)
            return jnp.concatenate([shared, group[:, i - self.shared_depth]], axis=1)

        return self._classify(self._feature(x, self.shared_depth, extra), train)

    # ---- forward functions ----------------------------------------------------------------
    def phase1(self, images, train: bool = False):
        """Phase 1: the shared prompt at every block -> cosine logits (B, C); its feature
        (before dropout) is the query phase 2 computes."""
        feature = self._feature(self.backbone.embed(images), 0, self._shared)
        return dict(logits=self._classify(feature, train), match=jnp.zeros((), jnp.float32),
                    indices=jnp.zeros((images.shape[0], 0), jnp.int32), query=feature)

    def phase2(self, images, train: bool = False, through_trunk: bool = False):
        """Phase 2 on the exact shared trunk (L + (L-K) block evaluations instead of 2L).

        Returns dict(logits (B,C), match S (scalar, mean over batch of summed top-k
        cosines), indices (B,k), query (B,D)).
        """
        x = self.trunk(images)
        if not through_trunk:  # backbone and shared prompt frozen: no backward through K blocks
            x = jax.lax.stop_gradient(x)
        query = self.query_from_trunk(x)
        idx, cos = self.select(query)
        logits = self.main_from_trunk(x, idx, train)
        return dict(logits=logits, match=jnp.mean(jnp.sum(cos, axis=1)), indices=idx,
                    query=query)

    def phase2_reference(self, images, train: bool = False, distinct_passes: bool = True):
        """The release's computation: a full query pass and a full main pass (2L blocks).

        Both passes start from the same embedding, so XLA's common-subexpression elimination
        merges their identical blocks 0..K-1 into one trunk by itself. `distinct_passes`
        (default) starts the main pass from the embedding plus a zero that XLA cannot see is
        zero (0 * x is not folded for floats), so the compiled program really evaluates all 2L
        blocks, as the release does (only the cheap patch embedding is shared); False leaves
        the merge to XLA. (An optimization barrier is not enough: XLA removes it after its
        first CSE pass, and later passes were seen to merge one of two calls in a program.)
        """
        x0 = self.backbone.embed(images)
        query = jax.lax.stop_gradient(self._feature(x0, 0, self._shared))
        idx, cos = self.select(query)
        if distinct_passes:
            x0 = x0 + 0.0 * jax.lax.stop_gradient(x0[:, :1, :1])
        x = self._run(x0, 0, self.shared_depth, self._shared)
        logits = self.main_from_trunk(x, idx, train)
        return dict(logits=logits, match=jnp.mean(jnp.sum(cos, axis=1)), indices=idx,
                    query=query)

    def __call__(self, images, train: bool = False):
        """Initialises every parameter (phase 2 touches them all, on 2L-K blocks)."""
        return self.phase2(images, train)


class PromptedBackbone(_PromptedBlocks, nn.Module):
    """LPT's blocks with the prompts passed in per example (B leading), not read from params.

    Its only parameters are `backbone/...`, named as in `LPT`. The methods are LPT's paths
    with each example's own prompts: `trunk` (blocks 0..K-1, shared prompt), `query` (blocks
    K..L-1, shared prompt: the phase-1 feature, and phase 2's query), `main` (blocks K..L-1,
    shared prompt then the averaged group prompts: the phase-2 feature). Features are the
    backbone's pooled output; the cosine head is applied by the caller.
    """
    backbone: nn.Module
    shared_depth: int
    prompt_position: str = "append"

    def trunk(self, images, shared):
        """shared (B, L, P, D) -> tokens after blocks 0..K-1."""
        return self._run(self.backbone.embed(images), 0, self.shared_depth,
                         lambda i: shared[:, i])

    def query(self, x, shared):
        """Trunk tokens -> blocks K..L-1 with the shared prompt -> feature (B, D)."""
        return self._feature(x, self.shared_depth, lambda i: shared[:, i])

    def main(self, x, shared, group):
        """Trunk tokens, group (B, L-K, P, D) -> blocks K..L-1 with [shared_i ; group_i]."""
        k = self.shared_depth
        return self._feature(
            x, k, lambda i: jnp.concatenate([shared[:, i], group[:, i - k]], axis=1))


def select_per_example(query, keys, valid, top_k: int):
    """`LPT.select` with each example's own keys (B, M, D); keys where `valid` (B, M) is False
    (a smaller pool padded to M) are never picked. Returns (indices (B, k), cosines (B, k))."""
    sims = jnp.einsum("bd,bmd->bm", l2_normalize(query.astype(jnp.float32)),
                      l2_normalize(keys.astype(jnp.float32)), precision=jax.lax.Precision.HIGHEST)
    cos, idx = jax.lax.top_k(jnp.where(valid, sims, -jnp.inf), top_k)
    return idx, cos


def average_selected(pools, task, idx, weights):
    """Each example's selected group prompts, averaged, from the pools of several tasks:
    pools (T, M, L-K, P, D), task (B,), idx (B, k), weights (B, k) = 1/k_b on the example's
    first k_b picks and 0 after them (tasks of several top-k values in one batch)
    -> (B, L-K, P, D). Elementwise (no matmul precision to differ): `LPT`'s mean up to float
    rounding (exactly, for k <= 2)."""
    picked = pools[task[:, None], idx]                     # (B, k, L-K, P, D)
    return jnp.sum(picked * weights[:, :, None, None, None], axis=1)


def lpt_from_config(model_cfg, num_classes: int, backbone: Optional[nn.Module] = None) -> LPT:
    """Builds the LPT model from the `model` section of a config (see configs/common.py).

    The backbone is `backbones.from_config(model_cfg)` (the module `model.backbone` names,
    built from its section `model.<backbone>`) unless one is passed.
    """
    if backbone is None:
        from lpt_jax import backbones
        backbone = backbones.from_config(model_cfg)
    lpt = model_cfg.lpt
    return LPT(backbone=backbone, num_classes=num_classes,
               prompt_length=lpt.prompt_length, pool_size=lpt.pool_size,
               shared_depth=lpt.shared_depth, top_k=lpt.top_k,
               head_dropout=lpt.head_dropout, prompt_init_std=lpt.prompt_init_std,
               prompt_position=lpt.prompt_position)
