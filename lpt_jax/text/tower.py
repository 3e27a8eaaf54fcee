"""big_vision's SigLIP text tower (`proj.image_text.text_transformer`) with its parameter names.

LPT uses it once, at start-up, to turn class-name prompts into the cosine head's columns
(`lpt_jax.text_head`); it is not a backbone and never trains.

Parameter tree (the `txt/` subtree of a big_vision two-tower checkpoint):

    Embed_0/embedding (V, D)                  token embedding
    pos_embedding (1, L, D)                   learned, L = the tokenized length
    Encoder_0/encoderblock_{i}/...            the ViT's pre-norm blocks (models/vit.py names)
    Encoder_0/encoder_norm
    MAPHead_0/...                             only with pool_type='map'
    head/{kernel (D, E), bias (E,)}           projection into the image-text space

Forward: tokens (N, L) int -> embed + position -> blocks (bidirectional, no mask: SigLIP pads
with the end token, "sticky" EOS) -> final norm -> pool ('last': the last position, always the
end token) -> head. SigLIP's numerics: tanh GELU, LayerNorm epsilon 1e-6.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from lpt_jax.backbones import layers, vit
from lpt_jax.backbones import vit_weights as checkpoints

POOL_TYPES = ("last", "first", "gap", "max", "map")


class TextTransformer(nn.Module):
    vocab_size: int = 32_000
    max_len: int = 64
    width: int = 768
    depth: int = 12
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    embed_dim: Optional[int] = None   # head output width; None: width; 0: no head
    pool_type: str = "last"
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    dtype: jnp.dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        return self.width if self.embed_dim is None else (self.embed_dim or self.width)

    @nn.compact
    def __call__(self, tokens):
        """int tokens (N, max_len) -> text embeddings (N, out_dim), unnormalised."""
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"text pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        if tokens.shape[-1] != self.max_len:
            raise ValueError(f"tokens have length {tokens.shape[-1]}, the text tower was built "
                             f"for {self.max_len}")
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="Embed_0")(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=self.width ** -0.5),
                         (1, self.max_len, self.width))
        x = x + pos.astype(self.dtype)
        mlp_dim = self.mlp_dim or 4 * self.width
        encoder = vit.Encoder(self.depth, mlp_dim, self.num_heads, self.layernorm_epsilon,
                              self.gelu_approximate, self.dtype, name="Encoder_0")
        x = encoder.norm(encoder(x))
        if self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        elif self.pool_type == "max":
            x = jnp.max(x, axis=1)
        else:
            x = layers.MAPHead(mlp_dim, self.num_heads, self.layernorm_epsilon,
                            self.gelu_approximate, self.dtype, name="MAPHead_0")(x)
        if self.embed_dim != 0:
            x = nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x)
        return x


def from_config(cfg, **overrides) -> TextTransformer:
    """The text tower of a `model.text` config section: `variant` ('B', 'L', 'So400m', ...,
    big_vision's size names) sets width/depth/mlp_dim/num_heads unless given one by one."""
    cfg = dict(cfg)
    kwargs = {}
    variant = cfg.get("variant")
    if variant:
        if variant not in vit.VARIANTS:
            raise ValueError(f"unknown text tower variant {variant!r}: expected one of "
                             f"{sorted(vit.VARIANTS)}")
        kwargs.update(zip(("width", "depth", "mlp_dim", "num_heads"), vit.VARIANTS[variant]))
    fields = {f.name for f in dataclasses.fields(TextTransformer)} - {"parent", "name"}
    for key, value in cfg.items():
        if key in fields and value is not None:  # the section also says how to tokenize
            kwargs[key] = value
    kwargs.update(overrides)
    dtype = kwargs.get("dtype", "float32")
    kwargs["dtype"] = jnp.dtype(dtype) if isinstance(dtype, str) else dtype
    return TextTransformer(**kwargs)


def load_params(path: str, abstract_params: Mapping, *, subtree: str = "txt",
                dont_load: Iterable[str] = (), ignore: Iterable[str] = ()) -> dict:
    """The text tower's params from a big_vision two-tower .npz (its `subtree`, 'txt'); the
    position table is never resampled (its length is the tokenized length)."""
    return checkpoints.load_params(path, abstract_params, dont_load=dont_load, ignore=ignore,
                                   subtree=subtree, resample=False)
