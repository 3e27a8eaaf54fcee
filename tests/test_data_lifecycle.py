"""The streams' tf.data pipelines stop when their owner is done with them, never at
interpreter exit, where tearing down a tf.data iterator blocks for seconds to a minute
(the silent wait after the final table)."""

import gc
import os
import weakref

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data  # noqa: E402
from lpt_jax.data import testing  # noqa: E402

from helpers import make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lifecycle"))


@pytest.fixture
def no_gc():
    """Only reference counting frees objects: what is freed here is freed deterministically."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _live_iterators() -> int:
    """tf.data iterators alive in this process (each owns prefetch / decode threads)."""
    return sum(type(o).__name__ == "OwnedIterator" for o in gc.get_objects())


def test_dropped_train_stream_frees_its_pipeline_at_once(folder, no_gc):
    cfg = testing.image_folder_config(folder)
    src = data.get_source(cfg)
    before = _live_iterators()
    stream = data.make_train_stream(src, cfg, 16, seed=0)
    next(stream)
    alive, pipeline = weakref.ref(stream), weakref.ref(stream._iterator)
    assert _live_iterators() == before + 1
    del stream
    # TF keeps every tf.numpy_function callable until exit: one holding the stream kept
    # the stream, its store and its iterator alive until interpreter shutdown.
    assert alive() is None and pipeline() is None
    assert _live_iterators() == before


def test_train_stream_close_and_context_manager(folder):
    cfg = testing.image_folder_config(folder)
    src = data.get_source(cfg)
    fresh = [next(data.make_train_stream(src, cfg, 16, seed=3, start_step=k)) for k in (0, 1)]
    with data.make_train_stream(src, cfg, 16, seed=3) as stream:
        first = next(stream)
        pipeline = weakref.ref(stream._iterator)
    assert pipeline() is None and stream._iterator is None  # stopped when the block ends
    stream.close()  # idempotent
    again = next(stream)  # a closed stream restarts at its step: the same batches
    stream.close()
    for got, want in ((first, fresh[0]), (again, fresh[1])):
        np.testing.assert_array_equal(got["ib"]["image"], want["ib"]["image"])
        np.testing.assert_array_equal(got["cb"]["label"], want["cb"]["label"])


def test_eval_pass_stops_when_abandoned_or_closed(folder, no_gc):
    cfg = testing.image_folder_config(folder)
    src = data.get_source(cfg)
    before = _live_iterators()
    ev = data.make_eval_stream(src, cfg, "test", 4)
    assert len(ev) == 4
    for _ in ev:  # a `break` (eval.max_examples) abandons the pass ...
        assert _live_iterators() == before + 1
        break
    assert _live_iterators() == before  # ... and its pipeline stops with it
    one_pass = iter(ev)
    next(one_pass)
    assert _live_iterators() == before + 1
    ev.close()  # ends unfinished passes now, even while someone still holds them
    assert _live_iterators() == before
    with pytest.raises(StopIteration):
        next(one_pass)
    with ev:
        next(iter(ev))
    assert _live_iterators() == before
    assert sum(int(b["mask"].sum()) for b in ev) == 16  # still re-iterable after close


def test_dataset_keeps_its_stream_alive(folder, no_gc):
    """`dataset()` is usable on its own: it holds the stream its plan reads from."""
    cfg = testing.image_folder_config(folder)
    src = data.get_source(cfg)
    ds = data.make_train_stream(src, cfg, 16, seed=0).dataset(2)
    batch = next(iter(ds.take(1)))
    assert batch["cb"]["image"].shape == (16, 32, 32, 3)
    ev = data.make_eval_stream(src, cfg, "val", 8).dataset()
    assert sum(int(b["mask"].numpy().sum()) for b in ev) == 16
