"""Shot groups and epoch length: pure functions of the training counts."""

import numpy as np

from lpt_jax.errors import DataError

GROUP_NAMES = ("many", "medium", "few")


def shot_groups(train_counts, rule: str = "release") -> dict[str, np.ndarray]:
    """Splits class ids into many / medium / few-shot groups.

    Parameters
    ----------
    train_counts : (C,) training images per class.
    rule : 'release' (LPT release: many > 100, medium 20 < n <= 100, few <= 20) or
      'oltr' (Liu et al. 2019: many > 100, medium 20 <= n <= 100, few < 20).

    Returns
    -------
    dict 'many' | 'medium' | 'few' -> sorted int64 class ids.
    """
    n = np.asarray(train_counts, dtype=np.int64)
    if rule == "release":
        few = n <= 20
    elif rule == "oltr":
        few = n < 20
    else:
        raise DataError(f"shot group rule {rule!r}; expected 'release' or 'oltr'")
    many = n > 100
    medium = ~many & ~few
    return {k: np.flatnonzero(m).astype(np.int64)
            for k, m in zip(GROUP_NAMES, (many, medium, few))}


def steps_per_epoch(num_train: int, global_batch: int) -> int:
    """floor(N / B) + 1, the reference's epoch length."""
    if global_batch <= 0:
        raise DataError(f"global batch size {global_batch} must be positive")
    return int(num_train) // int(global_batch) + 1


def cifar_lt_counts(num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Per-class counts of CIFAR-LT: int(n_max * r^(c / (C - 1))), r = 1 / ratio.

    Written with the same float operations as the reference (LDAM-DRW's
    IMBALANCECIFAR), so int() truncates exactly as it does.
    """
    if imbalance_ratio < 1:
        raise DataError(f"data.imbalance_ratio={imbalance_ratio} must be >= 1")
    img_max = 50000 / num_classes  # CIFAR's training images per class
    factor = 1.0 / imbalance_ratio
    return np.array([int(img_max * (factor ** (c / (num_classes - 1.0))))
                     for c in range(num_classes)], dtype=np.int64)
