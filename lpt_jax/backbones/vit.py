"""A Linen ViT whose parameter tree uses big_vision's names, with per-block extra tokens.

Parameter tree (what `ViT.init` creates and what `lpt_jax.backbone` loads):

    embedding/{kernel (p, p, 3, D), bias}       patch embedding (a strided conv)
    pos_embedding (1, N, D)                     learned, no CLS row (big_vision layout)
    cls (1, 1, D)                               only with pool_type='tok'
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                                 LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
    Transformer/encoder_norm
    MAPHead_0/{probe (1, 1, D), MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
                                                only with pool_type='map' (SigLIP image towers)
    pre_logits/{kernel,bias}                    only with representation_size
    head/{kernel,bias}                          only with num_classes

As a backbone module (see `lpt_jax.backbones`): `FIELDS` declares its config section
`model.vit`, `from_config(model.vit)` builds the ViT, `load_params(...)` reads a big_vision,
vit_jax/AugReg or timm checkpoint (`vit_weights`).

Pooling (`pool_type`): 'tok' the class token, 'gap' the mean of the tokens, 'map' big_vision's
multihead attention pooling (a learned probe attends over the tokens, then LayerNorm + MLP
with a residual; no class token). All three pool after the final encoder norm, as big_vision.

Extra tokens (the mechanism that prompts use): `encode(..., extras={i: tokens})` adds
`tokens` (T, D) or (B, T, D) to the sequence of block i only: the block's tokens attend over
them, and their own outputs, which the next block would not see, are never computed (the
sequence length is unchanged). `encode_features` also skips the last block's rows that
class-token pooling discards.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.layers import (
    ATTENTION_IMPLEMENTATIONS,
    PRECISIONS,
    BlockTuner,
    MAPHead,
    MlpBlock,
    MultiHeadDotProductAttention,
)
from lpt_jax.config.fields import (
    BATCHED,
    EXPORTED,
    INCIDENTAL,
    Field,
    Section,
    boolean,
    integer,
    number,
    one_of,
    text,
)
from lpt_jax.errors import ConfigError

# width, depth, mlp_dim, num_heads, as in big_vision's `decode_variant` (So400m: the
# shape-optimised SigLIP tower; g-opt: SigLIP 2's largest).
VARIANTS: Mapping[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),  # test-sized
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

POOL_TYPES = ("tok", "gap", "map")


def decode_variant(variant: str) -> dict:
    """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16))."""
    try:
        size, patch = variant.split("/")
        width, depth, mlp_dim, num_heads = VARIANTS[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in "
            f"{sorted(VARIANTS)} and an integer patch, e.g. 'B/16'.") from None
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                patch_size=(patch_size, patch_size))


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block.

    Extra tokens (prompts) live for this block only: the block's tokens attend over them, but
    their own outputs would be dropped after it, so they are never computed (no query,
    attention output or MLP for them: with 10-20 prompts on 197 tokens, 4-9 % of the block).
    `rows` keeps only the first `rows` tokens of the output: the last block before class-token
    pooling needs the class token's row alone (its keys and values still come from all)."""
    mlp_dim: int
    num_heads: int
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    precision: Optional[jax.lax.Precision] = None
    tuner: Optional[Callable[..., BlockTuner]] = None  # (width, mlp_dim, name) -> BlockTuner

    @nn.compact
    def __call__(self, x, extra=None, extra_position: str = "append",
                 rows: Optional[int] = None):
        t = None if self.tuner is None else self.tuner(x.shape[-1], self.mlp_dim, name="tuner")
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=self.layernorm_epsilon, dtype=self.dtype, name=name)
        tuned_norm = lambda name, y: y if t is None else t.norm(name, y)  # noqa: E731
        norm_0 = norm("LayerNorm_0")
        y = tuned_norm("LayerNorm_0", norm_0(x))
        y_extra = (None if extra is None
                   else tuned_norm("LayerNorm_0", norm_0(jnp.asarray(extra, x.dtype))))
        queries = y if rows is None else y[:, :rows]
        x = x if rows is None else x[:, :rows]
        y = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention,
                                         self.precision,
                                         name="MultiHeadDotProductAttention_0")(
            queries, y, y_extra, extra_position, tuner=t)
        x = x + y
        y = tuned_norm("LayerNorm_1", norm("LayerNorm_1")(x))
        y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, self.precision,
                     name="MlpBlock_0")(y, tuner=t)
        return x + (y if t is None else t.mlp_branch(x, y))


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"
    precision: Optional[jax.lax.Precision] = None
    tuner: Optional[Callable[..., BlockTuner]] = None

    def setup(self):
        block_cls = Encoder1DBlock
        if self.remat:  # recompute activations in backward: memory for FLOPs
            block_cls = nn.remat(Encoder1DBlock, static_argnums=(3, 4))
        self.blocks = [
            block_cls(self.mlp_dim, self.num_heads, self.layernorm_epsilon,
                      self.gelu_approximate, self.dtype, self.attention, self.precision,
                      self.tuner, name=f"encoderblock_{i}")
            for i in range(self.depth)]
        self.encoder_norm = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                                         name="encoder_norm")

    def __call__(self, x, start: int = 0, stop: Optional[int] = None,
                 extras: Optional[Mapping[int, jax.Array]] = None,
                 extra_position: str = "append", last_rows: Optional[int] = None):
        """Runs blocks [start, stop); `extras[i]` are tokens block i attends over as well;
        the last block outputs only its first `last_rows` tokens (all when None)."""
        stop = self.depth if stop is None else stop
        extras = extras or {}
        for i in range(start, stop):
            rows = last_rows if i == stop - 1 else None
            x = self.blocks[i](x, extras.get(i), extra_position, rows)
        return x

    def norm(self, x):
        return self.encoder_norm(x)


class ViT(nn.Module):
    """Vision Transformer with big_vision parameter names.

    Methods (use with `model.apply(variables, ..., method=...)`):
      `embed(images)` -> tokens (B, [1+]N, D); `encode(tokens, start, stop, extras)`;
      `features(tokens)` -> pooled pre-logits feature; `logits(feature)`; `__call__` does all.
    """
    num_classes: Optional[int] = None
    image_size: Sequence[int] = (224, 224)
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    pool_type: str = "tok"
    representation_size: Optional[int] = None
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"          # see `attention_implementation`
    # How float32 matmuls run (jax.default_matmul_precision): 'float32' as the release's
    # PyTorch defaults (no TF32 on NVIDIA GPUs), or the faster 'tensorfloat32' / 'bfloat16'
    # passes, or 'default' (the backend's: TF32 on recent GPUs, bf16 passes on TPUs).
    matmul_precision: str = "float32"
    # A method's changes inside every block (lpt_jax.backbones.layers.BlockTuner): a factory
    # (width, mlp_dim, name) -> tuner, set by the method (`vit.clone(block_tuner=...)`).
    block_tuner: Optional[Callable[..., BlockTuner]] = None
    # Stored in float32 when the rest is stored in `dtype`: Flax's LayerNorm multiplies its
    # scale and bias in float32 (lpt_jax.backbones.stored_in_compute_dtype).
    keep_float32 = (r"(^|/)LayerNorm_\d+/", r"(^|/)encoder_norm/")

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid. Like big_vision's VALID patch convolution, a size that is not a
        multiple of the patch drops the last pixels (So400m/14 at 384 px: 27 x 27 patches)."""
        (h, w), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        if h < ph or w < pw:
            raise ValueError(f"image size {(h, w)} is smaller than the patch size {(ph, pw)}")
        return h // ph, w // pw

    @property
    def initialised_params(self) -> tuple[str, ...]:
        """Regexes over its param paths that it initialises and no checkpoint holds: the
        block tuner's, when a method set one."""
        return (r"Transformer/encoderblock_\d+/tuner/.*",) if self.block_tuner else ()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool_type == "tok" else 0

    def setup(self):
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        gh, gw = self.grid
        self.embedding = nn.Conv(self.width, tuple(_pair(self.patch_size)),
                                 strides=tuple(_pair(self.patch_size)), padding="VALID",
                                 dtype=self.dtype, precision=self.precision, name="embedding")
        self.pos_embedding = self.param(
            "pos_embedding", nn.initializers.normal(stddev=1 / self.width ** 0.5),
            (1, gh * gw, self.width))
        if self.pool_type == "tok":
            self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        self.Transformer = Encoder(
            self.depth, self.mlp_dim or 4 * self.width, self.num_heads, self.layernorm_epsilon,
            self.gelu_approximate, self.dtype, self.remat, self.attention, self.precision,
            self.block_tuner, name="Transformer")
        if self.pool_type == "map":
            self.MAPHead_0 = MAPHead(self.mlp_dim or 4 * self.width, self.num_heads,
                                     self.layernorm_epsilon, self.gelu_approximate, self.dtype,
                                     self.attention, self.precision)
        if self.representation_size:
            self.pre_logits = nn.Dense(self.representation_size, dtype=self.dtype,
                                       precision=self.precision, name="pre_logits")
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                                 kernel_init=nn.initializers.zeros, precision=self.precision)

    @property
    def precision(self):
        return PRECISIONS[self.matmul_precision]

    def embed(self, images):
        """NHWC images in [-1, 1] -> tokens (B, [1+]N, D): patches + position, CLS first."""
        x = self.embedding(jnp.asarray(images, self.dtype))
        b, h, w, d = x.shape
        if (h, w) != self.grid:
            raise ValueError(f"images give a {h}x{w} patch grid, the model was built for "
                             f"{self.grid}: set image_size to the input size")
        x = x.reshape(b, h * w, d) + self.pos_embedding.astype(self.dtype)
        if self.pool_type == "tok":
            cls = jnp.broadcast_to(self.cls.astype(self.dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
        return x

    def encode(self, x, start: int = 0, stop: Optional[int] = None, extras=None,
               extra_position: str = "append"):
        return self.Transformer(x, start, stop, extras, extra_position)

    def encode_features(self, x, start: int = 0, extras=None, extra_position: str = "append"):
        """Blocks start..depth-1, then `features`. With class-token pooling the last block
        computes the class token's row only: the other rows' outputs would be discarded."""
        rows = 1 if self.pool_type == "tok" else None
        return self.features(self.Transformer(x, start, self.depth, extras, extra_position,
                                              last_rows=rows))

    def features(self, x):
        """Encoded tokens -> the pooled, normed (pre-logits) feature (B, D')."""
        x = self.Transformer.norm(x)
        if self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type == "map":
            x = self.MAPHead_0(x)
        else:
            x = jnp.mean(x, axis=1)
        if self.representation_size:
            x = jnp.tanh(self.pre_logits(x))
        return x

    def logits(self, feature):
        if not self.num_classes:
            raise ValueError("this ViT was built without a head (num_classes is None)")
        return self.head(feature)

    def __call__(self, images, extras=None, extra_position: str = "append"):
        """Returns (logits or None, {'pre_logits': feature, 'encoded': tokens})."""
        x = self.encode(self.embed(images), extras=extras, extra_position=extra_position)
        feature = self.features(x)
        logits = self.logits(feature) if self.num_classes else None
        return logits, {"pre_logits": feature, "encoded": x}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def vit_from_config(cfg, **overrides) -> ViT:
    """Builds a ViT from an ml_collections/dict model config (see configs/common.py)."""
    cfg = dict(cfg)
    kwargs = decode_variant(cfg.pop("variant")) if cfg.get("variant") else {}
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name"}
    for key, value in cfg.items():
        if key in fields and value is not None:
            kwargs[key] = value
    kwargs.update(overrides)
    dtype = kwargs.get("dtype", "float32")
    kwargs["dtype"] = jnp.dtype(dtype) if isinstance(dtype, str) else dtype
    for key in ("image_size", "patch_size"):
        if key in kwargs:
            kwargs[key] = _pair(kwargs[key])
    return ViT(**kwargs)


# ------------------------------------------------------------------------------------------
# The backbone-module interface (lpt_jax.backbones.get("vit")).

def _cudnn_needs_a_gpu(vit, root) -> None:
    if vit.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.vit.attention='cudnn' needs an NVIDIA GPU (cuDNN), but JAX "
                          f"runs on {jax.default_backend()}: use 'auto'",
                          field="model.vit.attention")


def _size(doc):
    return Field(None, doc + " (set by variant unless variant is None)",
                 integer(at_least=1), kind=int)


FIELDS = Section("the frozen ViT (spec §1): ViT-B/16, class token, LayerNorm eps 1e-5, exact "
                 "GELU", dict(
    variant=Field("B/16", "'<size>/<patch>' (size in VARIANTS, e.g. 'B/16', 'L/16', "
                  "'So400m/14'): sets width, depth, mlp_dim, num_heads and patch_size; None: "
                  "set them one by one", text(r"[A-Za-z0-9-]+/\d+", "'<size>/<patch>', e.g. "
                                              "'B/16'"), kind=str),
    width=_size("token width D"),
    depth=_size("number of blocks L"),
    num_heads=_size("attention heads"),
    mlp_dim=_size("MLP hidden width"),
    patch_size=_size("patch size in pixels"),
    image_size=Field(224, "input size in pixels (position embeddings are resampled to it)",
                     integer(at_least=1)),
    pool_type=Field("tok", "pooling: 'tok' the class token, 'gap' the mean, 'map' big_vision's "
                    "MAP head (SigLIP)", one_of(*POOL_TYPES), EXPORTED),
    representation_size=Field(0, "a pre-logits layer of this width (0: none)",
                              integer(at_least=0)),
    layernorm_epsilon=Field(1e-5, "LayerNorm epsilon (the release: 1e-5; big_vision: 1e-6)",
                            number(above=0), EXPORTED),
    gelu_approximate=Field(False, "tanh GELU (SigLIP) instead of the exact erf GELU",
                           boolean(), EXPORTED),
    dtype=Field("float32", "compute dtype; the frozen weights are stored in it",
                one_of("float32", "bfloat16", "float16")),
    remat=Field(False, "recompute block activations in the backward pass (memory for FLOPs)",
                boolean(), INCIDENTAL),
    matmul_precision=Field("float32", "how float32 matmuls run: 'float32' (the release's: "
                           "no TF32 on NVIDIA GPUs), 'tensorfloat32', 'bfloat16' (faster "
                           "passes) or 'default' (the backend's: TF32 on recent GPUs, bf16 "
                           "passes on TPUs)", one_of("float32", "tensorfloat32", "bfloat16",
                                                     "default"), INCIDENTAL),
    attention=Field("auto", "how attention is computed (the same function): 'einsum' "
                    "(fastest on CPU), 'xla' or 'cudnn' (jax.nn.dot_product_attention); "
                    "'auto' = 'einsum' on CPU, 'xla' elsewhere",
                    one_of(*ATTENTION_IMPLEMENTATIONS, note="'auto': 'einsum' on CPU, 'xla' on "
                           "accelerators"), INCIDENTAL)),
    roles=frozenset({BATCHED}), rules=(_cudnn_needs_a_gpu,))

from_config = vit_from_config


def load_params(path: str, abstract_params: Mapping, *, dont_load: Iterable[str] = (),
                ignore: Iterable[str] = (), model: ViT, subtree: str = "") -> dict:
    """The ViT params from a big_vision / vit_jax / timm file, the posemb resampled to
    `model.grid`; `subtree` picks one tower of a two-tower file (SigLIP: 'img')."""
    return vit_weights.load_params(path, abstract_params, dont_load=dont_load, ignore=ignore,
                                   grid=model.grid, subtree=subtree)
