"""Shared defaults of every LPT config (docs/spec.md); dataset configs override a few fields.

Every field can be overridden on the command line, e.g. `--config.phase1.epochs=5`; every
section is a ConfigDict, so an override is type-checked against the default's type.

Loading a config imports no TensorFlow (tests/test_configs.py checks it): the data defaults
come from the TF-free `lpt_jax.data.config`, the loss and trainable-parameter defaults from
`lpt_jax.losses` and `lpt_jax.models.lpt` (JAX only), so each constant has one home.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lpt_jax.backbones.vit import VARIANTS as VIT_VARIANTS
from lpt_jax.data.config import default_config as data_defaults
from lpt_jax.method.losses import agcl_branch_defaults
from lpt_jax.method.lpt import TRAINABLE

ConfigDict = ml_collections.ConfigDict

AUGREG_B16_IN21K = ("gs://vit_models/augreg/"
                    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")


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
    c.model.lpt.shared_depth = VIT_VARIANTS[variant.split("/")[0]][1] // 2
    c.backbone.checkpoint = SIGLIP_DIR + file
    c.backbone.subtree = "img"
    c.data.image_size = res
    c.data.resize_size = res * 256 // 224   # the release's 256/224 resize-then-crop ratio
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    # The frozen backbone: the module lpt_jax.models.<backbone>, configured by model.<backbone>.
    c.model.backbone = "vit"
    # The frozen ViT (§1): ViT-B/16, class token, LayerNorm eps 1e-5, exact GELU. `variant`
    # sets width/depth/mlp_dim/num_heads/patch_size; with variant=None they are set one by one.
    c.model.vit = ConfigDict(dict(
        variant="B/16", width=placeholder(int), depth=placeholder(int),
        num_heads=placeholder(int), mlp_dim=placeholder(int), patch_size=placeholder(int),
        image_size=224, pool_type="tok", representation_size=0, layernorm_epsilon=1e-5,
        gelu_approximate=False, dtype="float32", remat=False,
        # How attention is computed (the same function; only float rounding differs): 'einsum'
        # (explicit softmax, heads leading: fastest on CPU), 'xla' or 'cudnn'
        # (jax.nn.dot_product_attention); 'auto' = 'einsum' on CPU, 'xla' elsewhere.
        attention="auto"))
    # Prompts, pool and head (§2).
    c.model.lpt = ConfigDict(dict(
        prompt_length=10, pool_size=20, shared_depth=6, top_k=2, head_dropout=0.1,
        prompt_init_std=0.02, prompt_position="append"))
    # The cosine head's start: 'random' (unit columns, §2) or 'text' (class-name prompts
    # embedded by the two-tower model's text tower, model.text; docs/siglip.md).
    c.model.head_init = "random"
    # The SigLIP text tower (lpt_jax.models.siglip_text), read only for head_init='text'.
    # `variant` sets width/depth/mlp_dim/num_heads (big_vision names: B, L, So400m, ...);
    # `checkpoint` '' = the backbone's two-tower file; `templates` are averaged ('{}' = the
    # class name); pad_id -1 = pad with the end token (SigLIP's "sticky" EOS).
    c.model.text = ConfigDict(dict(
        variant="B", width=placeholder(int), depth=placeholder(int),
        num_heads=placeholder(int), mlp_dim=placeholder(int), vocab_size=32_000, max_len=64,
        embed_dim=placeholder(int), pool_type="last", layernorm_epsilon=1e-6,
        gelu_approximate=True, dtype="float32", tokenizer="", checkpoint="", subtree="txt",
        templates=("a photo of a {}.",), pad_id=-1, lower=True, batch_size=64))

    c.backbone = ConfigDict()
    c.backbone.checkpoint = AUGREG_B16_IN21K
    c.backbone.subtree = ""   # a tower of a two-tower file (SigLIP: 'img'); '' = the whole file
    c.backbone.ignore = ("head/.*", "pre_logits/.*")  # checkpoint arrays we do not use
    c.backbone.dont_load = ()                          # model params that keep their init

    c.data = data_defaults()

    # A-GCL per branch (§3); `name` picks the loss from lpt_jax.losses.LOSSES.
    c.loss = ConfigDict()
    branch = dict(scale=20.0, margin=0.1, cloud_weight=0.5, cloud_std=1 / 3,
                  label_smoothing=0.1)
    gammas = agcl_branch_defaults()
    c.loss.cb = ConfigDict(dict(name="agcl", **branch, **gammas["cb"]))
    c.loss.ib = ConfigDict(dict(name="agcl", **branch, **gammas["ib"]))
    c.loss.match_weight = 0.5       # L = loss_cb - w*S_cb + eta_e*(loss_ib - w*S_ib)
    c.loss.dual_sampling = True     # False: only the instance-balanced batch, weight 1

    # SGD (§5): coupled weight decay, lr = base_lr * B / 256, epoch 0 at warmup_lr.
    c.optim = ConfigDict(dict(base_lr=0.02, lr_reference_batch=256, momentum=0.9,
                              weight_decay=0.01, warmup_lr=1e-6, warmup_epochs=1))

    # Per phase: batch is per stream (a step sees 2 x batch_size images).
    # `trainable`: regexes over parameter paths (default lpt_jax.models.lpt.TRAINABLE), e.g.
    # ('head/.*',) for a linear probe.
    c.phase1 = ConfigDict(dict(epochs=10, batch_size=256, trainable=TRAINABLE[1]))
    c.phase2 = ConfigDict(dict(epochs=10, batch_size=256, trainable=TRAINABLE[2]))

    c.train = ConfigDict()
    c.train.phases = "1,2"              # '1', '2' or '1,2'
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 3
    c.train.max_steps = 0               # >0: stop each phase early (smoke tests)
    c.train.on_nonfinite = "stop"       # 'stop' | 'skip' (skip the update and count it)
    c.train.stop_after_steps = 0        # >0: save and stop this invocation after N steps
    c.train.num_devices = 0             # 0: all devices; n: the first n (tests, debugging)
    c.train.phase1_export = ""          # phase 2 alone: phase 1's export.npz ('' = workdir's)
    c.train.allow_config_change = False # resume a workdir whose run had another config

    c.eval = ConfigDict()
    c.eval.batch_size = 256
    c.eval.every_epochs = 0             # >0: validation accuracy during training
    c.eval.final_split = "test"         # the table's split; model selection never uses it
    c.eval.max_examples = 0             # >0: evaluate on a prefix (smoke tests)
    c.eval.plot = True
    c.eval.allow_other_class_names = False  # eval/predict an export on other classes

    c.predict = ConfigDict(dict(top_k=5, batch_size=64))
    return c
