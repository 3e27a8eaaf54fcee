"""LIFT's lightweight modules inside the frozen blocks, and the model around the backbone
(Shi, Wei, Li, Zhang, Li, "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning
Hurts", ICML 2024; semantics read from github.com/shijxcs/LIFT, models/peft_modules.py and
models/peft_vit.py, written here from docs/spec.md §9).

`LiftTuner` is a `BlockTuner` (lpt_jax.backbones.layers): the backbone's blocks call it at
their sites, so the modules need no copy of the block:

    adaptformer  beside the MLP: the block adds scale * up(relu(down(LN(x)))) of the stream
                 x entering the MLP sub-block, next to MLP(LN_1(x)) (scale learnable, init 1)
    adapter      after the MLP: h + up(relu(down(LN(h)))) of the MLP's output h
    lora         q += (y A_q B_q) / r and v += (y A_v B_v) / r, y the attention's input
    ssf          a learned scale and shift after LayerNorm_0/1, the q/k/v and output
                 projections, and both MLP layers

Initialisation as LIFT's PyTorch code: `down` Kaiming-normal with a = sqrt(5) (std
1/sqrt(3 fan_in)), `up` and every bias zero, LayerNorm 1/0 with eps 1e-5 (torch's
default); LoRA's A Kaiming-uniform with a = sqrt(5) on its (D, r) tensor, whose fan-in is r
(U(-1/sqrt(r), 1/sqrt(r))), B zero; SSF scales N(1, 0.02^2), shifts N(0, 0.02^2). Every
module starts as the identity except SSF.

Params (under each block's `tuner/`): adaptformer/{LayerNorm_0, down, up, scale},
adapter/{LayerNorm_0, down, up}, lora_{query,value}_{a,b}, ssf_<site>_{scale,shift}.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lpt_jax.backbones.layers import BlockTuner
from lpt_jax.method.lpt_model import CosineHead

TUNERS = ("adaptformer", "adapter", "lora", "ssf")
_HIGHEST = jax.lax.Precision.HIGHEST
# torch's kaiming_normal_(a=sqrt(5)) on a Linear weight: gain^2 = 2 / (1 + 5) = 1/3.
_KAIMING_A_SQRT5 = nn.initializers.variance_scaling(1 / 3, "fan_in", "normal")


def bottleneck_width(num_classes: int, depth: int) -> int:
    """LIFT's default bottleneck: 2 ** max(0, floor(log2(C / (2 L))))."""
    return 2 ** max(0, int(math.floor(math.log2(num_classes / (2 * depth)))))


class Bottleneck(nn.Module):
    """up(relu(down(LN(x)))), optionally times a learnable scalar (AdaptFormer)."""
    width: int
    bottleneck: int
    scaled: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)(x.astype(jnp.float32))
        y = nn.Dense(self.bottleneck, kernel_init=_KAIMING_A_SQRT5, precision=_HIGHEST,
                     name="down")(y)
        y = nn.Dense(self.width, kernel_init=nn.initializers.zeros, precision=_HIGHEST,
                     name="up")(nn.relu(y))
        if self.scaled:
            y = y * self.param("scale", nn.initializers.ones, (1,))
        return y.astype(x.dtype)


def _lora_a(key, shape, dtype=jnp.float32):
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) with torch's fan-in = r
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _normal_around(mean: float, std: float = 0.02):
    return lambda key, shape, dtype=jnp.float32: mean + std * jax.random.normal(key, shape,
                                                                                  dtype)


class LiftTuner(BlockTuner):
    """The modules `tuners` names (a subset of TUNERS) in one block."""
    tuners: tuple[str, ...] = ("adaptformer",)
    bottleneck: int = 1

    def setup(self):
        unknown = set(self.tuners) - set(TUNERS)
        if unknown:
            raise ValueError(f"unknown LIFT modules {sorted(unknown)}; known: {TUNERS}")
        if "adaptformer" in self.tuners:
            self.adaptformer = Bottleneck(self.width, self.bottleneck, scaled=True)
        if "adapter" in self.tuners:
            self.adapter = Bottleneck(self.width, self.bottleneck)
        if "lora" in self.tuners:
            self.lora = {name: (self.param(f"lora_{name}_a", _lora_a,
                                           (self.width, self.bottleneck)),
                                self.param(f"lora_{name}_b", nn.initializers.zeros,
                                           (self.bottleneck, self.width)))
                         for name in ("query", "value")}
        if "ssf" in self.tuners:
            sizes = dict(LayerNorm_0=self.width, LayerNorm_1=self.width, query=self.width,
                         key=self.width, value=self.width, out=self.width,
                         Dense_0=self.mlp_dim, Dense_1=self.width)
            self.ssf = {site: (self.param(f"ssf_{site}_scale", _normal_around(1.0), (n,)),
                               self.param(f"ssf_{site}_shift", _normal_around(0.0), (n,)))
                        for site, n in sizes.items()}

    def _ssf(self, site: str, y):
        if "ssf" not in self.tuners:
            return y
        scale, shift = self.ssf[site]
        shape = y.shape[-2:] if site in ("query", "key", "value") else y.shape[-1:]
        return (y * scale.reshape(shape) + shift.reshape(shape)).astype(y.dtype)

    def norm(self, name, y):
        return self._ssf(name, y)

    def projection(self, name, x, out):
        if "lora" in self.tuners and name in self.lora:  # before SSF, as LIFT
            a, b = self.lora[name]
            delta = jnp.matmul(jnp.matmul(x.astype(jnp.float32), a, precision=_HIGHEST), b,
                               precision=_HIGHEST) / self.bottleneck
            out = out + delta.reshape(out.shape).astype(out.dtype)
        return self._ssf(name, out)

    def mlp_branch(self, x, mlp):
        if "adapter" in self.tuners:  # sequential: on the MLP's output
            mlp = mlp + self.adapter(mlp)
        if "adaptformer" in self.tuners:  # parallel: on the stream entering the sub-block
            mlp = mlp + self.adaptformer(x)
        return mlp


def _vpt_init(patch_area: int):
    """LIFT's VPT init: U(+-sqrt(6 / (3 * patch_h * patch_w + D)))."""
    def init(key, shape, dtype=jnp.float32):
        bound = math.sqrt(6.0 / (3 * patch_area + shape[-1]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class LIFT(nn.Module):
    """The tuned backbone's pooled feature -> cosine head (the loss scales the cosines).

    `vpt` adds LIFT's visual prompts (`vpt_prompt`): 'shallow' appends `vpt_length` tokens to
    the sequence before block 0, carried through every block (class-token pooling reads
    only the class token); 'deep' gives every block its own tokens, which the block attends
    over and whose outputs the next block does not see (the mechanism of LPT's prompts)."""
    backbone: nn.Module   # built with `block_tuner` set (lpt_jax.method.lift.build)
    num_classes: int
    vpt: str = "none"     # 'none', 'shallow' or 'deep'
    vpt_length: int = 10

    def setup(self):
        self.head = CosineHead(self.num_classes, name="head")
        if self.vpt != "none":
            patch = self.backbone.patch_size
            area = patch * patch if isinstance(patch, int) else patch[0] * patch[1]
            shape = (self.vpt_length, self.backbone.width)
            if self.vpt == "deep":
                shape = (self.backbone.depth,) + shape
            self.vpt_prompt = self.param("vpt_prompt", _vpt_init(area), shape)

    def classify(self, images, train: bool = False):
        """-> dict(logits (B, C), match 0, indices (B, 0), query (B, D)) (nothing picked)."""
        x, extras = self.backbone.embed(images), None
        if self.vpt == "shallow":
            prompt = jnp.broadcast_to(self.vpt_prompt.astype(x.dtype),
                                      (x.shape[0],) + self.vpt_prompt.shape)
            x = jnp.concatenate([x, prompt], axis=1)
        elif self.vpt == "deep":
            extras = {i: self.vpt_prompt[i] for i in range(self.backbone.depth)}
        feature = self.backbone.encode_features(x, 0, extras)
        return dict(logits=self.head(feature), match=jnp.zeros((), jnp.float32),
                    indices=jnp.zeros((images.shape[0], 0), jnp.int32), query=feature)

    def __call__(self, images, train: bool = False):
        return self.classify(images, train)
