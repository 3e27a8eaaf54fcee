"""Tests of lpt_jax.losses against float64 NumPy references written here from docs/spec.md §3.

The references below never call the module: they restate the spec's formulas in NumPy, and
their gradients come from central finite differences in float64.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from lpt_jax.method import losses, lpt

CB = {k: lpt.LOSS.fields["cb"].fields[k].default for k in ("gamma_pos", "gamma_neg")}  # 0, 4
IB = {k: lpt.LOSS.fields["ib"].fields[k].default for k in ("gamma_pos", "gamma_neg")}  # 0.5, 8
LONG_TAIL = np.array([600, 240, 60, 20, 6, 2])  # class 0 is the head, class 5 the rarest
B, C = 5, LONG_TAIL.size


# ----------------------------------------------------------------------------- float64 references


def ref_mu_bar(counts):
    log_n = np.log(np.asarray(counts, np.float64))
    mu = log_n.max() - log_n
    return mu / mu.max() if mu.max() > 0 else np.zeros_like(mu)


def ref_log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ref_agcl(z, y, counts, nu, gamma_pos, gamma_neg, s=20.0, m=0.1, a=0.5, eps=0.1):
    """The spec's seven steps, literally."""
    z = np.asarray(z, np.float64)
    onehot = np.eye(z.shape[1])[y]
    z1 = z - a * nu * ref_mu_bar(counts)[None, :]          # step 3 (steps 1-2 given)
    log_p = ref_log_softmax(s * (z1 - m * onehot))          # step 4
    p = np.exp(log_p)
    base = np.where(onehot == 1, 1.0 - p, p)                # step 5 (numpy: 0.0 ** 0.0 == 1)
    w = base ** np.where(onehot == 1, gamma_pos, gamma_neg)
    t = (1 - eps) * onehot + eps / z.shape[1]               # step 6
    return np.mean(-(t * w * log_p).sum(axis=-1))           # step 7


def ref_ce(scaled, y, eps=0.0):
    onehot = np.eye(scaled.shape[1])[y]
    t = (1 - eps) * onehot + eps / scaled.shape[1]
    return np.mean(-(t * ref_log_softmax(scaled)).sum(axis=-1))


def ref_gcl(z, y, counts, nu, s=20.0, m=0.1, a=0.5):
    onehot = np.eye(z.shape[1])[y]
    return ref_ce(s * (z - a * nu * ref_mu_bar(counts)[None, :] - m * onehot), y)


def ref_balanced_ce(z, y, counts, s=20.0, tau=1.0):
    prior = np.asarray(counts, np.float64) / np.sum(counts)
    return ref_ce(s * z + tau * np.log(prior)[None, :], y)


def finite_diff_grad(f, z, h=1e-6):
    z = np.asarray(z, np.float64)
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[idx] = h
        g[idx] = (f(z + step) - f(z - step)) / (2 * h)
    return g


def ref_expected_abs_cloud(std):
    """E|clip(X, -1, 1)|, X ~ N(0, std^2), by numerical integration plus the clipped tails."""
    inner, _ = integrate.quad(lambda x: x * stats.norm.pdf(x, scale=std), 0.0, 1.0)
    return 2.0 * inner + 2.0 * stats.norm.sf(1.0, scale=std) * 1.0


@pytest.fixture
def x64():
    """float64 in JAX for one test only (jax.enable_x64 context, or a restored config flag)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        manager = ctx(True)
    else:  # older / newer JAX without the context manager
        manager = contextlib.nullcontext()
        previous = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
    try:
        with manager:
            assert jnp.zeros(()).dtype == jnp.float64
            yield
    finally:
        if ctx is None:
            jax.config.update("jax_enable_x64", previous)
    assert jnp.zeros(()).dtype == jnp.float32, "x64 leaked out of the fixture"


# ----------------------------------------------------------------------------- hand-picked inputs


def _cloud_np(seed, shape):
    return np.abs(np.clip(np.random.default_rng(seed).normal(0.0, 1 / 3, shape), -1, 1))


def _case(name):
    """(logits, labels, counts, noise, extra kwargs) for the named situation."""
    rng = np.random.default_rng(7)
    nu = _cloud_np(11, (B, C))
    y = np.array([0, 1, 2, 3, 5])
    if name == "random":
        z = rng.uniform(-1, 1, (B, C))
        return z, y, LONG_TAIL, nu, {}
    if name == "plus_minus_one":
        # Row 0: target +1, rest -1 (p_y -> 1); row 1: target -1, rest +1 (p_y -> 0).
        z = rng.choice([-1.0, 1.0], (B, C))
        z[0] = -1.0
        z[0, y[0]] = 1.0
        z[1] = 1.0
        z[1, y[1]] = -1.0
        return z, y, LONG_TAIL, nu, {}
    if name == "p_y_near_one":  # 1 - p_y ~ 1e-4: the (1 - p_y)^0.5 slope is large here
        y = np.zeros(B, int)  # head class: the cloud never moves the target
        z = rng.uniform(-0.3, 0.1, (B, C))
        z[:, 0] = 0.65
        return z, y, LONG_TAIL, nu, {}
    if name == "p_y_is_one":  # scale 300 on a gap >= 0.3: 1 - p_y ~ e^-90, exactly 0 in float64
        y = np.zeros(B, int)
        z = rng.uniform(-1.0, 0.2, (B, C))
        z[:, 0] = 0.6
        return z, y, LONG_TAIL, nu, {"scale": 300.0}
    if name == "equal_counts":
        z = rng.uniform(-1, 1, (B, C))
        return z, y, np.full(C, 50), nu, {}
    raise KeyError(name)


CASES = ["random", "plus_minus_one", "p_y_near_one", "p_y_is_one", "equal_counts"]
GAMMAS = {"cb": CB, "ib": IB, "none": {"gamma_pos": 0.0, "gamma_neg": 0.0}}


# ----------------------------------------------------------------------------- A-GCL numerics


@pytest.mark.parametrize("gammas", sorted(GAMMAS))
@pytest.mark.parametrize("case", CASES)
def test_agcl_matches_float64_reference_value_and_gradient(case, gammas, x64):
    z, y, counts, nu, kw = _case(case)
    g = GAMMAS[gammas]

    def ref(zz):
        return ref_agcl(zz, y, counts, nu, g["gamma_pos"], g["gamma_neg"], s=kw.get("scale", 20.0))

    def ours(zz):
        return losses.agcl_loss(zz, jnp.asarray(y), counts, None, noise=jnp.asarray(nu), **g, **kw)

    value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(z, jnp.float64))
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, ref(z), rtol=1e-10, atol=1e-300)
    g_fd = finite_diff_grad(ref, z)
    assert np.all(np.isfinite(grad))
    # atol scales with the gradient: near p_y = 1 the whole gradient is tiny but still checked
    np.testing.assert_allclose(grad, g_fd, rtol=1e-5, atol=1e-6 * np.abs(g_fd).max() + 1e-12)


@pytest.mark.parametrize("gammas", ["cb", "ib"])
@pytest.mark.parametrize("case", CASES)
def test_agcl_float32_close_to_float64_reference(case, gammas):
    z, y, counts, nu, kw = _case(case)
    g = GAMMAS[gammas]
    s = kw.get("scale", 20.0)

    def ours(zz):
        return losses.agcl_loss(zz, jnp.asarray(y), counts, None, noise=jnp.asarray(nu, jnp.float32),
                                **g, **kw)

    value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(z, jnp.float32))
    assert value.dtype == jnp.float32
    ref = lambda zz: ref_agcl(zz, y, counts, nu, g["gamma_pos"], g["gamma_neg"], s=s)
    np.testing.assert_allclose(value, ref(z), rtol=2e-5, atol=1e-6)
    g_fd = finite_diff_grad(ref, z)
    np.testing.assert_allclose(grad, g_fd, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(g_fd).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gammas", ["cb", "ib"])
def test_agcl_finite_where_p_y_rounds_to_one(dtype, gammas):
    # Target +1, rest -1 at scale 20 (and 1e4): p_y == 1.0 in float32, the naive
    # (1 - p_y)^0.5 has an infinite slope there and its gradient times log p_y = 0 is NaN.
    z = -jnp.ones((3, C), dtype)
    y = jnp.array([0, 2, 5])
    z = z.at[jnp.arange(3), y].set(1.0)
    for scale in (20.0, 1e4):
        # 0.6 = margin + the largest possible push (0.5): p_y == 1 whatever the cloud draws
        p_y = jnp.exp(jax.nn.log_softmax(scale * (z.astype(jnp.float32) - 0.6 * jax.nn.one_hot(y, C))))
        assert np.all(np.asarray(p_y)[np.arange(3), np.asarray(y)] == 1.0)  # the edge is reached
        nu = jnp.asarray(_cloud_np(1, z.shape), jnp.float32)
        f = lambda zz: losses.agcl_loss(zz, y, LONG_TAIL, noise=nu, scale=scale, **GAMMAS[gammas])
        value, grad = jax.jit(jax.value_and_grad(f))(z)
        assert value.dtype == jnp.float32
        assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_agcl_bf16_logits_computed_in_float32():
    z32 = jnp.asarray(_case("random")[0], jnp.float32)
    y, nu = jnp.asarray(_case("random")[1]), jnp.asarray(_case("random")[3], jnp.float32)
    z16 = z32.astype(jnp.bfloat16)
    loss = jax.jit(lambda zz: losses.agcl_loss(zz, y, LONG_TAIL, noise=nu, **IB))
    out16, out32 = loss(z16), loss(z16.astype(jnp.float32))
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, rtol=1e-6)  # only the input rounding differs


def test_equal_counts_disable_the_cloud():
    z, y, _, nu, _ = _case("random")
    equal = np.full(C, 37)
    with_noise = losses.agcl_loss(jnp.asarray(z), jnp.asarray(y), equal, noise=jnp.asarray(nu), **IB)
    no_noise = losses.agcl_loss(jnp.asarray(z), jnp.asarray(y), equal, noise=jnp.zeros((B, C)), **IB)
    assert np.isfinite(with_noise)
    np.testing.assert_array_equal(with_noise, no_noise)
    np.testing.assert_array_equal(losses.relative_log_counts(equal), np.zeros(C, np.float32))


def test_rng_draws_gaussian_cloud_fresh_per_call():
    z, y, _, _, _ = _case("random")
    z, y = jnp.asarray(z, jnp.float32), jnp.asarray(y)
    key = jax.random.key(3)
    drawn = losses.agcl_loss(z, y, LONG_TAIL, key, **CB)
    explicit = losses.agcl_loss(z, y, LONG_TAIL, noise=losses.gaussian_cloud(key, (B, C)), **CB)
    np.testing.assert_allclose(drawn, explicit, rtol=1e-6)
    other = losses.agcl_loss(z, y, LONG_TAIL, jax.random.key(4), **CB)
    assert abs(float(other) - float(drawn)) > 1e-6
    with pytest.raises(ValueError, match="rng"):
        losses.agcl_loss(z, y, LONG_TAIL, None, **CB)


# ----------------------------------------------------------------------------- noise statistics


@pytest.mark.parametrize("std", [1 / 3, 1.0])
def test_gaussian_cloud_statistics(std):
    nu = np.asarray(losses.gaussian_cloud(jax.random.key(0), (400, 1000), std))
    assert nu.min() >= 0.0 and nu.max() <= 1.0
    expected = ref_expected_abs_cloud(std)
    if std == 1 / 3:  # the clip barely matters at 3 sigma
        assert abs(expected - (1 / 3) * np.sqrt(2 / np.pi)) < 1e-3
    else:  # at 1 sigma the clip is visible: P(nu == 1) = 2 * sf(1)
        np.testing.assert_allclose(np.mean(nu == 1.0), 2 * stats.norm.sf(1.0), atol=5e-3)
    stderr = nu.std() / np.sqrt(nu.size)
    assert abs(nu.mean() - expected) < 5 * stderr, (nu.mean(), expected)
    # fresh per sample and per class: no correlation between columns or rows
    assert abs(np.corrcoef(nu[:, 0], nu[:, 1])[0, 1]) < 0.2
    assert abs(np.corrcoef(nu[0], nu[1])[0, 1]) < 0.1


def test_cloud_pushes_only_tail_classes_down():
    counts = np.array([1000, 300, 50, 10])  # head 0, rarest 3
    n = 200_000
    z = jnp.zeros((n, counts.size), jnp.float32)
    push = np.asarray(losses.clouded_logits(z, counts, jax.random.key(1)))
    assert np.all(push <= 0.0)
    assert np.all(push[:, 0] == 0.0)  # mu_bar = 0: the head class is never moved
    assert np.mean(push[:, 3] < 0.0) > 0.999  # the rarest class moves (nu = 0 has probability 0)
    mean_abs_nu = ref_expected_abs_cloud(1 / 3)
    expected = -0.5 * mean_abs_nu * ref_mu_bar(counts)
    stderr = push.std(axis=0) / np.sqrt(n)
    np.testing.assert_allclose(push.mean(axis=0), expected, atol=5 * stderr.max() + 1e-7)
    np.testing.assert_allclose(push[:, 3].mean(), -0.5 * mean_abs_nu, rtol=1e-2)
    np.testing.assert_allclose(push[:, 3].min(), -0.5, atol=1e-6)  # at most cloud_weight * 1


# ----------------------------------------------------------------------------- baselines


def test_relative_log_counts_matches_spec():
    counts = np.array([4980, 100, 5, 20])
    rel = losses.relative_log_counts(counts)
    assert rel.dtype == jnp.float32
    np.testing.assert_allclose(rel, np.log(4980 / counts) / np.log(4980 / 5), rtol=1e-6)
    traced = jax.jit(losses.relative_log_counts)(jnp.asarray(counts, jnp.float32))
    np.testing.assert_allclose(traced, rel, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        losses.relative_log_counts([3, 0, 1])


def test_gcl_matches_reference_and_is_agcl_without_weights_and_smoothing(x64):
    z, y, counts, nu, _ = _case("random")
    ours = losses.gcl_loss(jnp.asarray(z), jnp.asarray(y), counts, noise=jnp.asarray(nu))
    np.testing.assert_allclose(ours, ref_gcl(z, y, counts, nu), rtol=1e-10)
    as_agcl = losses.agcl_loss(jnp.asarray(z), jnp.asarray(y), counts, noise=jnp.asarray(nu),
                               gamma_pos=0.0, gamma_neg=0.0, label_smoothing=0.0)
    np.testing.assert_allclose(ours, as_agcl, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_xent_matches_reference(eps, x64):
    z, y, *_ = _case("plus_minus_one")
    ours = losses.softmax_xent(jnp.asarray(z), jnp.asarray(y), label_smoothing=eps)
    np.testing.assert_allclose(ours, ref_ce(20.0 * z, y, eps), rtol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_balanced_softmax_matches_reference(tau, x64):
    z, y, counts, *_ = _case("random")
    ours = losses.balanced_softmax_xent(jnp.asarray(z), jnp.asarray(y), counts, tau=tau)
    np.testing.assert_allclose(ours, ref_balanced_ce(z, y, counts, tau=tau), rtol=1e-10)
    # uniform prior: a constant shift of all logits, so it equals plain cross-entropy
    uniform = losses.balanced_softmax_xent(jnp.asarray(z), jnp.asarray(y), np.full(C, 9), tau=tau)
    np.testing.assert_allclose(uniform, losses.softmax_xent(jnp.asarray(z), jnp.asarray(y)), rtol=1e-12)


@pytest.mark.parametrize("name", ["agcl", "gcl", "ce", "balanced_ce", "logit_adjusted"])
def test_registered_losses_jit_and_finite_gradients_at_edges(name):
    assert set(losses.LOSSES) == {"agcl", "gcl", "ce", "balanced_ce", "logit_adjusted"}
    extra = CB if name == "agcl" else {}
    value_and_grad = jax.jit(jax.value_and_grad(losses.make_branch_loss(name, LONG_TAIL, **extra)))
    for case in ("plus_minus_one", "p_y_is_one"):
        z, y, *_ = _case(case)
        for dtype in (jnp.float32, jnp.bfloat16):
            value, grad = value_and_grad(jnp.asarray(z, dtype), jnp.asarray(y), jax.random.key(2))
            assert value.dtype == jnp.float32 and value.shape == ()
            assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_make_branch_loss_binds_counts_and_constants():
    z, y, *_ = _case("random")
    z, y, key = jnp.asarray(z, jnp.float32), jnp.asarray(y), jax.random.key(5)
    branch = jax.jit(losses.make_branch_loss("agcl", LONG_TAIL, **IB, margin=0.2))
    direct = losses.agcl_loss(z, y, LONG_TAIL, key, **IB, margin=0.2)
    np.testing.assert_allclose(branch(z, y, key), direct, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_branch_loss("focal", LONG_TAIL)
    with pytest.raises(ValueError, match="gamma"):
        losses.make_branch_loss("agcl", LONG_TAIL)
    with pytest.raises(ValueError, match="gama_pos"):
        losses.make_branch_loss("agcl", LONG_TAIL, gama_pos=0.5, gamma_neg=8.0)
    # a config switched from 'agcl' to 'ce' keeps A-GCL's constants: those CE lacks are dropped
    as_ce = losses.make_branch_loss("ce", LONG_TAIL, **IB, margin=0.2, cloud_std=0.5, scale=10.0,
                                    label_smoothing=0.1)
    np.testing.assert_allclose(as_ce(z, y, key), losses.softmax_xent(z, y, scale=10.0, label_smoothing=0.1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        losses.make_branch_loss("gcl", [4, 0, 2])


# ----------------------------------------------------------------------------- phase objective


def test_eta_schedule():
    np.testing.assert_allclose([losses.eta(e, 10) for e in range(10)],
                               [0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05])
    with pytest.raises(ValueError):
        losses.eta(0, 0)


def test_phase_objective_terms_and_gradients():
    total, parts = losses.phase_objective(1.0, 2.0, 0.4, 0.6, 0.25)
    # 1 - 0.5 * 0.4 + 0.25 * (2 - 0.5 * 0.6) = 0.8 + 0.425
    np.testing.assert_allclose(total, 1.225)
    assert parts["total"] == total and parts["eta"] == 0.25
    grads = jax.grad(lambda a: losses.phase_objective(*a, 0.25)[0])(
        (jnp.float32(1.0), jnp.float32(2.0), jnp.float32(0.4), jnp.float32(0.6)))
    np.testing.assert_allclose(grads, [1.0, 0.25, -0.5, -0.125])
    phase1, _ = losses.phase_objective(1.0, 2.0, 0.0, 0.0, 0.5)
    np.testing.assert_allclose(phase1, 2.0)
