"""TensorFlow for the input pipeline, kept off the accelerators JAX owns.

Every data module that uses TensorFlow (or TFDS) imports it from here,

    from lpt_jax.data._tf import tf

so the GPUs / TPUs are hidden from TF before TF first runs anything, whichever data
module is imported first. `import lpt_jax.data` alone does not load TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass

__all__ = ["tf"]
