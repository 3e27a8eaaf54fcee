"""Attention with Flax's parameter names (big_vision's), the way each backend runs it fastest,
and the layers built on it that the ViT and the SigLIP text tower share: the MLP block, and
big_vision's MAP head (a learned probe attends over the tokens). Every matmul takes the
`precision` of its module (a float32 model's matmuls run in float32 unless asked otherwise:
`PRECISIONS`)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# model.vit.matmul_precision -> the precision every matmul of the backbone asks for.
PRECISIONS = {"float32": jax.lax.Precision.HIGHEST, "tensorfloat32": jax.lax.Precision.HIGH,
              "bfloat16": jax.lax.Precision.DEFAULT, "default": None}
_NAMES = {v: k for k, v in PRECISIONS.items() if v is not None}


class BlockTuner(nn.Module):
    """The sites where a method changes a frozen transformer block (LIFT's AdaptFormer,
    Adapter, LoRA, SSF: lpt_jax.method.lift_model). A block built with a tuner calls it at
    each site; every site is the identity here, and a tuner overrides the ones it uses. Its
    params live in the block, under `tuner/`, and are initialised, never loaded.

        norm(name, y)                  after LayerNorm_0 / LayerNorm_1 (prompt tokens too)
        projection(name, x, out)       after each projection: 'query', 'key', 'value'
                                       ((B, T, H, d) outputs), 'out', 'Dense_0', 'Dense_1'
        mlp_branch(x, mlp)             what the MLP sub-block adds to the stream x entering it
                                       (default: the MLP's output `mlp`)
    """
    width: int
    mlp_dim: int

    def norm(self, name: str, y):
        return y

    def projection(self, name: str, x, out):
        return out

    def mlp_branch(self, x, mlp):
        return mlp


def _tuned(tuner, name, x, out):
    return out if tuner is None else tuner.projection(name, x, out)


class MlpBlock(nn.Module):
    mlp_dim: int
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x, tuner: Optional[BlockTuner] = None):
        width = x.shape[-1]
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, name=name, kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6), precision=self.precision)
        h = _tuned(tuner, "Dense_0", x, dense(self.mlp_dim, "Dense_0")(x))
        h = nn.gelu(h, approximate=self.gelu_approximate)
        return _tuned(tuner, "Dense_1", h, dense(width, "Dense_1")(h))


ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def attention_implementation(name: str) -> str:
    """'auto' -> 'einsum' on CPU (measured fastest there: benchmarks/results/cpu_step.md),
    'xla' (`jax.nn.dot_product_attention`) on accelerators; other names are kept."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    if name == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "xla"
    return name


def attend(q, k, v, implementation: str, precision: Optional[jax.lax.Precision] = None):
    """softmax(q k^T / sqrt(d)) v for q (B, N, H, d) over k, v (B, S, H, d) -> (B, N, H, d).

    'einsum' computes both products and their output with batch and heads leading
    (B, H, ., d), the layout XLA's CPU dot kernels take without copying each head's operand,
    in the forward and in autodiff's backward; the logits and the softmax are float32
    whatever the dtype, as in `jax.nn.dot_product_attention`, which 'xla' and 'cudnn' call.
    (A hand-written backward with every product in that layout measured no faster.)"""
    if implementation in ("xla", "cudnn"):  # no precision argument: its einsums read this
        with jax.default_matmul_precision(_NAMES.get(precision, "default")):
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    scale = q.shape[-1] ** -0.5
    heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  (B, T, H, d) -> (B, H, T, d)
    logits = jnp.einsum("bhnd,bhsd->bhns", heads_first(q), heads_first(k),
                        preferred_element_type=jnp.float32, precision=precision) * scale
    # softmax(l) v = (exp(l - max) v) / sum(exp(l - max)): the division moves to the (., d)
    # output, and autodiff's backward of this form is cheaper than softmax's (no gradient
    # flows through the max, which only shifts the exponent).
    unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("bhns,bhsd->bhnd", unnormalised.astype(v.dtype), heads_first(v),
                     precision=precision)
    out = out / unnormalised.sum(-1, keepdims=True).astype(out.dtype)
    return heads_first(out)


class MultiHeadDotProductAttention(nn.Module):
    """Attention with Flax's parameter names (query/key/value/out as DenseGeneral).

    `x` (B, N, D) are the queries; they attend over `kv` (B, S, D) (default: `x`, self-
    attention; the MAP head passes its probe as `x`) and over `extra` tokens (P, D) or
    (B, P, D), which give keys and values only. Unbatched extras (a prompt shared by all
    images) are projected once per call, not once per image. `extra_position` places their
    keys ('append': last; 'after_cls': after the first key); attention does not depend on
    the order of its keys, so both give the same result up to float rounding.
    """
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x, kv=None, extra=None, extra_position: str = "append",
                 tuner: Optional[BlockTuner] = None):
        kv = x if kv is None else kv
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, head_dim), dtype=self.dtype, name=name,
            kernel_init=nn.initializers.xavier_uniform(), precision=self.precision)
        query, key, value = proj("query"), proj("key"), proj("value")
        q = _tuned(tuner, "query", x, query(x))  # (B, ., H, hd)
        k, v = _tuned(tuner, "key", kv, key(kv)), _tuned(tuner, "value", kv, value(kv))
        if extra is not None:  # (DenseGeneral casts it to the compute dtype)
            k = _with_extra_tokens(k, _tuned(tuner, "key", extra, key(extra)), extra_position)
            v = _with_extra_tokens(v, _tuned(tuner, "value", extra, value(extra)),
                                   extra_position)
        y = attend(q, k, v, attention_implementation(self.attention), self.precision)
        out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                              kernel_init=nn.initializers.xavier_uniform(),
                              precision=self.precision)(y)
        return _tuned(tuner, "out", y, out)


class MAPHead(nn.Module):
    """big_vision's multihead attention pooling: a learned probe attends over the tokens,
    then x + MLP(LayerNorm(x)); (B, T, D) -> (B, D)."""
    mlp_dim: int
    num_heads: int
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x):
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
        probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        x = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention,
                                         self.precision,
                                         name="MultiHeadDotProductAttention_0")(probe, x)
        y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, name="LayerNorm_0")(x)
        x = x + MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, self.precision,
                         name="MlpBlock_0")(y)
        return x[:, 0]


def _with_extra_tokens(x, extra, position):
    """Insert `extra` (P, ...) or (B, P, ...) into x (B, S, ...) along axis 1."""
    extra = extra.astype(x.dtype)
    if extra.ndim == x.ndim - 1:
        extra = jnp.broadcast_to(extra[None], (x.shape[0],) + extra.shape)
    if position == "append":
        return jnp.concatenate([x, extra], axis=1)
    if position == "after_cls":
        return jnp.concatenate([x[:, :1], extra, x[:, 1:]], axis=1)
    raise ValueError(f"extra token position must be 'append' or 'after_cls', got {position!r}")
