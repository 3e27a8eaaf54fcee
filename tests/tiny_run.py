"""A tiny, self-contained LPT run for the trainer tests: synthetic long-tailed image folder,
a random ViT written in big_vision layout, and a config that trains in seconds."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs.common import base_config
from lpt_jax import backbone
from lpt_jax.models.vit import ViT

VIT = dict(variant=None, width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8, image_size=32,
           pool_type="tok", representation_size=0, layernorm_epsilon=1e-5,
           gelu_approximate=False, dtype="float32", remat=False)
TRAIN_COUNTS = (24, 12, 6, 3)
COLORS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))


def make_image_folder(root, counts=TRAIN_COUNTS, eval_per_class=4, seed=0):
    """Noisy colour patches: learnable, so the loss has somewhere to go."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", counts), ("val", [eval_per_class] * len(counts)),
                             ("test", [eval_per_class] * len(counts))):
        for c, n in enumerate(per_class):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.array(COLORS[c % len(COLORS)])[None, None] + rng.normal(0, 50, (36, 36, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f"{d}/{i}.png")
    return str(root)


def make_backbone(path, seed=0, **overrides):
    vit = dict(VIT, **overrides)
    model = ViT(num_classes=None, image_size=(vit["image_size"],) * 2,
                patch_size=(vit["patch_size"],) * 2, width=vit["width"], depth=vit["depth"],
                num_heads=vit["num_heads"], mlp_dim=vit["mlp_dim"])
    size = vit["image_size"]
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    backbone.save_big_vision_npz(str(path), params)
    return str(path)


def tiny_config(tmp_path, *, epochs=2, batch_size=8):
    root = tmp_path / "data"
    if not root.exists():
        make_image_folder(root)
    ckpt = tmp_path / "vit.npz"
    if not ckpt.exists():
        make_backbone(ckpt)
    c = base_config()
    c.model.vit = dict(VIT)
    c.model.lpt.shared_depth = 2
    c.model.lpt.pool_size = 5
    c.backbone.checkpoint = str(ckpt)
    c.data.name = "image_folder"
    c.data.root = str(root)
    c.data.image_size = 32
    c.data.resize_size = 36
    c.phase1.epochs = c.phase2.epochs = epochs
    c.phase1.batch_size = c.phase2.batch_size = batch_size
    c.eval.batch_size = 8
    c.eval.plot = True
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 3
    return c


def multiprocess_config(tmp_path):
    """The config that test_multiprocess runs on 2x4 and on 1x8 devices."""
    c = tiny_config(tmp_path, epochs=1, batch_size=8)
    c.train.max_steps = 3
    c.optim.warmup_epochs = 0
    c.optim.base_lr = 5.0  # large steps, so that a difference would show
    c.eval.plot = False
    return c
