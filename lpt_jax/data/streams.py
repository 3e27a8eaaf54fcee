"""The training stream (dual sampling): per step a class-balanced and an instance-balanced
batch, as tf.data. Augmentation is seeded by (seed, stream, global slot), so an image's pixels
do not depend on how many processes share the batch or where the stream was resumed."""

import logging

import numpy as np

from lpt_jax.data import pipeline, preprocess
from lpt_jax.data._tf import tf
from lpt_jax.data.sampling import DualSampler, process_slice
from lpt_jax.errors import DataError

log = logging.getLogger(__name__)

_MAX_STEPS = 2**62
_CB, _IB = 0, 1  # stream ids mixed into augmentation seeds


class TrainStream:
    """Iterator of dual-sampling batches: {'cb': {image, label}, 'ib': {image, label}}, or
    of the `streams` a method reads alone (LIFT: 'ib'), the others neither read nor decoded;
    a stream's images and augmentations are the same whether the other is made or not.

    `step` is the index of the next batch; a stream made with `start_step=k`
    yields exactly batch k of a fresh stream, in O(1).

    `close()` (or leaving a `with` block) stops the tf.data pipeline's threads now; call it
    when done, as the trainer does at the end of a phase. Dropping the last reference does
    the same. A closed stream may still be iterated: it restarts its pipeline at `step`
    and yields the same batches it would have.
    """

    def __init__(self, src, cfg, global_batch_size: int, seed: int = 0, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 streams: tuple[str, ...] = ("cb", "ib")):
        if not streams or set(streams) - {"cb", "ib"}:
            raise ValueError(f"streams={streams!r}: expected 'cb' and/or 'ib'")
        self.streams = tuple(s for s in ("cb", "ib") if s in streams)
        k = int(cfg.cb_images_per_class)
        self._slice = process_slice(global_batch_size, process_index, process_count, multiple_of=k)
        self._split = src.split("train")
        self._store = self._split.store
        self._labels = self._split.labels
        self._cfg = cfg
        self.sampler = DualSampler(self._labels, src.num_classes, global_batch_size, seed, k,
                                   ib_sampling=cfg.ib_sampling)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.step = int(start_step)
        self._substitute = np.arange(len(self._labels), dtype=np.int64)  # skip mode remap
        self._bad: set = set()
        self._iterator = None

    # Index plan ------------------------------------------------------------
    def local_indices(self, step: int) -> tuple[np.ndarray, ...]:
        """This process's example indices of `step`, one array per stream (class-balanced,
        instance-balanced)."""
        draw = {"cb": self.sampler.class_balanced, "ib": self.sampler.instance_balanced}
        return tuple(self._substitute[draw[s](step)[self._slice]] for s in self.streams)

    def _plan(self, step: int):
        idx = np.concatenate(self.local_indices(step))
        slots = step * self.global_batch_size + np.arange(self._slice.start, self._slice.stop)
        ids = {"cb": _CB, "ib": _IB}
        seeds = np.stack([
            np.concatenate([np.full_like(slots, self.seed * 2 + ids[s]) for s in self.streams]),
            np.concatenate([slots] * len(self.streams))], axis=1).astype(np.int64)
        return idx, self._labels[idx].astype(np.int32), seeds, self._store.fetch(idx)

    # tf.data ---------------------------------------------------------------
    @property
    def _one(self):
        """One image's decoding and augmentation; a function that does not hold the stream
        (the pipeline keeps it, and the stream keeps the pipeline)."""
        kind, size = self._store.kind, int(self._cfg.image_size)
        antialias, fast = bool(self._cfg.antialias), bool(self._cfg.jpeg_fast_crop)

        def one(payload, label, seed):
            return preprocess.train_image(payload, kind, seed, size, antialias, fast), label
        return one

    def dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The stream from `start_step` as a tf.data.Dataset (infinite); it keeps this
        stream alive while it is used."""
        ds = self._dataset(start_step)
        ds._lpt_stream = self  # pylint: disable=protected-access  (the plan holds it weakly)
        return ds

    def _dataset(self, start_step: int) -> tf.data.Dataset:
        b, streams = self.local_batch_size, self.streams  # locals: `split` must not hold self
        n = len(streams) * b
        plan_tf = pipeline.numpy_plan(pipeline.weak_plan(self), self._store, n,
                              tf.int64, [n, 2])  # labels, per-image augmentation seeds

        def split(images, labels):
            return {s: {"image": images[i * b:(i + 1) * b], "label": labels[i * b:(i + 1) * b]}
                    for i, s in enumerate(streams)}

        return pipeline.decoded_batches(tf.data.Dataset.range(start_step, _MAX_STEPS).map(plan_tf),
                                self._one, n, split, self._cfg)

    # Iteration -------------------------------------------------------------
    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the tf.data pipeline (its prefetch and decode threads) now. Idempotent."""
        self._iterator = None

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self._iterator = self._dataset(self.step).as_numpy_iterator()
            try:
                batch = next(self._iterator)
            except tf.errors.OpError as e:
                self._iterator = None
                self._handle_unreadable(e)  # raises, or blocks the bad images and retries
                continue
            self.step += 1
            return batch

    def _handle_unreadable(self, err: Exception) -> None:
        idx, labels, seeds, payload = self._plan(self.step)
        one = tf.function(self._one)
        bad, checked = pipeline.find_unreadable(
            idx, lambda p: one(tf.constant(payload[p]), tf.constant(labels[p]),
                               tf.constant(seeds[p])))
        if not bad:
            raise err
        if self._cfg.corrupt_images != "skip":
            raise pipeline.unreadable_error(self._store, "train", bad, checked) from err
        for i, msg in bad:
            self._bad.add(i)
            log.warning("skipping unreadable training image %s (%d skipped so far, "
                        "data.corrupt_images='skip'): %s", self._store.describe(i),
                        len(self._bad), msg)
        self._substitute = _same_class_substitutes(self._labels, self._bad, self._store.describe)

    @property
    def num_skipped(self) -> int:
        """Unreadable training images found so far (skip mode); their draws take a substitute
        of the same class."""
        return len(self._bad)


def _same_class_substitutes(labels: np.ndarray, bad: set, describe=str) -> np.ndarray:
    """Identity map except bad images -> the next readable image of their class."""
    sub = np.arange(len(labels), dtype=np.int64)
    for i in sorted(bad):
        members = np.flatnonzero(labels == labels[i])
        good = np.array([m for m in members if int(m) not in bad], dtype=np.int64)
        if not good.size:
            raise DataError(
                f"every training image of class {int(labels[i])} is unreadable, e.g. "
                f"{describe(i)}; a class needs at least one readable image (check data.root)")
        later = good[good > i]
        sub[i] = later[0] if later.size else good[0]
    return sub


def make_train_stream(src, cfg, global_batch_size: int, seed: int = 0, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      streams: tuple[str, ...] = ("cb", "ib")) -> TrainStream:
    """Dual-sampling training stream (or the `streams` of it a method reads); see
    `TrainStream`."""
    return TrainStream(src, cfg, global_batch_size, seed, start_step, process_index, process_count,
                       streams)
