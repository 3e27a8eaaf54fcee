"""tf.data training (dual sampling) and evaluation streams.

Per step, one `tf.numpy_function` computes the step's example indices (a pure
function of seed and step, see `sampling.py`) and fetches what the decoder
needs; the batch is then unbatched so that reading, decoding and augmentation
run per image in parallel TF threads, and batched again. Augmentation is
seeded by (seed, stream, global slot), so an image's pixels do not depend on
how many processes share the batch or where the stream was resumed.
"""

import logging
import math

import numpy as np

from lpt_jax.data import preprocess
from lpt_jax.data._tf import tf
from lpt_jax.data.errors import DataError, first_line
from lpt_jax.data.sampling import DualSampler, process_slice

log = logging.getLogger(__name__)

_MAX_STEPS = 2**62
_CB, _IB = 0, 1  # stream ids mixed into augmentation seeds


def _payload_signature(store, n: int):
    if store.kind == "pixels":
        return tf.uint8, [n, *store.pixel_shape]
    return tf.string, [n]


def _options(cfg) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.max_intra_op_parallelism = 1  # parallelism comes from tf.data, not inside ops
    threads = int(cfg.tf_threads)
    if threads > 0:  # e.g. the benchmark's per-core measurement
        opts.threading.private_threadpool_size = threads
    return opts


def _parallel(cfg):
    n = int(cfg.num_parallel_calls)
    return tf.data.AUTOTUNE if n < 0 else n


def _numpy_plan(plan, store, rows: int, extra_dtype, extra_shape):
    """A tf.data map of a plan index to the NumPy `plan`'s (labels, extra, payload) for
    `rows` examples, returned as (payload, labels, extra) with static shapes."""
    dtype, shape = _payload_signature(store, rows)

    def plan_tf(k):
        labels, extra, payload = tf.numpy_function(
            lambda k: plan(int(k)), [k], [tf.int32, extra_dtype, dtype], stateful=False)
        labels.set_shape([rows])
        extra.set_shape(extra_shape)
        payload.set_shape(shape)
        return payload, labels, extra
    return plan_tf


def _decoded_batches(plans: tf.data.Dataset, one, rows: int, finish, cfg) -> tf.data.Dataset:
    """Planned rows decoded in parallel (deterministic order), re-batched and finished."""
    ds = plans.unbatch().map(one, num_parallel_calls=_parallel(cfg), deterministic=True)
    ds = ds.batch(rows, drop_remainder=True).map(finish)
    return ds.prefetch(int(cfg.prefetch)).with_options(_options(cfg))


def _find_unreadable(indices, run_one) -> tuple[list, int]:
    """([(index, message)] of the images among `indices` that fail `run_one(position)`,
    number of distinct images checked)."""
    bad, seen = [], set()
    for pos, i in enumerate(indices):
        i = int(i)
        if i in seen:
            continue
        seen.add(i)
        try:
            run_one(pos)
        except (tf.errors.OpError, ValueError) as e:
            bad.append((i, first_line(e)))
    return bad, len(seen)


def _unreadable_error(store, split: str, bad: list, checked: int) -> DataError:
    i, msg = bad[0]
    if len(bad) == checked > 1:  # nothing readable: a wrong root or format, not one bad file
        return DataError(
            f"none of the {checked} images of a {split} batch can be read, e.g. "
            f"{store.describe(i)}: {msg}; check that data.root holds JPEG/PNG images")
    more = f" (and {len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
    return DataError(
        f"cannot read image {store.describe(i)} ({split} split, index {i}): {msg}{more}; "
        "fix or remove the file, or set data.corrupt_images='skip'")


class TrainStream:
    """Iterator of dual-sampling batches: {'cb': {image, label}, 'ib': {image, label}}.

    `step` is the index of the next batch; a stream made with `start_step=k`
    yields exactly batch k of a fresh stream, in O(1).
    """

    def __init__(self, src, cfg, global_batch_size: int, seed: int = 0, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1):
        k = int(cfg.cb_images_per_class)
        self._slice = process_slice(global_batch_size, process_index, process_count, multiple_of=k)
        self._split = src.split("train")
        self._store = self._split.store
        self._labels = self._split.labels
        self._cfg = cfg
        self.sampler = DualSampler(self._labels, src.num_classes, global_batch_size, seed, k)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.step = int(start_step)
        self._substitute = np.arange(len(self._labels), dtype=np.int64)  # skip mode remap
        self._bad: set = set()
        self._iterator = None

    # Index plan ------------------------------------------------------------
    def local_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's (class-balanced, instance-balanced) example indices of `step`."""
        cb = self.sampler.class_balanced(step)[self._slice]
        ib = self.sampler.instance_balanced(step)[self._slice]
        return self._substitute[cb], self._substitute[ib]

    def _plan(self, step: int):
        cb, ib = self.local_indices(step)
        idx = np.concatenate([cb, ib])
        slots = step * self.global_batch_size + np.arange(self._slice.start, self._slice.stop)
        seeds = np.stack([
            np.concatenate([np.full_like(slots, self.seed * 2 + _CB),
                            np.full_like(slots, self.seed * 2 + _IB)]),
            np.concatenate([slots, slots])], axis=1).astype(np.int64)
        return idx, self._labels[idx].astype(np.int32), seeds, self._store.fetch(idx)

    # tf.data ---------------------------------------------------------------
    def _one(self, payload, label, seed):
        cfg = self._cfg
        image = preprocess.train_image(payload, self._store.kind, seed, cfg.image_size,
                                       cfg.antialias, cfg.jpeg_fast_crop)
        return image, label

    def dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The stream from `start_step` as a tf.data.Dataset (infinite)."""
        n = 2 * self.local_batch_size
        b = self.local_batch_size
        plan_tf = _numpy_plan(lambda step: self._plan(step)[1:], self._store, n,
                              tf.int64, [n, 2])  # labels, per-image augmentation seeds

        def split(images, labels):
            return {"cb": {"image": images[:b], "label": labels[:b]},
                    "ib": {"image": images[b:], "label": labels[b:]}}

        return _decoded_batches(tf.data.Dataset.range(start_step, _MAX_STEPS).map(plan_tf),
                                self._one, n, split, self._cfg)

    # Iteration -------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self._iterator = self.dataset(self.step).as_numpy_iterator()
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
        bad, checked = _find_unreadable(
            idx, lambda p: one(tf.constant(payload[p]), tf.constant(labels[p]),
                               tf.constant(seeds[p])))
        if not bad:
            raise err
        if self._cfg.corrupt_images != "skip":
            raise _unreadable_error(self._store, "train", bad, checked) from err
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


class EvalStream:
    """One pass over a split, re-iterable: batches {'image', 'label', 'mask'}.

    Global batch k holds positions [k B, (k + 1) B); process p takes its slice.
    Positions past the end (and skipped unreadable images) have mask False and a
    zero image, so every image is seen exactly once over all processes.
    """

    def __init__(self, src, cfg, split: str, batch_size: int, process_index: int = 0,
                 process_count: int = 1):
        self._slice = process_slice(batch_size, process_index, process_count)
        self.split_name = split
        self._split = src.split(split)
        self._store = self._split.store
        self._labels = self._split.labels
        self._cfg = cfg
        self.global_batch_size = int(batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.num_examples = len(self._labels)
        self.num_batches = max(1, math.ceil(self.num_examples / self.global_batch_size))
        self.skipped: set = set()

    def __len__(self):
        return self.num_batches

    def _plan(self, k: int):
        pos = k * self.global_batch_size + np.arange(self._slice.start, self._slice.stop)
        valid = pos < self.num_examples
        mask = valid & np.array([int(p) not in self.skipped for p in pos])
        fill = next(i for i in range(self.num_examples) if i not in self.skipped)
        idx = np.where(mask, pos, fill).astype(np.int64)
        labels = np.where(valid, self._labels[np.minimum(pos, self.num_examples - 1)], 0)
        return idx, labels.astype(np.int32), mask, self._store.fetch(idx)

    def _one(self, payload, label, mask):
        cfg = self._cfg
        image = preprocess.eval_image(payload, self._store.kind, cfg.resize_size, cfg.image_size,
                                      cfg.antialias)
        return image, label, mask

    def dataset(self, start_batch: int = 0) -> tf.data.Dataset:
        b = self.local_batch_size
        plan_tf = _numpy_plan(lambda k: self._plan(k)[1:], self._store, b,
                              tf.bool, [b])  # labels, mask of real (not padding) rows

        def pack(images, labels, mask):
            images = tf.where(mask[:, None, None, None], images, tf.zeros_like(images))
            return {"image": images, "label": labels, "mask": mask}

        return _decoded_batches(tf.data.Dataset.range(start_batch, self.num_batches).map(plan_tf),
                                self._one, b, pack, self._cfg)

    def __iter__(self):
        k, iterator = 0, None
        while k < self.num_batches:
            if iterator is None:
                iterator = self.dataset(k).as_numpy_iterator()
            try:
                batch = next(iterator)
            except tf.errors.OpError as e:
                iterator = None
                self._handle_unreadable(k, e)
                continue
            k += 1
            yield batch

    def _handle_unreadable(self, k: int, err: Exception) -> None:
        idx, labels, mask, payload = self._plan(k)
        one = tf.function(self._one)
        positions = [p for p in range(len(idx)) if mask[p]]
        bad, checked = _find_unreadable(
            [idx[p] for p in positions],
            lambda j: one(tf.constant(payload[positions[j]]), tf.constant(labels[positions[j]]),
                          tf.constant(True)))
        if not bad:
            raise err
        if self._cfg.corrupt_images != "skip":
            raise _unreadable_error(self._store, self.split_name, bad, checked) from err
        for i, msg in bad:
            self.skipped.add(i)
            log.warning("skipping unreadable %s image %s (%d skipped so far, "
                        "data.corrupt_images='skip'): %s", self.split_name,
                        self._store.describe(i), len(self.skipped), msg)
        if len(self.skipped) == self.num_examples:
            raise DataError(f"every image of the {self.split_name} split is unreadable; check "
                            "that data.root holds JPEG/PNG images")

    @property
    def num_skipped(self) -> int:
        """Unreadable images left out of this split's results (skip mode)."""
        return len(self.skipped)


def make_train_stream(src, cfg, global_batch_size: int, seed: int = 0, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1) -> TrainStream:
    """Dual-sampling training stream; see `TrainStream`."""
    return TrainStream(src, cfg, global_batch_size, seed, start_step, process_index, process_count)


def make_eval_stream(src, cfg, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> EvalStream:
    """One-pass, re-iterable evaluation stream over `split` ('val' | 'test')."""
    return EvalStream(src, cfg, split, batch_size, process_index, process_count)


def num_eval_examples(src, split: str) -> int:
    return len(src.split(split))


def load_image_files(paths, cfg) -> np.ndarray:
    """Image files -> eval-preprocessed float32 (n, S, S, 3); DataError names a bad file."""
    fn = tf.function(lambda data: preprocess.eval_image(
        data, "bytes", cfg.resize_size, cfg.image_size, cfg.antialias))
    images = []
    for path in paths:
        path = str(path)
        try:
            images.append(fn(tf.io.read_file(path)).numpy())
        except tf.errors.OpError as e:
            raise DataError(f"cannot read image {path}: {first_line(e)}") from None
    if not images:
        return np.zeros((0, cfg.image_size, cfg.image_size, 3), np.float32)
    return np.stack(images)
