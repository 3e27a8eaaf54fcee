"""Helpers for tests and benchmarks: small image trees cut from real CIFAR-10 JPEGs, and
prepared-format stubs that carry a dataset's real split lists."""

import io
import json
import os
import tarfile

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def long_tail_counts(num_classes: int, n_max: int, n_min: int) -> list:
    """Exponential profile n_max -> n_min over the classes (as CIFAR-LT)."""
    r = n_min / n_max
    return [max(n_min, int(n_max * r ** (c / (num_classes - 1)))) for c in range(num_classes)]


def cifar10_tree(tar_path: str, out_dir: str, train_counts, eval_per_class: int = 0,
                 eval_split: str = "test", classes=CIFAR10_CLASSES) -> dict:
    """Extracts `train/<class>/*.jpg` (train_counts[c] files of class c) and
    `<eval_split>/<class>/*.jpg` (eval_per_class each) from the CIFAR-10 JPEG tarball.

    Files are the lowest-numbered ones of each class, so the tree is deterministic.
    Returns {relative path: class index} of the written files.
    """
    wanted = {}
    for c, name in enumerate(classes):
        for n in range(train_counts[c]):
            wanted[f"train/{name}/{n:04d}.jpg"] = c
        for n in range(eval_per_class):
            wanted[f"{eval_split}/{name}/{n:04d}.jpg"] = c
    src_name = {k: ("test" + k[len(eval_split):] if not k.startswith("train/") else k)
                for k in wanted}
    by_source = {v: k for k, v in src_name.items()}
    found = 0
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            dest = by_source.get(member.name)
            if dest is None:
                continue
            path = os.path.join(out_dir, dest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(tar.extractfile(member).read())
            found += 1
            if found == len(wanted):
                break
    if found != len(wanted):
        raise FileNotFoundError(f"only {found} of {len(wanted)} wanted files in {tar_path}")
    return wanted


def truncate_file(path: str, keep_bytes: int = 200) -> None:
    """Makes an image unreadable the way an interrupted copy does."""
    with open(path, "rb") as f:
        head = f.read(keep_bytes)
    with open(path, "wb") as f:
        f.write(head)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (h, w, 3) -> PNG bytes (lossless, for exact pixel tests)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def tiny_jpegs(n: int, size: int = 16, seed: int = 0) -> list:
    """`n` small flat-colour JPEGs (bytes), distinct colours, for stub datasets."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    out = []
    for colour in rng.integers(0, 256, size=(n, 3), dtype=np.uint8):
        buf = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(
            buf, format="JPEG", quality=75, optimize=True)  # ~290 bytes at 16x16
        out.append(buf.getvalue())
    return out


def write_prepared_stub(out_dir: str, name: str, class_names, lists: dict, images) -> dict:
    """A prepared directory for split lists whose image files are not at hand.

    Every entry of `lists` ({split: (relative paths, labels)}) becomes a record that keeps
    the list's path and label and holds `images[label % len(images)]`. Tests and benchmarks
    thus run a dataset's real list shapes (e.g. Places-LT's 106,300 entries) through the
    prepared-format reader without writing 100k files. Returns the manifest.
    """
    # pylint: disable=import-outside-toplevel
    from lpt_jax.data._tf import tf
    from lpt_jax.data.prepare import _example
    from lpt_jax.data.prepared import FORMAT_VERSION, MANIFEST
    from lpt_jax.storage import files

    files.makedirs(out_dir)
    manifest = {"format": FORMAT_VERSION, "name": name, "class_names": list(class_names),
                "origin": "stub images (lpt_jax.data.testing.write_prepared_stub)", "splits": {}}
    for split, (paths, labels) in lists.items():
        shard = f"{split}-00000.tfrecord"
        sizes = []
        with tf.io.TFRecordWriter(os.path.join(out_dir, shard)) as writer:
            for i, (path, label) in enumerate(zip(paths, labels)):
                image = images[int(label) % len(images)]
                writer.write(_example(image, int(label), i, str(path)))
                sizes.append(len(image))
        manifest["splits"][split] = {"files": [shard], "labels": [int(x) for x in labels],
                                     "num_bytes": sizes, "skipped": []}
    files.write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest))
    return manifest


def image_folder_config(root, **overrides):
    """A data config for a small `image_folder` tree at 32 px (tests and examples)."""
    from lpt_jax.data.config import default_config
    cfg = default_config()
    cfg.name, cfg.root, cfg.image_size, cfg.resize_size = "image_folder", str(root), 32, 36
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
