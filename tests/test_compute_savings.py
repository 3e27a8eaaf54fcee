"""Work the ViT skips because LPT discards its result, and the ways attention can be computed.

Each saving is checked twice: the output equals the full computation's (written here with the
sequence built by hand), and the compiled program really does less (XLA's FLOP count), so a
change that silently brings the work back fails here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from lpt_jax.backbones import stored_in_compute_dtype
from lpt_jax.backbones.vit import Encoder1DBlock, ViT
from lpt_jax.method import steps
from lpt_jax.method.lpt import PHASES
from lpt_jax.method.lpt_model import LPT, lpt_from_config

from helpers import TINY_VIT, vit_kwargs

B, N, D, HEADS, MLP, P = 3, 9, 32, 2, 64, 4


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _run(fn, *args):
    """(output, XLA's FLOP count) of `fn` compiled once for `args`."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled(*args), float(cost["flops"])


def _block_and_inputs(attention="auto"):
    block = Encoder1DBlock(MLP, HEADS, attention=attention)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, N, D)), jnp.float32)
    batched = jnp.asarray(rng.standard_normal((B, P, D)), jnp.float32)
    shared = jnp.asarray(rng.standard_normal((P, D)), jnp.float32)
    variables = block.init(jax.random.key(0), x)
    variables = jax.tree.map(  # away from init's zero biases, so that every term counts
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), variables)
    return block, variables, x, batched, shared


@pytest.mark.parametrize("position", ["append", "after_cls"])
@pytest.mark.parametrize("which", ["batched", "shared"])
def test_extra_tokens_are_attended_over_but_not_computed(position, which):
    """A block given extras == the block run on the sequence with the extras inserted, their
    outputs then dropped; and it costs less than that (no query, output projection or MLP
    rows for the extras)."""
    block, variables, x, batched, shared = _block_and_inputs()
    extra = batched if which == "batched" else shared
    tokens = jnp.broadcast_to(extra, (B, P, D)) if extra.ndim == 2 else extra
    full_seq = (jnp.concatenate([x, tokens], 1) if position == "append"
                else jnp.concatenate([x[:, :1], tokens, x[:, 1:]], 1))

    def full(v, s):
        y = block.apply(v, s)
        return y[:, :N] if position == "append" else jnp.concatenate([y[:, :1], y[:, 1 + P:]], 1)

    def ours(v, x, e):
        return block.apply(v, x, e, position)

    (got, cost), (want, full_cost) = _run(ours, variables, x, extra), _run(full, variables,
                                                                          full_seq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert cost < 0.95 * full_cost


def test_last_block_before_class_token_pooling_computes_one_row():
    vit = ViT(**vit_kwargs(TINY_VIT))
    images = jax.random.uniform(jax.random.key(2), (B, 32, 32, 3), minval=-1, maxval=1)
    variables = vit.init(jax.random.key(0), images)
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape),
                             variables)
    x = vit.apply(variables, images, method=ViT.embed)
    extras = {i: jnp.full((P, D), 0.1 * i) for i in range(vit.depth)}

    def full(v, x):
        return vit.apply(v, vit.apply(v, x, 0, None, extras, method=ViT.encode),
                         method=ViT.features)

    def short(v, x):
        return vit.apply(v, x, 0, extras, method=ViT.encode_features)

    (got, cost), (want, full_cost) = _run(short, variables, x), _run(full, variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The last of 4 blocks costs almost nothing: well under 3/4 + a margin of the full count.
    assert cost < 0.85 * full_cost


def test_attention_implementations_give_the_same_lpt_outputs():
    """'einsum' (the CPU default) and 'xla' (jax.nn.dot_product_attention) agree, and the
    setting reaches the compiled program (each lowers to its own attention products)."""
    c = base_config()
    c.model.vit.update({k: v for k, v in TINY_VIT.items()})
    c.model.lpt.update(dict(prompt_length=3, pool_size=5, shared_depth=2))
    images = jax.random.uniform(jax.random.key(4), (B, 32, 32, 3), minval=-1, maxval=1)
    outs, texts, params = {}, {}, None
    for name in ("einsum", "xla"):
        c.model.vit.attention = name
        model = lpt_from_config(c.model, 7)
        if params is None:  # the same parameter tree for both
            params = jax.jit(model.init)(jax.random.key(0), images)["params"]
        lowered = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LPT.phase2)).lower(
            params, images)
        texts[name] = lowered.as_text(debug_info=True)
        outs[name] = lowered.compile()(params, images)
    # The heads-leading products of 'einsum'; the (B, T, H, d) ones of dot_product_attention.
    assert "bhnd,bhsd->bhns" in texts["einsum"] and "bhnd,bhsd->bhns" not in texts["xla"]
    assert "BTNH,BSNH->BNTS" in texts["xla"] and "BTNH,BSNH->BNTS" not in texts["einsum"]
    np.testing.assert_allclose(outs["einsum"]["logits"], outs["xla"]["logits"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outs["einsum"]["indices"], outs["xla"]["indices"])


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_matmul_precision_reaches_every_product_of_the_compiled_program(attention):
    """model.vit.matmul_precision: every matmul and convolution of the shipped phase-2
    forward (train and predict run it) asks for that precision ('float32', the default, the
    release's: no TF32 on NVIDIA GPUs); the cosine head and the key matching always float32."""
    import collections
    import re
    c = base_config()
    c.model.vit.update({k: v for k, v in TINY_VIT.items()})
    c.model.vit.attention = attention
    c.model.lpt.update(dict(prompt_length=3, pool_size=5, shared_depth=2))
    images = jnp.zeros((B, 32, 32, 3))
    seen = {}
    with jax.default_matmul_precision("default"):  # this file's fixture asks float32
        for name, want in (("float32", "HIGHEST"), ("tensorfloat32", "HIGH"),
                           ("bfloat16", "DEFAULT"), ("default", "DEFAULT")):
            c.model.vit.matmul_precision = name
            model = lpt_from_config(c.model, 7)
            params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
            text = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LPT.phase2)).lower(
                params, images).as_text()
            ops = [line for line in text.splitlines() if "stablehlo.dot_general" in line
                   or "stablehlo.convolution" in line]
            found = collections.Counter(re.search(r"precision[ =\[#a-z<]*(HIGHEST|HIGH|DEFAULT)",
                                                  line).group(1) for line in ops)
            seen[name] = found
            assert sum(found.values()) == len(ops) > 10, (name, found)  # every product says it
            backbone = found[want] - (2 if want == "HIGHEST" else 0)
            assert backbone >= len(ops) - 2 and found["HIGHEST"] >= 2, (name, found)
    assert seen["float32"] != seen["tensorfloat32"] != seen["bfloat16"]


def test_a_bfloat16_model_stores_its_frozen_backbone_in_bfloat16_with_the_same_outputs():
    """TrainStep.init keeps no float32 copy of the frozen weights of a bf16 model (LayerNorm
    parameters excepted), and the model computes exactly what it computes from float32
    weights: the layers cast them to bf16 anyway."""
    c = base_config()
    c.model.vit.update({k: v for k, v in TINY_VIT.items()})
    c.model.vit.update(dict(dtype="bfloat16", depth=2))
    c.model.lpt.update(dict(prompt_length=3, pool_size=5, shared_depth=1))
    model = lpt_from_config(c.model, 4)
    images = jax.random.uniform(jax.random.key(5), (B, 32, 32, 3), minval=-1, maxval=1)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    ts = steps.make_train_step(model, PHASES[1], c, class_counts=np.array([8, 4, 2, 1]),
                               steps_per_epoch=2, batch_size=B)
    state, frozen = ts.init(params)
    dtypes = {jax.tree_util.keystr(k): v.dtype
              for k, v in jax.tree_util.tree_leaves_with_path(frozen["backbone"])}
    assert dtypes["['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"] \
        == jnp.bfloat16
    assert dtypes["['pos_embedding']"] == jnp.bfloat16
    assert dtypes["['Transformer']['encoder_norm']['scale']"] == jnp.float32
    assert frozen["shared_prompt"].dtype == jnp.float32
    forward = jax.jit(lambda p: model.apply({"params": p}, images, method=LPT.phase2))
    cast = forward({**params, "backbone": frozen["backbone"]})
    plain = forward(params)
    np.testing.assert_array_equal(cast["logits"], plain["logits"])
    np.testing.assert_array_equal(cast["query"], plain["query"])


def test_a_float32_model_is_left_as_it_is():
    c = base_config()
    c.model.vit.update({k: v for k, v in TINY_VIT.items()})
    model = lpt_from_config(c.model, 4)
    params = {"backbone": {"w": jnp.ones(3)}, "head": {"kernel": jnp.ones(2)}}
    assert stored_in_compute_dtype(params, model.backbone) is params
