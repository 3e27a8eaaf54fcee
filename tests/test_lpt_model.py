"""Tests of lpt_jax.method.lpt_model (docs/spec.md §2) on a small random ViT.

The shared trunk is checked three ways: against LPT's own two-pass reference, and against an
independent block-by-block computation written here (explicit concatenation of prompts, NumPy
top-k and head), so that a bug shared by both LPT paths still fails. Compute claims are checked
on FLOPs from XLA's cost analysis, each with a control that must differ: no backward through
blocks 0..K-1 in phase 2 (lowered HLO), and 2L real blocks in the compiled reference.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import tree
from lpt_jax.backbones.vit import ViT
from lpt_jax.method.lpt import PHASES
from lpt_jax.method.lpt_model import LPT, lpt_from_config

from helpers import TINY_VIT, vit_kwargs

# Small random model: width 32, depth 4, K=2, pool 5, image 32, patch 8.
VIT = vit_kwargs(TINY_VIT)  # as ViT keyword arguments
LPT_KW = dict(num_classes=7, prompt_length=3, pool_size=5, shared_depth=2, top_k=2)
POSITIONS = ("append", "after_cls")
BATCH = 4


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    # Accelerators default to bf16 / TF32 passes; equivalence to fp32 rounding needs fp32.
    with jax.default_matmul_precision("float32"):
        yield


def make_model(position="append", **overrides):
    return LPT(backbone=ViT(**VIT), prompt_position=position, **{**LPT_KW, **overrides})


def make_images(n, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def params():
    """Random values in the model's parameter tree (from eval_shape: nothing to compile).

    Prompts, pool and keys are loud (std 1) so that they matter; init itself is tested below.
    """
    shapes = jax.eval_shape(make_model().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "LayerNorm" in name or "encoder_norm" in name:  # scale near 1, bias near 0
            base = 1.0 if "scale" in name else 0.0
            return base + 0.1 * rng.standard_normal(leaf.shape)
        std = 1.0 if "prompt" in name or "keys" in name else 1 / np.sqrt(max(leaf.shape[0], 1))
        return std * rng.standard_normal(leaf.shape)

    drawn = jax.tree_util.tree_map_with_path(draw, shapes)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), drawn)


def apply(model, params, images, method, train=False, dropout_seed=None, **kw):
    rngs = {} if dropout_seed is None else {"dropout": jax.random.key(dropout_seed)}
    return model.apply({"params": params}, images, train=train, method=method, rngs=rngs, **kw)


# ----------------------------------------------------------------------------- independent model


def _insert(x, prompts, position):
    if position == "append":
        return jnp.concatenate([x, prompts], axis=1)
    return jnp.concatenate([x[:, :1], prompts, x[:, 1:]], axis=1)


def _remove(x, n, position):
    if position == "append":
        return x[:, :-n]
    return jnp.concatenate([x[:, :1], x[:, 1 + n:]], axis=1)


def _normalize(x, axis=-1):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def independent_forward(params, images, position, shared_depth, top_k):
    """Spec §2 written out: query pass, per-sample top-k, main pass, cosine head (eval mode).

    Uses only the ViT's embed / single-block encode (no extras) / features.
    """
    vit = ViT(**VIT)
    bb = {"params": params["backbone"]}
    depth, b = VIT["depth"], images.shape[0]
    shared = params["shared_prompt"]

    def run(x, start, stop, prompts_for_block):
        for i in range(start, stop):
            p = prompts_for_block(i)
            x = _insert(x, p, position)
            x = vit.apply(bb, x, i, i + 1, method=ViT.encode)
            x = _remove(x, p.shape[1], position)
        return x

    def shared_only(i):
        return jnp.broadcast_to(shared[i], (b,) + shared[i].shape)

    x0 = vit.apply(bb, images, method=ViT.embed)
    query = vit.apply(bb, run(x0, 0, depth, shared_only), method=ViT.features)
    sims = _normalize(query) @ _normalize(params["pool_keys"]).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
    group = np.asarray(params["pool_prompts"])[idx].mean(axis=1)  # (B, L-K, P, D)

    def shared_and_group(i):
        return jnp.concatenate([shared_only(i), group[:, i - shared_depth]], axis=1)

    x = run(run(x0, 0, shared_depth, shared_only), shared_depth, depth, shared_and_group)
    feature = vit.apply(bb, x, method=ViT.features)
    logits = _normalize(feature) @ _normalize(params["head"]["kernel"], axis=0)
    match = np.mean(np.take_along_axis(sims, idx, axis=1).sum(axis=1))
    return dict(logits=logits, match=match, indices=idx, query=np.asarray(query))


def independent_phase1(params, images, position):
    vit = ViT(**VIT)
    bb = {"params": params["backbone"]}
    b = images.shape[0]
    x = vit.apply(bb, images, method=ViT.embed)
    for i in range(VIT["depth"]):
        p = jnp.broadcast_to(params["shared_prompt"][i], (b,) + params["shared_prompt"][i].shape)
        x = _remove(vit.apply(bb, _insert(x, p, position), i, i + 1, method=ViT.encode),
                    p.shape[1], position)
    feature = vit.apply(bb, x, method=ViT.features)
    return _normalize(feature) @ _normalize(params["head"]["kernel"], axis=0)


# ----------------------------------------------------------------------------- shared trunk


@pytest.mark.parametrize("position", POSITIONS)
def test_shared_trunk_equals_two_full_passes(params, position):
    model, images = make_model(position), make_images(BATCH)
    for train in (False, True):
        seed = 3 if train else None
        fast = apply(model, params, images, LPT.phase2, train, seed)
        ref = apply(model, params, images, LPT.phase2_reference, train, seed)
        np.testing.assert_array_equal(fast["indices"], ref["indices"])
        for key in ("logits", "match", "query"):
            np.testing.assert_allclose(fast[key], ref[key], atol=2e-6, rtol=1e-5, err_msg=key)
    # Training mode really drew a dropout mask (otherwise the train comparison proves nothing).
    eval_logits = apply(model, params, images, LPT.phase2)["logits"]
    assert np.max(np.abs(fast["logits"] - eval_logits)) > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_phase2_matches_independent_implementation(params, position):
    model, images = make_model(position), make_images(BATCH)
    want = independent_forward(params, images, position, LPT_KW["shared_depth"], LPT_KW["top_k"])
    for method in (LPT.phase2, LPT.phase2_reference):
        got = apply(model, params, images, method)
        np.testing.assert_array_equal(np.sort(got["indices"], 1), np.sort(want["indices"], 1))
        np.testing.assert_allclose(got["query"], want["query"], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5)
        np.testing.assert_allclose(got["match"], want["match"], atol=2e-5)
    # The samples do not all select the same entries, so per-sample selection is exercised.
    assert len({tuple(sorted(r)) for r in want["indices"].tolist()}) > 1


@pytest.mark.parametrize("position", POSITIONS)
def test_phase1_matches_independent_implementation(params, position):
    images = make_images(BATCH)
    got = apply(make_model(position), params, images, LPT.phase1)
    np.testing.assert_allclose(got["logits"], independent_phase1(params, images, position),
                               atol=2e-5)
    # The same output structure as phase 2: nothing picked, no matching term, the query that
    # phase 2 computes from the same shared prompt.
    assert got["indices"].shape == (BATCH, 0) and float(got["match"]) == 0.0
    np.testing.assert_allclose(got["query"], apply(make_model(position), params, images,
                                                   LPT.phase2)["query"], atol=2e-5)


def test_prompt_position_is_equivalent_and_prompts_matter(params):
    images = make_images(BATCH)
    append = apply(make_model("append"), params, images, LPT.phase2)
    after_cls = apply(make_model("after_cls"), params, images, LPT.phase2)
    np.testing.assert_allclose(append["logits"], after_cls["logits"], atol=2e-5)
    # Control: the (loud) prompts change the output, so the equivalences above are not vacuous.
    silent = {**params, "shared_prompt": jnp.zeros_like(params["shared_prompt"]),
              "pool_prompts": jnp.zeros_like(params["pool_prompts"])}
    assert np.max(np.abs(apply(make_model(), silent, images, LPT.phase2)["logits"]
                         - append["logits"])) > 1e-2


# ----------------------------------------------------------------------------- selection


def controlled_keys(params, images):
    """Keys for 4 images: samples 0, 1 pick {0, 1}; samples 2, 3 pick {2, 3}; entry 4 nobody.

    a solves Q a = [1, 1, -1, -1]; null-space directions n (Q n = 0) perturb without moving
    cosine signs: cos(q, +a) > 0 for samples 0, 1 and < 0 for 2, 3, cos(q, n) = 0.
    """
    q = np.asarray(apply(make_model(), params, images, LPT.phase2)["query"], np.float64)
    a = np.linalg.pinv(q) @ np.array([1.0, 1.0, -1.0, -1.0])
    a = a / np.linalg.norm(a)
    null = np.linalg.svd(q)[2][len(q):]  # rows orthogonal to every query
    keys = np.stack([a, a + 0.3 * null[0], -a, -a + 0.3 * null[1], null[2]])
    return jnp.asarray(keys, jnp.float32)


SELECTED = [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.fixture(scope="module")
def controlled(params):
    with jax.default_matmul_precision("float32"):
        return {**params, "pool_keys": controlled_keys(params, make_images(BATCH))}


def test_selection_is_per_sample_top_k(controlled):
    out = apply(make_model(), controlled, make_images(BATCH), LPT.phase2)
    assert [sorted(r) for r in np.asarray(out["indices"]).tolist()] == SELECTED
    # S = mean over samples of the summed top-k cosines, from NumPy.
    sims = _normalize(out["query"]) @ _normalize(controlled["pool_keys"]).T
    want = np.mean(np.sort(sims, axis=1)[:, -2:].sum(axis=1))
    np.testing.assert_allclose(out["match"], want, rtol=1e-5)
    idx, cos = make_model().apply({"params": controlled}, out["query"], method=LPT.select)
    np.testing.assert_array_equal(idx, out["indices"])
    np.testing.assert_allclose(cos, np.take_along_axis(sims, np.asarray(idx), 1), rtol=1e-5)


def test_selected_prompts_are_averaged_not_concatenated(controlled):
    model, images = make_model(), make_images(BATCH)
    base = apply(model, controlled, images, LPT.phase2)["logits"]
    pool = controlled["pool_prompts"]
    mean01 = (pool[0] + pool[1]) / 2
    # Samples 0, 1 see only the mean of entries 0 and 1: replacing both by it changes nothing.
    averaged = {**controlled, "pool_prompts": pool.at[0].set(mean01).at[1].set(mean01)}
    np.testing.assert_allclose(apply(model, averaged, images, LPT.phase2)["logits"], base,
                               atol=2e-6)
    # Control: moving the mean changes samples 0, 1 (and not 2, 3, which use other entries).
    moved = {**controlled, "pool_prompts": pool.at[1].set(pool[0])}
    out = apply(model, moved, images, LPT.phase2)["logits"]
    assert np.min(np.max(np.abs(out[:2] - base[:2]), axis=1)) > 1e-3
    np.testing.assert_allclose(out[2:], base[2:], atol=2e-6)


# ----------------------------------------------------------------------------- gradients


def xent(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(20.0 * logits), labels[:, None], 1))


LABELS = jnp.array([0, 3, 5, 6])


def phase2_loss(trainable, frozen, images, labels, match_weight=0.5, through_trunk=False):
    out = make_model().apply({"params": tree.merge(trainable, frozen)}, images,
                             method=LPT.phase2, through_trunk=through_trunk)
    return xent(out["logits"], labels) - match_weight * out["match"]


def phase1_loss(trainable, frozen, images, labels):
    out = make_model().apply({"params": tree.merge(trainable, frozen)}, images,
                             method=LPT.phase1)
    return xent(out["logits"], labels)


# One compiled gradient per phase, shared by the tests (match_weight is traced).
phase2_grad = jax.jit(jax.grad(phase2_loss), static_argnames="through_trunk")
phase1_grad = jax.jit(jax.grad(phase1_loss))


def test_phase2_gradient_tree_is_the_trainable_subtree(params):
    trainable, frozen = tree.split(params, PHASES[1].trainable)
    grads = phase2_grad(trainable, frozen, make_images(BATCH), LABELS, 0.5)
    assert sorted(tree.flatten(grads)) == ["head/kernel", "pool_keys", "pool_prompts"]
    assert all(np.abs(g).max() > 0 for g in tree.flatten(grads).values())


def _cost_flops(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
    return None if cost is None else float(cost["flops"])


def _flops(fn, *args):
    """FLOPs of the lowered (pre-optimisation) HLO: what autodiff built, before any DCE.

    Backends without a lowered cost analysis (GPU) give the compiled program's.
    """
    lowered = jax.jit(fn).lower(*args)
    flops = _cost_flops(lowered.cost_analysis())
    return flops if flops is not None else _cost_flops(lowered.compile().cost_analysis())


def test_phase2_backward_does_no_work_for_the_trunk(params):
    """FLOPs(grad of phase 2) = FLOPs(trunk forward) + FLOPs(grad of blocks K..L-1 alone).

    Control: letting the gradient reach the shared prompt (trained in phase 1, it lives in
    the trunk) must add backward work of the order of the trunk's forward.
    """
    model, images = make_model(), make_images(BATCH)
    trainable, frozen = tree.split(params, PHASES[1].trainable)

    def trunk(trainable, frozen, images):
        return model.apply({"params": tree.merge(trainable, frozen)}, images, method=LPT.trunk)

    def tail(mod, x):  # the phase-2 computation after the trunk, from LPT's pieces
        idx, cos = mod.select(mod.query_from_trunk(x))
        return mod.main_from_trunk(x, idx, False), jnp.mean(jnp.sum(cos, axis=1))

    def tail_loss(trainable, frozen, x):
        logits, match = model.apply({"params": tree.merge(trainable, frozen)}, x, method=tail)
        return xent(logits, LABELS) - 0.5 * match

    x_trunk = jax.eval_shape(trunk, trainable, frozen, images)
    full = _flops(jax.grad(phase2_loss), trainable, frozen, images, LABELS)
    trunk_fwd = _flops(trunk, trainable, frozen, images)
    tail_grad = _flops(jax.grad(tail_loss), trainable, frozen, x_trunk)
    assert full == pytest.approx(trunk_fwd + tail_grad, rel=0.01)

    wide, frozen_w = tree.split(params, PHASES[0].trainable + PHASES[1].trainable)
    control = _flops(jax.grad(functools.partial(phase2_loss, through_trunk=True)),
                     wide, frozen_w, images, LABELS)
    assert control - full > 0.5 * trunk_fwd


def test_reference_keeps_two_distinct_passes_when_compiled(params):
    """XLA would merge the passes' identical blocks 0..K-1 (CSE); the reference must not let
    it, or it is no baseline: compiled, it costs the trunk's forward more than the trunk path.
    Two calls in one program (as a dual-pair train step makes) must both keep their passes."""
    model = make_model()
    batches = (make_images(BATCH, seed=1), make_images(BATCH, seed=2))

    def compiled_flops(method):
        def fn(p, x, y):
            return [model.apply({"params": p}, z, method=method) for z in (x, y)]
        return _cost_flops(jax.jit(fn).lower(params, *batches).compile().cost_analysis())

    extra = compiled_flops(LPT.phase2_reference) - compiled_flops(LPT.phase2)
    trunk = compiled_flops(LPT.trunk)
    blocks = trunk - compiled_flops(lambda mod, x: mod.backbone.embed(x))
    # Blocks 0..K-1 twice (the patch embedding is shared). The upper bound is loose: GPU cost
    # analysis counts fusions differently (seen: extra = 1.2 x trunk on H100).
    assert 0.98 * blocks <= extra <= 1.5 * trunk, (extra, blocks, trunk)


def test_keys_get_gradient_only_through_the_matching_term(controlled):
    trainable, frozen = tree.split(controlled, PHASES[1].trainable)
    images = make_images(BATCH)
    no_match = phase2_grad(trainable, frozen, images, LABELS, 0.0)
    np.testing.assert_array_equal(no_match["pool_keys"], 0.0)
    with_match = phase2_grad(trainable, frozen, images, LABELS, 0.5)
    key_norms = np.linalg.norm(with_match["pool_keys"], axis=1)
    assert np.all(key_norms[:4] > 0) and key_norms[4] == 0.0, key_norms
    # The pool's gradient comes from the logits alone.
    np.testing.assert_allclose(with_match["pool_prompts"], no_match["pool_prompts"], atol=1e-7)


def test_unselected_pool_entries_get_exactly_zero_gradient(controlled):
    trainable, frozen = tree.split(controlled, PHASES[1].trainable)
    grads = phase2_grad(trainable, frozen, make_images(BATCH), LABELS, 0.5)
    per_entry = np.abs(np.asarray(grads["pool_prompts"])).reshape(5, -1).max(axis=1)
    assert np.all(per_entry[:4] > 0), per_entry
    assert per_entry[4] == 0.0, per_entry


def test_phase1_gradient_reaches_the_shared_prompt_at_every_block(params):
    trainable, frozen = tree.split(params, PHASES[0].trainable)
    grads = phase1_grad(trainable, frozen, make_images(BATCH), LABELS)
    assert sorted(tree.flatten(grads)) == ["head/kernel", "shared_prompt"]
    per_block = np.abs(np.asarray(grads["shared_prompt"])).reshape(VIT["depth"], -1).max(axis=1)
    assert np.all(per_block > 1e-8), per_block


# ----------------------------------------------------------------------------- init, dropout


def _prompts_and_head(mod):
    # Creates the LPT's own parameters only (setup + head), never the backbone.
    return mod.head(jnp.ones((1, mod.backbone.width)))


def test_init_statistics():
    """At ViT-B/16 sizes (the backbone is never built): N(0, 0.02^2) untruncated, unit columns."""
    vit = ViT(width=768, depth=12)
    model = LPT(backbone=vit, num_classes=100)  # spec defaults: P=10, M=20, K=6
    p = jax.jit(lambda k: model.init(k, method=_prompts_and_head))(jax.random.key(0))["params"]
    assert "backbone" not in p
    for name in ("shared_prompt", "pool_prompts", "pool_keys"):
        x = np.asarray(p[name], np.float64).ravel()
        assert abs(x.std() / 0.02 - 1) < 0.03, (name, x.std())
        assert abs(x.mean()) < 0.05 * 0.02, (name, x.mean())
        # Untruncated: about 4.55 % beyond 2 sigma (a 2-sigma truncation leaves none), and
        # a tail beyond 4 sigma in the big arrays.
        assert 0.035 < np.mean(np.abs(x) > 0.04) < 0.056, name
        if x.size > 50_000:
            assert np.abs(x).max() > 4 * 0.02, name
    w = np.asarray(p["head"]["kernel"], np.float64)
    assert w.shape == (768, 100)
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-6)
    assert np.min(np.std(w, axis=0)) > 0.5 / np.sqrt(768)  # random columns, not constant ones
    assert not np.allclose(p["shared_prompt"][6], p["pool_prompts"][0, 0], atol=1e-3)


def test_head_dropout_only_in_training(params):
    model, images = make_model(), make_images(BATCH)

    def run(method, seed=None):
        rngs = {} if seed is None else {"dropout": jax.random.key(seed)}
        out, state = model.apply({"params": params}, images, train=seed is not None,
                                 method=method, rngs=rngs,
                                 capture_intermediates=lambda mdl, _: mdl.name == "dropout")
        return out, np.asarray(state["intermediates"]["dropout"]["__call__"][0])

    out_eval, feature = run(LPT.phase1)
    out_eval = out_eval["logits"]
    zeros = []
    for seed in range(6):
        out_train, dropped = run(LPT.phase1, seed)
        out_train = out_train["logits"]
        kept = dropped != 0
        zeros.append(1 - kept.mean())
        np.testing.assert_allclose(dropped[kept], feature[kept] / 0.9, rtol=1e-5)
    assert 0.06 < np.mean(zeros) < 0.14, zeros  # rate 0.1 on the feature
    assert np.max(np.abs(out_train - out_eval)) > 1e-3
    np.testing.assert_array_equal(run(LPT.phase1)[0]["logits"], out_eval)  # eval: no rng

    p2_eval, _ = run(LPT.phase2)
    p2_train, dropped = run(LPT.phase2, 0)
    assert np.any(dropped == 0)
    assert np.max(np.abs(p2_train["logits"] - p2_eval["logits"])) > 1e-3
    np.testing.assert_array_equal(p2_train["query"], p2_eval["query"])  # no dropout on q
    np.testing.assert_array_equal(p2_train["indices"], p2_eval["indices"])


def test_zero_dropout_rate_is_the_identity(params):
    model, images = make_model(head_dropout=0.0), make_images(BATCH)
    np.testing.assert_allclose(apply(model, params, images, LPT.phase1, True, 0)["logits"],
                               apply(model, params, images, LPT.phase1)["logits"], atol=1e-7)


# ----------------------------------------------------------------------------- ViT-B/16 counts


def _model_config(vit, **lpt):
    """The `model` section of a config, as `lpt_from_config` reads it (attribute access)."""
    return SimpleNamespace(backbone="vit", vit=vit, lpt=SimpleNamespace(**lpt))


def _b16_config():
    return _model_config(
        dict(variant="B/16", image_size=224, pool_type="tok", layernorm_epsilon=1e-5),
        prompt_length=10, pool_size=20, shared_depth=6, top_k=2, head_dropout=0.1,
        prompt_init_std=0.02, prompt_position="append")


def _b16_backbone_size():
    d, mlp, patch, tokens = 768, 3072, 16, 196
    block = 2 * 2 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    # patch embedding, position (no CLS row: big_vision folds it into cls), cls, blocks, norm
    return (patch * patch * 3 * d + d) + tokens * d + d + 12 * block + 2 * d


def test_parameter_count_vit_b16():
    num_classes = 365
    model = lpt_from_config(_b16_config(), num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
    size = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    # Spec §2: L=12, P=10, D=768, M=20, L-K=6.
    assert size["shared_prompt"] == 12 * 10 * 768 == 92_160
    assert size["pool_prompts"] == 20 * 6 * 10 * 768 == 921_600
    assert size["pool_keys"] == 20 * 768 == 15_360
    assert size["shared_prompt"] + size["pool_prompts"] + size["pool_keys"] == 1_029_120
    assert size["head"] == 768 * num_classes  # no bias
    # timm's 86,567,656 less its 1000-way head (769,000) and its CLS position row (768).
    assert size["backbone"] == _b16_backbone_size() == 85_797_888
    assert 0.0119 < 1_029_120 / size["backbone"] < 0.0121  # "1.2 % of the backbone"


def test_init_through_phase1_builds_the_full_tree():
    model = make_model()
    spec = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    full = jax.eval_shape(model.init, jax.random.key(0), spec)
    via_phase1 = jax.eval_shape(lambda k, x: model.init(k, x, method=LPT.phase1),
                                jax.random.key(0), spec)
    assert jax.tree.structure(full) == jax.tree.structure(via_phase1)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, full, via_phase1))


def test_config_fields_reach_the_model():
    c = _model_config(dict(VIT, image_size=32), prompt_length=4, pool_size=6, shared_depth=1,
                      top_k=3, head_dropout=0.25, prompt_init_std=0.5,
                      prompt_position="after_cls")
    model = lpt_from_config(c, num_classes=9)
    assert (model.prompt_length, model.pool_size, model.shared_depth, model.top_k,
            model.head_dropout, model.prompt_init_std, model.prompt_position) == (
        4, 6, 1, 3, 0.25, 0.5, "after_cls")
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    assert shapes["pool_prompts"].shape == (6, 3, 4, 32)
    assert shapes["shared_prompt"].shape == (4, 4, 32)
    assert shapes["head"]["kernel"].shape == (32, 9)


@pytest.mark.parametrize("bad", [dict(shared_depth=5), dict(top_k=6), dict(top_k=0)])
def test_invalid_constants_fail_early(bad):
    with pytest.raises(ValueError):
        jax.eval_shape(make_model(**bad).init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


# ----------------------------------------------------------------------------- backbone registry


def test_backbone_registry_finds_vit_and_names_the_known_ones():
    from lpt_jax import backbones
    from lpt_jax.backbones import vit
    from lpt_jax.errors import ConfigError
    assert backbones.get("vit") is vit
    assert "vit" in backbones.known() and "vit_weights" not in backbones.known()
    for bad in ("siglip", "lpt", "../vit", "", "vit_weights"):
        with pytest.raises(ConfigError, match=r"known backbones are \[.*'vit'"):
            backbones.get(bad)


def test_lpt_from_config_builds_the_named_backbone():
    c = _model_config(dict(VIT, image_size=32), prompt_length=3, pool_size=5, shared_depth=2,
                      top_k=2, head_dropout=0.1, prompt_init_std=0.02,
                      prompt_position="append")
    default = lpt_from_config(c, num_classes=7)  # no model.backbone: the ViT
    c.backbone = "vit"
    named = lpt_from_config(c, num_classes=7)
    assert isinstance(named.backbone, ViT) and named.backbone == default.backbone
    c.backbone = "nope"
    with pytest.raises(ValueError, match="model.backbone='nope'"):
        lpt_from_config(c, num_classes=7)
