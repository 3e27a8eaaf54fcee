"""The cosine head's start from the training data (`model.head_init='class_mean'`, LIFT's
default for in21k-style backbones): column c is the normalised mean of the frozen backbone's
features of class c's training images, seen as evaluation sees images (resize, centre crop).

The features are the plain backbone's: no prompt, no block tuner (LIFT: `use_tuner=False`),
so every method starting from this head starts from the same one.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from absl import logging

from lpt_jax import data, parallel, tree
from lpt_jax.errors import DataError


def _features(module, images):
    return module.encode_features(module.embed(images))


def plain_backbone(backbone, params: dict):
    """(the backbone without a method's block tuner, its params without the tuner's)."""
    if not getattr(backbone, "block_tuner", None):
        return backbone, params
    added = tuple(backbone.initialised_params)
    flat = {k: v for k, v in tree.flatten(params).items() if not tree.matches(k, added)}
    return backbone.clone(block_tuner=None), tree.unflatten(flat)


def class_mean_kernel(config, source, backbone, backbone_params: dict, mesh) -> np.ndarray:
    """(D, C) float32: unit columns, the class means of the training features."""
    start = time.perf_counter()
    module, params = plain_backbone(backbone, backbone_params)
    rep = parallel.replicated(mesh)
    features = jax.jit(lambda p, x: module.apply({"params": p}, x, method=_features),
                       in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=rep)
    params = jax.device_put(params, rep)
    sums, counts = None, np.zeros(source.num_classes, np.int64)
    stream = data.make_eval_stream(source, config.data, split="train",
                                   batch_size=config.eval.batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
    with contextlib.closing(stream):
        for batch in stream:
            f = np.asarray(features(params, parallel.global_batch(batch["image"], mesh)),
                           np.float64)
            mask, label = (np.asarray(parallel.gather(parallel.global_batch(batch[k], mesh)))
                           for k in ("mask", "label"))
            if sums is None:
                sums = np.zeros((source.num_classes, f.shape[-1]), np.float64)
            np.add.at(sums, label[mask], f[mask])
            counts += np.bincount(label[mask], minlength=source.num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"model.head_init='class_mean': class {source.class_names[empty[0]]!r} "
                        "has no readable training image to average")
    means = sums / counts[:, None]
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    logging.info("head: class means of %d training images (%.1f s)", int(counts.sum()),
                 time.perf_counter() - start)
    return means.T.astype(np.float32)

