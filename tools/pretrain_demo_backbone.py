#!/usr/bin/env python3
"""Pretrains the demo's small ViT on the CIFAR-10 classes the demo does not use.

    python tools/pretrain_demo_backbone.py                   # -> demo/vit_cifar4_w128d6.npz
    python tools/pretrain_demo_backbone.py --epochs=2 --out=/tmp/vit.npz   # a CPU-sized run

The shipped checkpoint took 215 s on one H100 (300 epochs). On the project's shared 2-core
CPU the same model trains at roughly 30 images/s (measured under load), about 10 minutes per
epoch over the 20,000 images, so a CPU run must use far fewer epochs (a weaker backbone).

Standard supervised training from scratch, with its own augmentation: random resized crop
(area 25-100 %), horizontal flip and mixup, label smoothing, AdamW with warm-up and cosine
decay. The classes (airplane, automobile, bird, cat) are disjoint from the demo's long-tailed
target classes (tools/make_demo_data.py). The result is written in the real big_vision npz
layout (`lpt_jax.backbone.save_big_vision_npz`, with its 4-way head, which LPT ignores), by
default with bfloat16 storage, so the demo loads it exactly as it would load a released
checkpoint. A JSON file beside it records the settings, the machine and the test accuracy.

Needs only jax, flax, optax, numpy and pillow (no TensorFlow): the whole input pipeline
lives on the device, so the same script runs on a laptop CPU and on an accelerator.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import optax  # noqa: E402
from PIL import Image  # noqa: E402

from lpt_jax.backbones.vit import ViT  # noqa: E402
from lpt_jax.backbones.vit_weights import save_big_vision_npz  # noqa: E402

DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "images" / "cifar10-jpg.tar.gz"
DEFAULT_OUT = REPO / "demo" / "vit_cifar4_w128d6.npz"
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat")


# ------------------------------------------------------------------------------------------
# Data: decoded once into uint8 arrays.

def load_split(archive: str, split: str, classes) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int32 (N,)) of `split/<class>/*.jpg` members."""
    ids = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.strip("./").split("/")
            if m.isfile() and len(parts) == 3 and parts[0] == split and parts[1] in ids:
                img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                images.append(np.asarray(img, np.uint8))
                labels.append(ids[parts[1]])
    if not images:
        raise SystemExit(f"{archive}: no {split}/<class>/*.jpg for classes {list(classes)}")
    return np.stack(images), np.asarray(labels, np.int32)


# ------------------------------------------------------------------------------------------
# Augmentation on the device (pure functions of an rng).

def to_unit_range(images):
    return images.astype(jnp.float32) / 127.5 - 1.0


def random_resized_crop(rng, image, min_area: float, size: int):
    """One image (H, W, 3) float -> a random crop of area [min_area, 1] and aspect ratio in
    [3/4, 4/3], bilinearly resized to (size, size)."""
    h, w = image.shape[:2]
    k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
    area = jax.random.uniform(k_area, (), minval=min_area, maxval=1.0)
    log_ratio = jax.random.uniform(k_ratio, (), minval=np.log(3 / 4), maxval=np.log(4 / 3))
    ratio = jnp.exp(log_ratio)
    ch = jnp.minimum(h * jnp.sqrt(area / ratio), h)
    cw = jnp.minimum(w * jnp.sqrt(area * ratio), w)
    top = jax.random.uniform(k_top, ()) * (h - ch)
    left = jax.random.uniform(k_left, ()) * (w - cw)
    scale = jnp.stack([size / ch, size / cw])
    return jax.image.scale_and_translate(
        image, (size, size, 3), (0, 1), scale, -jnp.stack([top, left]) * scale,
        method="linear", antialias=True)


def augment(rng, images, labels, num_classes: int, *, min_area: float, mixup_alpha: float,
            label_smoothing: float):
    """uint8 batch -> (float images in [-1, 1], soft targets)."""
    b, size = images.shape[0], images.shape[1]
    k_crop, k_flip, k_mix = jax.random.split(rng, 3)
    x = to_unit_range(images)
    x = jax.vmap(lambda k, im: random_resized_crop(k, im, min_area, size))(
        jax.random.split(k_crop, b), x)
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    y = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    if mixup_alpha > 0:  # mix each image with the batch rolled by one
        lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
        lam = jnp.maximum(lam, 1 - lam)
        x = lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)
        y = lam * y + (1 - lam) * jnp.roll(y, 1, axis=0)
    return jnp.clip(x, -1.0, 1.0), y


# ------------------------------------------------------------------------------------------
# Model and training.

def make_model(args, num_classes: int) -> ViT:
    # LayerNorm epsilon 1e-6 as big_vision trains; exact GELU.
    return ViT(num_classes=num_classes, image_size=(32, 32),
               patch_size=(args.patch_size, args.patch_size), width=args.width,
               depth=args.depth, mlp_dim=args.mlp_dim, num_heads=args.num_heads,
               pool_type="tok", layernorm_epsilon=1e-6, gelu_approximate=False)


def decay_mask(params):
    """Weight decay on matrices and conv kernels only (not biases, norms, pos/cls)."""
    def rule(path, leaf):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        return leaf.ndim >= 2 and name not in ("pos_embedding", "cls")
    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(args, steps_per_epoch: int):
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_epochs * steps_per_epoch, total // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, total, end_value=0.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.999,
                                 weight_decay=args.weight_decay, mask=decay_mask))
    return tx, schedule


def make_train_step(model, tx, num_classes, args):
    def loss_fn(params, x, y):
        logits, _ = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy(logits, y).mean()

    @jax.jit
    def step(params, opt_state, all_images, all_labels, idx, rng):
        x, y = augment(rng, all_images[idx], all_labels[idx], num_classes,
                       min_area=args.min_area, mixup_alpha=args.mixup_alpha,
                       label_smoothing=args.label_smoothing)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_predict(model):
    @jax.jit
    def predict(params, images):
        return jnp.argmax(model.apply({"params": params}, to_unit_range(images))[0], -1)
    return predict


def accuracy(predict, params, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        correct += int(jnp.sum(predict(params, images[i:i + batch]) == labels[i:i + batch]))
    return 100.0 * correct / len(images)


def as_stored(params, store: str):
    """The parameters as the npz will hold them (bf16 rounding, if asked) and back in fp32."""
    if store == "float32":
        return jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return jax.tree.map(lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), params)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=str(DEFAULT_ARCHIVE))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--classes", default=",".join(PRETRAIN_CLASSES))
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--mlp_dim", type=int, default=512)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup_epochs", type=int, default=5)
    p.add_argument("--min_area", type=float, default=0.25)
    p.add_argument("--mixup_alpha", type=float, default=0.2)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--store", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--eval_every_epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    classes = tuple(args.classes.split(","))
    t0 = time.time()
    train_x, train_y = load_split(args.archive, "train", classes)
    test_x, test_y = load_split(args.archive, "test", classes)
    print(f"data: {len(train_x)} train / {len(test_x)} test images of {classes} "
          f"({time.time() - t0:.0f} s)", flush=True)

    model = make_model(args, len(classes))
    rng = jax.random.PRNGKey(args.seed)
    rng, init_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, 32, 32, 3)))["params"]
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    steps_per_epoch = len(train_x) // args.batch_size
    tx, schedule = make_optimizer(args, steps_per_epoch)
    opt_state = tx.init(params)
    step = make_train_step(model, tx, len(classes), args)
    predict = make_predict(model)
    dev_x, dev_y = jax.device_put(train_x), jax.device_put(train_y)
    print(f"model: {n_params:,} params; {args.epochs} epochs x {steps_per_epoch} steps of "
          f"{args.batch_size} on {jax.devices()[0].device_kind}", flush=True)

    order_rng = np.random.default_rng(args.seed)
    t_train = time.time()
    history = []
    for epoch in range(args.epochs):
        order = order_rng.permutation(len(train_x))
        losses = []
        for s in range(steps_per_epoch):
            idx = jnp.asarray(order[s * args.batch_size:(s + 1) * args.batch_size])
            rng, k = jax.random.split(rng)
            params, opt_state, loss = step(params, opt_state, dev_x, dev_y, idx, k)
            losses.append(loss)
        loss = float(np.mean(jax.device_get(losses)))
        last = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every_epochs == 0 or last or epoch == 0:
            acc = accuracy(predict, params, test_x, test_y)
            history.append({"epoch": epoch + 1, "loss": round(loss, 4), "test_acc": acc})
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  test acc {acc:.2f} %  "
                  f"({time.time() - t_train:.0f} s)", flush=True)
    train_seconds = time.time() - t_train

    stored = as_stored(jax.device_get(params), args.store)
    acc_fp32 = accuracy(predict, jax.device_get(params), test_x, test_y)
    acc_stored = accuracy(predict, jax.tree.map(lambda a: np.asarray(a, np.float32), stored),
                          test_x, test_y)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_big_vision_npz(str(out), stored)
    meta = {
        "what": "ViT pretrained from scratch by tools/pretrain_demo_backbone.py on the CIFAR-10 "
                "classes disjoint from the demo's target classes; big_vision npz layout",
        "classes": list(classes),
        "model": {"width": args.width, "depth": args.depth, "num_heads": args.num_heads,
                  "mlp_dim": args.mlp_dim, "patch_size": args.patch_size, "image_size": 32,
                  "pool_type": "tok", "layernorm_epsilon": 1e-6, "gelu": "exact",
                  "head": f"{len(classes)}-way (ignored by LPT)"},
        "params": n_params,
        "storage_dtype": args.store,
        "settings": {k: v for k, v in vars(args).items() if k not in ("archive", "out")},
        "train_images": int(len(train_x)),
        "test_images": int(len(test_x)),
        "test_accuracy_fp32": round(acc_fp32, 2),
        "test_accuracy_stored": round(acc_stored, 2),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "npz_bytes": out.stat().st_size,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.store}); test accuracy "
          f"{acc_fp32:.2f} % (fp32), {acc_stored:.2f} % (as stored); "
          f"{train_seconds:.0f} s of training", flush=True)


if __name__ == "__main__":
    main()
