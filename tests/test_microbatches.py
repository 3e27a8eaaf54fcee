"""train.microbatches: a step's batch in k slices, their gradients accumulated in a scan
(`steps.accumulated`): the update of the full batch to float rounding, on 8 devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from lpt_jax import parallel, tree
from lpt_jax.errors import ConfigError
from lpt_jax.method import registry, steps
from lpt_jax.method.lpt import METHOD
from lpt_jax.method.lpt_model import lpt_from_config
from lpt_jax.run import context

from helpers import TINY_VIT

B = 32  # per stream: 4 rows on each of the 8 simulated devices, so k = 2 and 4 divide them
COUNTS = np.array([8, 4, 2, 1])
VIT = dict(TINY_VIT, depth=1, width=16, num_heads=1, mlp_dim=32, image_size=16)
# The programs are the trainer's; LLVM's optimisations only cost this file's compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(")


def make_config(k: int, *, random: bool = False):
    """A tiny ViT (compiles fast), dual sampling on (the default). `random=False`: no head
    dropout and no A-GCL noise, the only draws that differ between slices and the full batch
    (`steps.accumulated`), so that the updates must agree to rounding."""
    c = base_config()
    c.model.vit, c.data.image_size = dict(VIT), VIT["image_size"]
    c.model.lpt.update(dict(shared_depth=0, pool_size=5, prompt_length=2))
    c.optim.warmup_epochs, c.optim.base_lr = 0, 1.0  # a large first step: the update shows
    c.train.microbatches = k
    if not random:
        c.model.lpt.head_dropout = 0.0
        for branch in ("cb", "ib"):
            c.loss[branch].cloud_weight = 0.0
    return c


@pytest.fixture(scope="module")
def params():
    """Random parameters of the tiny LPT (drawn in NumPy: nothing to compile)."""
    model = lpt_from_config(make_config(1).model, len(COUNTS))
    size, rng = VIT["image_size"], np.random.default_rng(1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return (0.0 if "bias" in name else 0.5) * rng.standard_normal(leaf.shape, leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def batch():
    """The dual pair: a class-balanced batch (same-class groups of 4) and an
    instance-balanced one."""
    rng, size = np.random.default_rng(0), VIT["image_size"]
    images = lambda: rng.uniform(-1, 1, (B, size, size, 3)).astype(np.float32)  # noqa: E731
    cb = np.repeat(np.concatenate([rng.permutation(4) for _ in range(B // 16)]), 4)
    return {"cb": {"image": images(), "label": cb.astype(np.int32)},
            "ib": {"image": images(), "label": rng.choice(4, B, p=COUNTS / COUNTS.sum())
                   .astype(np.int32)}}


def train_step(config, phase):
    model = lpt_from_config(config.model, len(COUNTS))
    return model, steps.make_train_step(model, phase, config, class_counts=COUNTS,
                                        steps_per_epoch=2, batch_size=B)


def one_step(config, phase, params, batch):
    """(state before, state after, metrics, compiled HLO text) of one step of the trainer's
    own program (`TrainStep.jit`) on the 8-device mesh."""
    _, ts = train_step(config, phase)
    mesh = parallel.make_mesh()
    state, frozen = jax.device_put(ts.init(params), parallel.replicated(mesh))
    before = jax.device_get(state)  # the state is donated
    data = parallel.global_batch(batch, mesh)
    compiled = ts.jit(mesh).lower(state, frozen, data).compile(FAST_COMPILE)
    after, metrics = compiled(state, frozen, data)
    return before, jax.device_get(after), jax.device_get(metrics), compiled.as_text()


def assert_close(a, b, what, atol=0.0):
    """Float32 rounding: rtol 1e-5, and an absolute 1e-6 of the leaf's largest value for the
    elements near 0 (sums added in another order), plus `atol`."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=what,
                               atol=atol + 1e-6 * float(np.abs(b).max(initial=0)))


@pytest.mark.parametrize("number", [1, 2])
def test_microbatches_give_the_full_batch_update(number, params, batch):
    """k = 2 and 4 slices: the same state after the step (parameters, and the momentum: the
    gradient plus weight decay) and the same logged terms as k = 1, to float32 rounding; the
    pool entries picked (phase 2) in the batch's row order."""
    phase = METHOD.phase(number)
    before, full, m_full, hlo_full = one_step(make_config(1), phase, params, batch)
    for k in (2, 4):
        _, sliced, m_sliced, hlo = one_step(make_config(k), phase, params, batch)
        old, want = tree.flatten(before["trainable"]), tree.flatten(full["trainable"])
        for path, new in tree.flatten(sliced["trainable"]).items():
            # new - old rounds to the parameters' float32 spacing: that much more absolute
            assert_close(new - old[path], want[path] - old[path], f"k={k}: update of {path}",
                         atol=2 * np.finfo(np.float32).eps * float(np.abs(old[path]).max()))
        for a, b in zip(jax.tree.leaves(sliced["opt_state"]), jax.tree.leaves(full["opt_state"])):
            assert_close(a, b, f"k={k}: momentum")
        assert set(m_sliced) == set(m_full)
        for name, value in m_full.items():
            if name == "pool_selection":
                np.testing.assert_array_equal(m_sliced[name], value, err_msg=f"k={k}")
            else:
                assert_close(m_sliced[name], value, f"k={k}: metric {name}")
        # each device reads its own rows of every slice: no collective beyond k = 1's
        assert sorted(COLLECTIVE.findall(hlo)) == sorted(COLLECTIVE.findall(hlo_full)), k
    assert float(m_full["grad_norm"]) > 0 and int(m_full["nonfinite"]) == 0
    if number == 2:  # the picks vary over the rows: a reordering would show
        picks = m_full["pool_selection"].reshape(2, B, -1)
        assert all(len(np.unique(p, axis=0)) > 1 for p in picks)
        assert "match_cb" in m_full


def test_each_slice_draws_from_its_own_key(params, batch):
    """With head dropout and A-GCL's noise on, slice i draws from fold_in(step key, i): the
    step's loss is the mean of the objective on each slice (rows i, i+k, ...) with that key,
    and the keys matter (another key gives another loss)."""
    config, phase, k = make_config(2, random=True), METHOD.phase(2), 2
    _, _, metrics, _ = one_step(config, phase, params, batch)
    model, ts = train_step(config, phase)
    key = jax.random.fold_in(ts.init(params)[0]["rng"], 0)  # the step key of step 0 (spec §3)
    objective = registry.of(config).objective(config, COUNTS, config.phase2.epochs)
    forward = phase.forward(model)
    slices = [jax.tree.map(lambda x, i=i: x[i::k], batch) for i in range(k)]
    loss = jax.jit(lambda s, r: objective(forward, params, s, r, jnp.float32(0))[0]).lower(
        slices[0], key).compile(FAST_COMPILE)
    losses = [float(loss(s, jax.random.fold_in(key, i))) for i, s in enumerate(slices)]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    assert abs(float(loss(slices[0], jax.random.fold_in(key, 1))) - losses[0]) > 1e-4


def test_one_microbatch_is_the_plain_gradient(params, batch):
    """k = 1 adds nothing to the step (the program of a step without micro-batches); k > 1
    is one scan."""
    def primitives(k):
        _, ts = train_step(make_config(k), METHOD.phase(1))
        state, frozen = ts.init(params)
        jaxpr = jax.make_jaxpr(ts.fn)(state, frozen, batch)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}
    grad = object()
    assert steps.accumulated(grad, 1) is grad
    assert "scan" not in primitives(1) and "scan" in primitives(2)


@pytest.mark.parametrize("k,batch_size,share", [(2, 8, 1), (3, 16, 2), (16, 64, 8)])
def test_a_count_that_does_not_divide_each_devices_share_is_refused(tmp_path, k, batch_size,
                                                                    share):
    """One line naming the field, before anything is written: k must divide batch / devices
    (8 devices here; batch 8 with k = 2 divides the stream's batch, not a device's share)."""
    config = make_config(k)
    config.phase1.batch_size = config.phase2.batch_size = batch_size
    workdir = tmp_path / "wd"
    with pytest.raises(ConfigError) as e:
        context.build_context(config, str(workdir), load_backbone=False)
    assert e.value.field == "train.microbatches" and "\n" not in str(e.value)
    assert str(e.value).startswith(f"train.microbatches={k} does not divide phase1.batch_size="
                                   f"{batch_size} per device ({share} image")
    assert not workdir.exists()
    config.train.microbatches = 0
    with pytest.raises(ConfigError, match=r"^train.microbatches=0: expected an integer >= 1$"):
        context.build_context(config, str(workdir), load_backbone=False)


def test_the_step_refuses_a_batch_its_count_does_not_divide(params, batch):
    _, ts = train_step(make_config(4), METHOD.phase(1))
    state, frozen = ts.init(params)
    odd = jax.tree.map(lambda x: x[:6], batch)
    with pytest.raises(ConfigError, match="train.microbatches=4 does not divide the batch of 6"):
        jax.make_jaxpr(ts.fn)(state, frozen, odd)
