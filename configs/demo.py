"""The CPU demo: both LPT phases on real long-tailed images in a few minutes.

    python run.py --config=configs/demo.py --workdir=/tmp/lpt_demo
    python run.py --config=configs/demo.py:lift --workdir=/tmp/lift_demo   (LIFT's recipe)

Everything it reads ships in the repository under demo/ (see demo/README.md):
  * demo/cifar10_lt6/: 6 CIFAR-10 classes (deer, dog, frog, horse, ship, truck) with
    400/200/90/45/20/10 training images (the release's groups: many 2 / medium 2 / few 2;
    the thresholds are the paper's, not scaled), 20 val and 200 test images per class;
  * demo/vit_cifar4_w128d6.npz: a ViT (width 128, depth 6, patch 4, 32 px) that
    tools/pretrain_demo_backbone.py trained on the other 4 CIFAR-10 classes, stored in the
    big_vision npz layout, so it goes through the same loader as a released checkpoint.

Scaled down from the paper's setting for a 2-core CPU: group prompts on the last 3 of 6
blocks, a pool of 10, batch 32 per stream, 5 + 5 epochs without the warm-up epoch, and a
learning rate scaled to the small batch (below). The loss, sampling, schedule shape and
evaluation are the full LPT ones.
"""

from pathlib import Path

from configs.common import base_config, method_of, use_lift_schedule
from lpt_jax.errors import ConfigError

# Resolved from this file, not the working directory.
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DATA_ROOT = DEMO_DIR / "cifar10_lt6"
BACKBONE = DEMO_DIR / "vit_cifar4_w128d6.npz"


def get_config(arg=None):
    method, rest = method_of(arg)
    if rest:
        raise ConfigError(f"configs/demo.py:{arg}: expected no argument or 'lift'")
    c = base_config(method)
    # The pretrained backbone's shape (demo/vit_cifar4_w128d6.json); the rest of model.vit
    # (class token, LayerNorm eps 1e-5, exact GELU: LPT's numerics, §1) is common's.
    c.model.vit.update(dict(variant=None, width=128, depth=6, num_heads=4, mlp_dim=512,
                            patch_size=4, image_size=32))
    if method == "lpt":
        c.model.lpt.shared_depth = 3  # K: the first half of the blocks, as 6 of 12 in ViT-B
        c.model.lpt.pool_size = 10
    c.backbone.checkpoint = str(BACKBONE)   # its 4-way head is dropped by backbone.ignore

    c.data.name = "image_folder"
    c.data.root = str(DATA_ROOT)
    c.data.image_size = 32
    c.data.resize_size = 32           # CIFAR is already 32 px: eval sees the whole image

    if method == "lift":  # LIFT's recipe at the demo's batch: 10 epochs, lr 0.01 unscaled
        use_lift_schedule(c)
        c.phase1.batch_size = 32
        c.optim.lr_reference_batch = 32  # (bottleneck: LIFT's rule, 1 for 6 classes, 6 blocks)
        c.model.vit.layernorm_epsilon = 1e-5  # the demo backbone's own numerics
    else:
        for phase in (c.phase1, c.phase2):
            phase.epochs = 5
            phase.batch_size = 32
        # lr = base_lr * 32 / 256: base 0.16 gives 0.02 at batch 32, the paper's lr at 256.
        c.optim.base_lr = 0.16
        # No 1e-6 warm-up epoch: in a 5-epoch phase it would be a fifth of the training.
        c.optim.warmup_epochs = 0

    c.train.log_every_steps = 12
    c.train.checkpoint_every_steps = 1000   # one checkpoint at the end of each phase
    c.eval.batch_size = 200
    return c
