"""The evaluation stream: every image of a split once over all processes (the last batch
padded and masked), and loading image files for prediction."""

import logging
import math
import weakref

import numpy as np

from lpt_jax.data import pipeline, preprocess
from lpt_jax.data._tf import tf
from lpt_jax.data.sampling import process_slice
from lpt_jax.data.tf_errors import first_line
from lpt_jax.errors import DataError
from lpt_jax.storage import files

log = logging.getLogger(__name__)


class EvalStream:
    """One pass over a split, re-iterable: batches {'image', 'label', 'mask'}, and with
    `ensemble` ('five_crop' | 'ten_crop') 'views' too: (B, V, S, S, 3), each image's V
    test-time ensemble views (`preprocess.eval_views`), decoded once with its 'image'.

    Global batch k holds positions [k B, (k + 1) B); process p takes its slice.
    Positions past the end (and skipped unreadable images) have mask False and a
    zero image, so every image is seen exactly once over all processes.

    Each `iter()` is one pass with its own tf.data pipeline. A pass stops its pipeline when
    it ends, when it is abandoned (a `break`: its iterator is closed as soon as it is
    dropped), or on `close()`, which ends every unfinished pass of the stream now (also
    at the end of a `with` block).
    """

    def __init__(self, src, cfg, split: str, batch_size: int, process_index: int = 0,
                 process_count: int = 1, ensemble: str = "none", ensemble_expand: int = 24):
        if ensemble != "none" and ensemble not in preprocess.ENSEMBLE_VIEWS:
            raise ValueError(f"ensemble={ensemble!r}: expected 'none' or one of "
                             f"{list(preprocess.ENSEMBLE_VIEWS)}")
        self.ensemble, self.ensemble_expand = ensemble, int(ensemble_expand)
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
        self._passes = weakref.WeakSet()  # unfinished passes (generators), for close()

    def __len__(self):
        return self.num_batches

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Ends every unfinished pass now, stopping its tf.data pipeline. Idempotent; the
        stream may be iterated again afterwards."""
        for one_pass in list(self._passes):
            one_pass.close()

    def _plan(self, k: int):
        pos = k * self.global_batch_size + np.arange(self._slice.start, self._slice.stop)
        valid = pos < self.num_examples
        mask = valid & np.array([int(p) not in self.skipped for p in pos])
        fill = next(i for i in range(self.num_examples) if i not in self.skipped)
        idx = np.where(mask, pos, fill).astype(np.int64)
        labels = np.where(valid, self._labels[np.minimum(pos, self.num_examples - 1)], 0)
        return idx, labels.astype(np.int32), mask, self._store.fetch(idx)

    @property
    def _one(self):
        """One image's decoding; a function that does not hold the stream."""
        kind, resize, size = self._store.kind, int(self._cfg.resize_size), int(self._cfg.image_size)
        antialias = bool(self._cfg.antialias)
        ensemble, expand = self.ensemble, self.ensemble_expand

        def one(payload, label, mask):
            pixels = preprocess.pixels(payload, kind)  # decoded once for every view
            out = {"image": preprocess.eval_image(pixels, "pixels", resize, size, antialias)}
            if ensemble != "none":
                out["views"] = preprocess.eval_views(pixels, "pixels", size, expand, ensemble,
                                                     antialias)
            return out, label, mask
        return one

    def dataset(self, start_batch: int = 0) -> tf.data.Dataset:
        """Batches [start_batch, num_batches) as a tf.data.Dataset; it keeps this stream
        alive while it is used."""
        ds = self._dataset(start_batch)
        ds._lpt_stream = self  # pylint: disable=protected-access  (the plan holds it weakly)
        return ds

    def _dataset(self, start_batch: int) -> tf.data.Dataset:
        b = self.local_batch_size
        plan_tf = pipeline.numpy_plan(pipeline.weak_plan(self), self._store, b,
                              tf.bool, [b])  # labels, mask of real (not padding) rows

        def pack(images, labels, mask):
            def zero(x):  # padding and skipped rows: zeros, whatever the rank
                keep = tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))
                return tf.where(keep, x, tf.zeros_like(x))
            return {**{k: zero(v) for k, v in images.items()}, "label": labels, "mask": mask}

        return pipeline.decoded_batches(tf.data.Dataset.range(start_batch, self.num_batches).map(plan_tf),
                                self._one, b, pack, self._cfg)

    def __iter__(self):
        one_pass = self._pass()
        self._passes.add(one_pass)
        return one_pass

    def _pass(self):
        k, iterator = 0, None
        try:
            while k < self.num_batches:
                if iterator is None:
                    iterator = self._dataset(k).as_numpy_iterator()
                try:
                    batch = next(iterator)
                except tf.errors.OpError as e:
                    iterator = None
                    self._handle_unreadable(k, e)
                    continue
                k += 1
                yield batch
        finally:  # end, error, close() or abandonment: the pipeline stops here, not later
            iterator = None

    def _handle_unreadable(self, k: int, err: Exception) -> None:
        idx, labels, mask, payload = self._plan(k)
        one = tf.function(self._one)
        positions = [p for p in range(len(idx)) if mask[p]]
        bad, checked = pipeline.find_unreadable(
            [idx[p] for p in positions],
            lambda j: one(tf.constant(payload[positions[j]]), tf.constant(labels[positions[j]]),
                          tf.constant(True)))
        if not bad:
            raise err
        if self._cfg.corrupt_images != "skip":
            raise pipeline.unreadable_error(self._store, self.split_name, bad, checked) from err
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


def make_eval_stream(src, cfg, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1, ensemble: str = "none",
                     ensemble_expand: int = 24) -> EvalStream:
    """One-pass, re-iterable evaluation stream over `split` ('val' | 'test'); `ensemble`
    ('five_crop' | 'ten_crop') adds each image's test-time ensemble views."""
    return EvalStream(src, cfg, split, batch_size, process_index, process_count, ensemble,
                      ensemble_expand)


def num_eval_examples(src, split: str) -> int:
    return len(src.split(split))


def load_image_files(paths, cfg) -> np.ndarray:
    """Image files -> eval-preprocessed float32 (n, S, S, 3); DataError names a bad file
    (a local FIFO or device too, before it is opened: tf.io.read_file would block or never
    end)."""
    fn = tf.function(lambda data: preprocess.eval_image(
        data, "bytes", cfg.resize_size, cfg.image_size, cfg.antialias))
    images = []
    for path in paths:
        path = str(path)
        try:
            files.check_regular(path)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
        try:
            images.append(fn(tf.io.read_file(path)).numpy())
        except tf.errors.OpError as e:
            raise DataError(f"cannot read image {path}: {first_line(e)}") from None
    if not images:
        return np.zeros((0, cfg.image_size, cfg.image_size, 3), np.float32)
    return np.stack(images)
