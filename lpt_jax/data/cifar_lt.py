"""CIFAR-10-LT / CIFAR-100-LT from TFDS, reproducing the reference subset exactly.

Reference (LDAM-DRW's IMBALANCECIFAR, used by LPT): seed NumPy's legacy global
RNG, then for classes 0..C-1 shuffle the indices of that class in original
file order and keep the first n_c. TFDS stores CIFAR shuffled but keeps the
original position in `id` ('train_00042'), which restores the file order.
"""

import numpy as np

from lpt_jax.data.groups import cifar_lt_counts
from lpt_jax.data.registry import register
from lpt_jax.data.source import Source, SplitData
from lpt_jax.data.stores import PixelStore
from lpt_jax.data.tfds_util import load_numpy
from lpt_jax.errors import DataError


def original_positions(ids) -> np.ndarray:
    """TFDS CIFAR ids ('train_00042') -> original file positions (42)."""
    try:
        return np.array([int(bytes(i).decode().rsplit("_", 1)[1]) for i in ids], dtype=np.int64)
    except (ValueError, IndexError):
        raise DataError(
            f"unexpected TFDS CIFAR id {ids[0]!r}; expected e.g. 'train_00042'") from None


def reference_subset(labels_in_file_order, counts, seed: int) -> np.ndarray:
    """File-order positions kept by the reference, class by class in its order."""
    rng = np.random.RandomState(seed)  # == np.random.seed(seed) + np.random.shuffle
    labels = np.asarray(labels_in_file_order)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept)


def _split_in_file_order(cfg, name: str, split: str) -> tuple:
    arrays = load_numpy(cfg, name, split, ("id", "image", "label"))
    pos = original_positions(arrays["id"])
    order = np.argsort(pos)
    if not np.array_equal(pos[order], np.arange(len(pos))):
        raise DataError(f"TFDS {name}[{split}] ids are not a permutation of 0..{len(pos) - 1}")
    info = arrays["_info"]
    names = [f"{name}[{split}] id {split}_{p:05d}" for p in range(len(pos))]
    return arrays["image"][order], arrays["label"][order].astype(np.int64), names, info


def _cifar_lt(cfg, default_tfds: str, num_classes: int) -> Source:
    name = cfg.tfds_name or default_tfds
    images, labels, names, info = _split_in_file_order(cfg, name, "train")
    counts = cifar_lt_counts(num_classes, cfg.imbalance_ratio)
    keep = reference_subset(labels, counts, cfg.cifar_lt_seed)
    test_images, test_labels, test_names, _ = _split_in_file_order(cfg, name, "test")
    class_names = tuple(info.features["label"].names)
    splits = {
        "train": SplitData(labels=labels[keep],
                           store=PixelStore(images[keep], [names[i] for i in keep])),
        "test": SplitData(labels=test_labels, store=PixelStore(test_images, test_names)),
    }
    return Source(name=f"{default_tfds}_lt", class_names=class_names, splits=splits,
                  origin=f"TFDS {name}, imbalance ratio {cfg.imbalance_ratio}, "
                         f"seed {cfg.cifar_lt_seed}")


@register("cifar100_lt")
def cifar100_lt(cfg) -> Source:
    return _cifar_lt(cfg, "cifar100", 100)


@register("cifar10_lt")
def cifar10_lt(cfg) -> Source:
    return _cifar_lt(cfg, "cifar10", 10)
