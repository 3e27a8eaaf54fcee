"""LPT as a method (Dong, Zhou, Yan, Zuo, ICLR 2023): its config sections, its two phases, its
objective, and how each phase answers mixed-task batches. The Flax modules are in `lpt_model`.

    phase 1   trains the shared prompt (every block) and the cosine head
    phase 2   starts from phase 1's export; the phase-1 feature is the query that picks the
              top-k group prompts by key similarity; trains the pool, the keys and the head

Both phases train on dual sampling with A-GCL per branch (docs/spec.md §3-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpt_jax.config.fields import (
    BATCHED,
    EXPORTED,
    TRAINING,
    Field,
    Section,
    boolean,
    integer,
    number,
    one_of,
)
from lpt_jax.errors import ConfigError
from lpt_jax.method import losses, registry
from lpt_jax.method.lpt_model import (
    LPT,
    PromptedBackbone,
    average_selected,
    lpt_from_config,
    select_per_example,
)
from lpt_jax.method.phases import Phase


def _top_k_fits_pool(lpt, root) -> None:
    if lpt.top_k > lpt.pool_size:
        raise ConfigError(f"model.lpt.top_k={lpt.top_k}: expected an integer in "
                          f"[1, model.lpt.pool_size={lpt.pool_size}]", field="model.lpt.top_k")


FIELDS = Section("LPT's prompts, group-prompt pool and cosine head (spec §2)", dict(
    prompt_length=Field(10, "prompt tokens per block (the shared prompt, each group prompt)",
                        integer(at_least=1), BATCHED),
    pool_size=Field(20, "M: group prompts in the pool", integer(at_least=1)),
    shared_depth=Field(6, "K: blocks 0..K-1 see the shared prompt only, group prompts join "
                       "from block K", integer(at_least=0), EXPORTED, BATCHED),
    top_k=Field(2, "group prompts picked (and averaged) per image", integer(at_least=1),
                EXPORTED),
    head_dropout=Field(0.1, "dropout on the feature before the head, in training",
                       number(at_least=0, below=1)),
    prompt_init_std=Field(0.02, "std of the N(0, std^2) init of prompts, pool and keys",
                          number(above=0)),
    prompt_position=Field("append", "where prompts join the tokens: 'append' or 'after_cls' "
                          "(the same function: prompts carry no position)",
                          one_of("append", "after_cls"), EXPORTED, BATCHED)),
    rules=(_top_k_fits_pool,))

LOSS = Section("A-GCL per branch and the dual-sampling objective (spec §3)", dict(
    cb=losses.branch_fields("the class-balanced branch", gamma_pos=0.0, gamma_neg=4.0),
    ib=losses.branch_fields("the instance-balanced branch", gamma_pos=0.5, gamma_neg=8.0),
    match_weight=Field(0.5, "w in L = loss_cb - w S_cb + eta_e (loss_ib - w S_ib)",
                       number(at_least=0)),
    dual_sampling=Field(True, "both batches per step (False: the instance-balanced batch "
                        "alone, weight 1)", boolean())), roles=frozenset({TRAINING}))


# ------------------------------------------------------------------------------------------
# The objective of a step (both phases; phase 1 picks nothing, so its matching term is 0).

def objective(config, class_counts, epochs: int):
    """f(forward, params, batch, rng, epoch) -> (loss, {term: scalar}, [picked per branch]):
    L = loss_cb - w S_cb + eta_e (loss_ib - w S_ib), or loss_ib - w S_ib without dual
    sampling."""
    branch_loss = {b: losses.make_branch_loss(
        config.loss[b].name, class_counts,
        **{k: v for k, v in config.loss[b].items() if k != "name"}) for b in ("cb", "ib")}
    w, dual = config.loss.match_weight, config.loss.dual_sampling

    def f(forward, params, batch, rng, epoch):
        r_cb, r_ib, d_cb, d_ib = jax.random.split(rng, 4)

        def branch(which, loss_rng, dropout_rng):
            out = forward(params, batch[which]["image"], True, dropout_rng)
            return branch_loss[which](out["logits"], batch[which]["label"], loss_rng), out
        loss_ib, out_ib = branch("ib", r_ib, d_ib)
        if not dual:  # ablation: the instance-balanced branch alone, weight 1
            total = loss_ib - w * out_ib["match"]
            parts, picked = {"loss_ib": loss_ib, "match_ib": out_ib["match"]}, [out_ib["indices"]]
        else:
            loss_cb, out_cb = branch("cb", r_cb, d_cb)
            total, parts = losses.phase_objective(loss_cb, loss_ib, out_cb["match"],
                                                  out_ib["match"], losses.eta(epoch, epochs), w)
            parts.pop("total")
            parts["ib_weight"] = parts.pop("eta")  # TensorBoard: "eta" reads as time remaining
            picked = [out_cb["indices"], out_ib["indices"]]
        if not picked[0].shape[-1]:  # nothing picked: no matching term worth logging
            parts = {k: v for k, v in parts.items() if not k.startswith("match_")}
        return total, parts, picked
    return f


# ------------------------------------------------------------------------------------------
# Serving: each phase's prompts stacked over tasks, and its per-example forward.

def _stack_shared(trained, configs) -> dict:
    return {"shared": np.stack([np.asarray(t["shared_prompt"], np.float32) for t in trained])}


def _serve_phase1(model: PromptedBackbone, variables, stack, images, task):
    """The phase-1 feature: blocks 0..L-1 with each row's task's shared prompt."""
    shared = jnp.take(stack["shared"], task, axis=0)                    # (B, L, P, D)
    x = model.apply(variables, images, shared, method=PromptedBackbone.trunk)
    feature = model.apply(variables, x, shared, method=PromptedBackbone.query)
    return feature, jnp.zeros((images.shape[0], 0), jnp.int32)


def _stack_pool(trained, configs) -> dict:
    """Shared prompts, pools and keys padded to the largest pool (`valid` marks real
    entries), and per-task weights 1/k on the first k picks (tasks of several top-k)."""
    m = max(int(c.model.lpt.pool_size) for c in configs)
    k = max(int(c.model.lpt.top_k) for c in configs)
    first = np.asarray(trained[0]["pool_prompts"])
    pools = np.zeros((len(trained), m) + first.shape[1:], np.float32)
    keys = np.zeros((len(trained), m, first.shape[-1]), np.float32)
    valid = np.zeros((len(trained), m), bool)
    weights = np.zeros((len(trained), k), np.float32)
    for i, (t, c) in enumerate(zip(trained, configs)):
        size, top_k = int(c.model.lpt.pool_size), int(c.model.lpt.top_k)
        pools[i, :size], keys[i, :size], valid[i, :size] = t["pool_prompts"], t["pool_keys"], True
        weights[i, :top_k] = 1.0 / top_k
    return dict(_stack_shared(trained, configs), pools=pools, keys=keys, valid=valid,
                weights=weights)


def _serve_phase2(model: PromptedBackbone, variables, stack, images, task):
    """The phase-2 feature as `LPT.phase2` computes it, with each row's task's prompt, pool
    and keys; picked pool entries (-1 past the row's task's top-k)."""
    shared = jnp.take(stack["shared"], task, axis=0)
    x = model.apply(variables, images, shared, method=PromptedBackbone.trunk)
    query = model.apply(variables, x, shared, method=PromptedBackbone.query)
    weights = stack["weights"][task]
    idx, _ = select_per_example(query, stack["keys"][task], stack["valid"][task],
                                weights.shape[1])
    group = average_selected(stack["pools"], task, idx, weights)
    feature = model.apply(variables, x, shared, group, method=PromptedBackbone.main)
    return feature, jnp.where(weights > 0, idx, -1)


PHASES = (
    Phase(1, LPT.phase1, ("shared_prompt", r"head/.*"),
          doc="phase 1: the shared prompt and the head", stack=_stack_shared,
          serve=_serve_phase1),
    Phase(2, LPT.phase2, ("pool_prompts", "pool_keys", r"head/.*"),
          doc="phase 2: the group-prompt pool, its keys and the head (from phase 1's export)",
          starts_from=1, stack=_stack_pool, serve=_serve_phase2,
          trunk=("shared_prompt", r"backbone/.*")),
)


def _build(model_cfg, num_classes: int, backbone) -> LPT:
    """LPT around `backbone`; K must fit its depth (found before anything is written)."""
    k = model_cfg.lpt.shared_depth
    if k > backbone.depth:
        raise ConfigError(f"model.lpt.shared_depth={k}: expected an integer in "
                          f"[0, {backbone.depth}] (the backbone's depth)",
                          field="model.lpt.shared_depth")
    return lpt_from_config(model_cfg, num_classes, backbone=backbone)


def _serving_model(model_cfg, backbone) -> PromptedBackbone:
    return PromptedBackbone(backbone, shared_depth=int(model_cfg.lpt.shared_depth),
                            prompt_position=model_cfg.lpt.prompt_position)


METHOD = registry.Method(
    name="lpt", fields=FIELDS, loss=LOSS, phases=PHASES, build=_build,
    objective=objective, probability_scale=lambda config: float(config.loss.cb.scale),
    serving_model=_serving_model,
    streams=lambda config: ("cb", "ib") if config.loss.dual_sampling else ("ib",))
registry.register(METHOD)

