"""Opening TFDS datasets without surprises: no download unless asked, clear errors."""

import numpy as np

from lpt_jax.data._tf import tf  # noqa: F401  (hides the accelerators before TFDS loads TF)
from lpt_jax.data.errors import DataError

import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=wrong-import-order


def _where(cfg) -> str:
    return cfg.tfds_data_dir or (
        "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")


def not_available(cfg, name: str, split: str, err: Exception) -> DataError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DataError(
        f"TFDS dataset {name!r} (split {split!r}) is not readable from {_where(cfg)}: {first}. "
        f"Prepare it once with `tfds build {name} --data_dir=<dir>` and set data.tfds_data_dir, "
        "or set data.download=True")


def load_numpy(cfg, name: str, split: str, keys: tuple) -> dict:
    """A whole (small) TFDS split as numpy arrays {key: (n, ...)}, in stored order."""
    try:
        ds, info = tfds.load(name, split=split, data_dir=cfg.tfds_data_dir or None,
                             download=bool(cfg.download), with_info=True, shuffle_files=False)
    except Exception as e:  # TFDS raises several types for "not prepared"
        raise not_available(cfg, name, split, e) from e
    parts = {k: [] for k in keys}
    for batch in ds.batch(4096).as_numpy_iterator():
        for k in keys:
            parts[k].append(batch[k])
    out = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
    out["_info"] = info
    return out
