"""A tiny, self-contained LPT run for the trainer tests: synthetic long-tailed image folder,
a random ViT written in big_vision layout, and a config that trains in seconds."""

import jax
import jax.numpy as jnp

from configs.common import base_config
from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT

from helpers import TINY_VIT, make_image_folder, vit_kwargs


def make_backbone(path, seed=0, **overrides):
    """A random ViT (TINY_VIT with `overrides`) saved in big_vision layout."""
    vit = dict(TINY_VIT, **overrides)
    model = ViT(num_classes=None, **vit_kwargs(vit))
    size = vit["image_size"]
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    vit_weights.save_big_vision_npz(str(path), params)
    return str(path)


def tiny_config(tmp_path, *, epochs=2, batch_size=8):
    root = tmp_path / "data"
    if not root.exists():
        make_image_folder(root)
    ckpt = tmp_path / "vit.npz"
    if not ckpt.exists():
        make_backbone(ckpt)
    c = base_config()
    c.model.vit = dict(TINY_VIT)
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


def assert_mixed_batch_matches_single_tasks(config, workdir, paths, order, images):
    """Serving: `images` scored in one mixed batch of the exports `paths` ({task: path}; row i
    is task `order[i]`'s) equal each export's own single-task prediction of its rows."""
    import numpy as np

    from lpt_jax import parallel
    from lpt_jax.run import inference
    from lpt_jax.serving import MultiTaskPredictor
    predictor = MultiTaskPredictor.from_exports(config.backbone.checkpoint, paths, batch_size=8)
    mixed = predictor.scores(images, order).logits
    ctx = inference.build_context(config, workdir, trained_head=True)
    mesh = parallel.make_mesh(jax.devices()[:1])
    for task, path in paths.items():
        params, phase = inference.load_trained(ctx, path)
        predict = inference.make_predict_fn(ctx.model, phase, mesh)
        rows = [i for i, t in enumerate(order) if t == task]
        single, _ = predict(inference.place_params(ctx.model, params, mesh),
                            jnp.asarray(images[rows]))
        np.testing.assert_allclose(mixed[rows], np.asarray(single), atol=2e-5, err_msg=task)
