"""The base of every LPT config: every field at the default its declaration gives it
(docs/spec.md's constants; `python run.py --config=configs/places_lt.py --help_config` lists
each field with its value, what it accepts and what it means). Dataset configs override a few.

Every field can be overridden on the command line, e.g. `--config.phase1.epochs=5`; every
section is a ConfigDict, so an override is type-checked against the default's type.

The fields are declared where they are read (lpt_jax.config.schema lists where); loading a
config imports no TensorFlow (tests/test_configs.py checks it).
"""

import ml_collections

from lpt_jax.backbones.vit import VARIANTS as VIT_VARIANTS
from lpt_jax.config import schema

# big_vision's released SigLIP (WebLI, English) two-tower checkpoints, by config name:
# (image variant, resolution, file, text variant, text length), as in big_vision's SigLIP
# demo colab. Images enter at that resolution in [-1, 1] (value_range(-1, 1), as ours).
SIGLIP = {
    "siglip_b16": ("B/16", 224, "webli_en_b16_224_63724782.npz", "B", 64),
    "siglip_b16_256": ("B/16", 256, "webli_en_b16_256_60500360.npz", "B", 64),
    "siglip_b16_384": ("B/16", 384, "webli_en_b16_384_68578854.npz", "B", 64),
    "siglip_l16_256": ("L/16", 256, "webli_en_l16_256_60552751.npz", "L", 64),
    "siglip_l16_384": ("L/16", 384, "webli_en_l16_384_63634585.npz", "L", 64),
    "siglip_so400m": ("So400m/14", 224, "webli_en_so400m_224_57633886.npz", "So400m", 16),
    "siglip_so400m_384": ("So400m/14", 384, "webli_en_so400m_384_58765454.npz", "So400m", 64),
}
SIGLIP_DIR = "gs://big_vision/siglip/"
SIGLIP_TOKENIZER = "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"  # big_vision c4_en


def use_siglip(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Switches a config to the SigLIP image tower `name` (a key of SIGLIP): MAP pooling, no
    class token, tanh GELU, LayerNorm eps 1e-6 (SigLIP's numerics), its input size, the
    two-tower file's image subtree, and its text tower for `model.head_init='text'`."""
    variant, res, file, text_variant, text_len = SIGLIP[name]
    c.model.vit.update(dict(variant=variant, image_size=res, pool_type="map",
                            layernorm_epsilon=1e-6, gelu_approximate=True))
    c.model.text.update(dict(variant=text_variant, max_len=text_len, vocab_size=32_000,
                             tokenizer=SIGLIP_TOKENIZER))
    # K = L/2 as the spec's 6 of 12 (So400m: 13 of 27).
    if "lpt" in c.model:
        c.model.lpt.shared_depth = VIT_VARIANTS[variant.split("/")[0]][1] // 2
    c.backbone.checkpoint = SIGLIP_DIR + file
    c.backbone.subtree = "img"
    c.data.image_size = res
    c.data.resize_size = res * 256 // 224   # the release's 256/224 resize-then-crop ratio
    return c


def method_of(arg) -> tuple[str, list[str]]:
    """A config argument's method and its other parts: 'lift' or 'siglip_b16,lift' picks
    LIFT, anything else LPT (`configs/places_lt.py:lift`)."""
    parts = [p.strip() for p in str(arg or "").split(",") if p.strip()]
    method = "lift" if "lift" in parts else "lpt"
    return method, [p for p in parts if p != "lift"]


def use_lift_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """LIFT's published recipe (spec §9): one phase of 10 epochs at batch 128, SGD momentum
    0.9, lr 0.01 (not scaled with the batch), weight decay 5e-4, cosine decay without
    warm-up, instance-balanced batches, the head from the class means of the training
    features; the backbone's LayerNorm eps as LIFT's timm ViT."""
    c.phase1.update(dict(epochs=10, batch_size=128))
    c.optim.update(dict(base_lr=0.01, lr_reference_batch=c.phase1.batch_size, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=0))
    c.model.head_init = "class_mean"
    # LIFT runs the in21k ViT-B/16 as timm builds it: LayerNorm eps 1e-6 (LPT's release: 1e-5).
    c.model.vit.layernorm_epsilon = 1e-6
    return c


def base_config(method: str = "lpt", backbone: str = "vit") -> ml_collections.ConfigDict:
    """Every field of a run of `method` on `backbone` at its declared default: LPT on the
    AugReg ViT-B/16 in21k, Places-LT's data settings."""
    return schema.defaults(method, backbone)
