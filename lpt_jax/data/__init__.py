"""Long-tailed data pipelines: dataset registry, dual-sampling and eval streams.

    from lpt_jax import data
    cfg = data.default_config()
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, global_batch_size=256, seed=0)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# TF only feeds the input pipeline: keep it off the accelerators JAX owns.
for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass

# Importing the dataset modules registers their sources.
from lpt_jax.data import cifar_lt, image_folder, inaturalist, list_datasets  # noqa: E402,F401
from lpt_jax.data.config import default_config  # noqa: E402
from lpt_jax.data.errors import DataError  # noqa: E402
from lpt_jax.data.groups import (GROUP_NAMES, cifar_lt_counts, shot_groups,  # noqa: E402
                                 steps_per_epoch)
from lpt_jax.data.sampling import DualSampler  # noqa: E402
from lpt_jax.data.source import Source, SplitData, get_source, registered_sources  # noqa: E402
from lpt_jax.data.streams import (EvalStream, TrainStream, load_image_files,  # noqa: E402
                                  make_eval_stream, make_train_stream, num_eval_examples)

__all__ = [
    "DataError", "DualSampler", "EvalStream", "GROUP_NAMES", "Source", "SplitData",
    "TrainStream", "cifar_lt_counts", "default_config", "get_source", "load_image_files",
    "make_eval_stream", "make_train_stream", "num_eval_examples", "registered_sources",
    "shot_groups", "steps_per_epoch",
]
