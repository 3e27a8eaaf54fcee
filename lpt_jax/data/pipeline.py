"""What the training and evaluation streams share: per plan index, one `tf.numpy_function`
computes the example indices (a pure function of seed and step, see `sampling.py`) and fetches
what the decoder needs; the batch is then unbatched so that reading, decoding and augmentation
run per image in parallel TF threads, and batched again. Unreadable images are found and
reported here too."""

import weakref

from lpt_jax.data._tf import tf
from lpt_jax.data.tf_errors import first_line
from lpt_jax.errors import DataError


def payload_signature(store, n: int):
    if store.kind == "pixels":
        return tf.uint8, [n, *store.pixel_shape]
    return tf.string, [n]


def dataset_options(cfg) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.max_intra_op_parallelism = 1  # parallelism comes from tf.data, not inside ops
    threads = int(cfg.tf_threads)
    if threads > 0:  # e.g. the benchmark's per-core measurement
        opts.threading.private_threadpool_size = threads
    return opts


def parallel_calls(cfg):
    n = int(cfg.num_parallel_calls)
    return tf.data.AUTOTUNE if n < 0 else n


def weak_plan(stream):
    """`k -> stream._plan(k)[1:]` holding `stream` weakly.

    TF keeps every function given to `tf.numpy_function` inside a tf.data map alive until
    the interpreter exits (in the global graph's `_py_funcs_used_in_graph`). A closure over
    the stream would keep the stream, its store and its tf.data iterator alive just as long:
    the iterator's threads would then be torn down during interpreter shutdown, which
    blocks for seconds to a minute per iterator (tf.data's autotuning thread). Holding the
    stream weakly lets the stream and its iterator go as soon as their owner drops them.
    """
    ref = weakref.ref(stream)
    kind = type(stream).__name__

    def plan(k: int):
        owner = ref()
        if owner is None:  # only reached by a pipeline that outlived its stream
            raise RuntimeError(f"the {kind} this tf.data pipeline reads from is gone; keep "
                               "the stream alive while its dataset() is used")
        return owner._plan(k)[1:]  # pylint: disable=protected-access
    return plan


def numpy_plan(plan, store, rows: int, extra_dtype, extra_shape):
    """A tf.data map of a plan index to the NumPy `plan`'s (labels, extra, payload) for
    `rows` examples, returned as (payload, labels, extra) with static shapes."""
    dtype, shape = payload_signature(store, rows)

    def plan_tf(k):
        labels, extra, payload = tf.numpy_function(
            lambda k: plan(int(k)), [k], [tf.int32, extra_dtype, dtype], stateful=False)
        labels.set_shape([rows])
        extra.set_shape(extra_shape)
        payload.set_shape(shape)
        return payload, labels, extra
    return plan_tf


def decoded_batches(plans: tf.data.Dataset, one, rows: int, finish, cfg) -> tf.data.Dataset:
    """Planned rows decoded in parallel (deterministic order), re-batched and finished."""
    ds = plans.unbatch().map(one, num_parallel_calls=parallel_calls(cfg), deterministic=True)
    ds = ds.batch(rows, drop_remainder=True).map(finish)
    return ds.prefetch(int(cfg.prefetch)).with_options(dataset_options(cfg))


def find_unreadable(indices, run_one) -> tuple[list, int]:
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


def unreadable_error(store, split: str, bad: list, checked: int) -> DataError:
    i, msg = bad[0]
    if len(bad) == checked > 1:  # nothing readable: a wrong root or format, not one bad file
        return DataError(
            f"none of the {checked} images of a {split} batch can be read, e.g. "
            f"{store.describe(i)}: {msg}; check that data.root holds JPEG/PNG images")
    more = f" (and {len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
    return DataError(
        f"cannot read image {store.describe(i)} ({split} split, index {i}): {msg}{more}; "
        "fix or remove the file, or set data.corrupt_images='skip'")
