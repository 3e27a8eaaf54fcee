"""Training and evaluation streams on a small long-tailed tree of real CIFAR-10 JPEGs."""

import logging
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from lpt_jax import data  # noqa: E402
from lpt_jax.data import preprocess, testing  # noqa: E402
from lpt_jax.errors import DataError

COUNTS = testing.long_tail_counts(10, 40, 4)  # 40 ... 4 training images per class
EVAL_PER_CLASS = 5


@pytest.fixture(scope="module")
def tree(cifar10_tree):
    return cifar10_tree(COUNTS, EVAL_PER_CLASS, eval_splits=("test", "val"))


def _cfg(root, **kw):
    return testing.image_folder_config(root, **kw)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _assert_same(a, b):
    flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y)


def test_source_from_tree(tree):
    src = data.get_source(_cfg(tree))
    assert src.class_names == testing.CIFAR10_CLASSES
    assert src.train_counts.tolist() == COUNTS
    assert set(src.splits) == {"train", "val", "test"}
    assert data.num_eval_examples(src, "test") == 10 * EVAL_PER_CLASS


def test_a_method_reading_one_stream_gets_it_alone_and_unchanged(tree):
    """LIFT reads the instance-balanced batch alone: the class-balanced one is neither sampled
    into the batch nor decoded, and the ib images and augmentations are the dual stream's."""
    cfg = _cfg(tree)
    src = data.get_source(cfg)
    dual = _take(data.make_train_stream(src, cfg, global_batch_size=16, seed=0), 2)
    alone = _take(data.make_train_stream(src, cfg, global_batch_size=16, seed=0,
                                         streams=("ib",)), 2)
    for both, ib in zip(dual, alone):
        assert set(ib) == {"ib"}
        _assert_same(both["ib"], ib["ib"])
    with pytest.raises(ValueError, match="streams"):
        data.make_train_stream(src, cfg, global_batch_size=16, streams=("balanced",))


def test_train_batch_structure_and_labels(tree):
    cfg = _cfg(tree)
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, global_batch_size=16, seed=0)
    for step, batch in enumerate(_take(it, 3)):
        assert set(batch) == {"cb", "ib"}
        for name in ("cb", "ib"):
            image, label = batch[name]["image"], batch[name]["label"]
            assert image.shape == (16, 32, 32, 3) and image.dtype == np.float32
            assert label.shape == (16,) and label.dtype == np.int32
            assert -1.0 <= image.min() < -0.5 and 0.5 < image.max() <= 1.0
        cb_idx, ib_idx = it.local_indices(step)
        labels = src.splits["train"].labels
        np.testing.assert_array_equal(batch["cb"]["label"], labels[cb_idx])
        np.testing.assert_array_equal(batch["ib"]["label"], labels[ib_idx])
        groups = batch["cb"]["label"].reshape(-1, 4)
        assert np.all(groups == groups[:, :1])
    assert it.step == 3


def test_same_seed_same_batches_and_resume(tree):
    cfg = _cfg(tree)
    src = data.get_source(cfg)
    fresh = _take(data.make_train_stream(src, cfg, 16, seed=7), 4)
    again = _take(data.make_train_stream(src, cfg, 16, seed=7), 2)
    _assert_same(fresh[:2], again)
    resumed = data.make_train_stream(src, cfg, 16, seed=7, start_step=3)
    _assert_same(next(resumed), fresh[3])
    other = next(data.make_train_stream(src, cfg, 16, seed=8))
    assert not np.array_equal(other["ib"]["image"], fresh[0]["ib"]["image"])
    assert not np.array_equal(fresh[0]["cb"]["image"], fresh[1]["cb"]["image"])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_draw_disjoint_shares_of_the_global_batch(tree, processes):
    cfg = _cfg(tree)
    src = data.get_source(cfg)
    whole = _take(data.make_train_stream(src, cfg, 16, seed=1, start_step=2), 2)
    shares = [_take(data.make_train_stream(src, cfg, 16, seed=1, start_step=2, process_index=p,
                                           process_count=processes), 2)
              for p in range(processes)]
    for step in range(2):
        for name in ("cb", "ib"):
            for key in ("image", "label"):
                joined = np.concatenate([shares[p][step][name][key] for p in range(processes)])
                np.testing.assert_array_equal(joined, whole[step][name][key])
    streams = [data.make_train_stream(src, cfg, 16, seed=1, process_index=p,
                                      process_count=processes) for p in range(processes)]
    ib = np.concatenate([s.local_indices(0)[1] for s in streams])
    assert len(set(ib.tolist())) == len(ib) == 16  # disjoint shares of one global batch
    with pytest.raises(DataError, match="divisible by 4"):
        data.make_train_stream(src, cfg, 24, process_count=4)


@pytest.mark.parametrize("processes,batch", [(1, 16), (3, 12)])
def test_eval_sees_every_image_once(tree, processes, batch):
    cfg = _cfg(tree)
    src = data.get_source(cfg)
    n = data.num_eval_examples(src, "test")
    streams = [data.make_eval_stream(src, cfg, "test", batch, p, processes)
               for p in range(processes)]
    passes = [list(s) for s in streams]
    assert len({len(p) for p in passes}) == 1  # all processes step together
    assert len(passes[0]) == -(-n // batch)
    images, labels = [], []
    for k in range(len(passes[0])):  # global order: batch k, then process order
        for p in range(processes):
            b = passes[p][k]
            assert b["image"].shape == (batch // processes, 32, 32, 3) and b["mask"].dtype == bool
            assert np.all(b["image"][~b["mask"]] == 0)
            images.append(b["image"][b["mask"]])
            labels.append(b["label"][b["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert len(labels) == n
    np.testing.assert_array_equal(labels, src.splits["test"].labels)
    paths = [src.splits["test"].store.describe(i) for i in range(n)]
    np.testing.assert_allclose(images, data.load_image_files(paths, cfg), atol=1e-6)
    _assert_same(passes[0], list(streams[0]))  # re-iterable, same pass


def test_eval_preprocessing_matches_pil(tree):
    from PIL import Image
    cfg = _cfg(tree, image_size=20, resize_size=24)  # a downscale, where antialiasing matters
    files = sorted(str(p) for p in (tree / "test").glob("*/*.jpg"))[:12]
    ours = data.load_image_files(files, cfg)
    assert ours.shape == (12, 20, 20, 3)

    def pil(offset):
        out = []
        for f in files:
            im = Image.open(f).convert("RGB").resize((24, 24), Image.BILINEAR)
            im = np.asarray(im, np.float32)
            out.append(im[offset:offset + 20, offset:offset + 20] / 127.5 - 1)
        return np.stack(out)
    err = np.abs(ours - pil(2))
    # TF and PIL decode JPEGs a few levels apart; a one-pixel shift is far worse.
    assert err.mean() < 0.015 and err.max() < 0.1
    assert np.abs(ours - pil(1)).mean() > 2 * err.mean()


def test_random_resized_crop_windows():
    window = tf.function(preprocess.rrc_window)
    for h, w in ((100, 150), (37, 400)):
        wins = np.stack([
            window(tf.constant(h), tf.constant(w), tf.constant([s, 3], tf.int64)).numpy()
            for s in range(300)])
        top, left, ch, cw = wins.T
        assert np.all((top >= 0) & (left >= 0) & (top + ch <= h) & (left + cw <= w))
        assert np.all((ch > 0) & (cw > 0))
        area = ch * cw / (h * w)
        ratio = cw / ch
        sampled = ~((ch == h) & (cw == w)) if h == 100 else np.ones_like(area, bool)
        assert np.all(area[sampled] >= 0.08 - 0.02) and np.all(area <= 1.0)
        assert np.all((ratio[sampled] > 0.75 * 0.9) & (ratio[sampled] < 4 / 3 * 1.1))
        if h == 100:
            assert area.std() > 0.1 and area.min() < 0.2 and area.max() > 0.8  # scales vary
    # Fallback for an image no allowed box fits: centre crop at ratio 4/3.
    win = preprocess.rrc_window(10, 1000, tf.constant([0, 0], tf.int64)).numpy()
    np.testing.assert_array_equal(win, [0, (1000 - 13) // 2, 10, 13])


def test_jpeg_fast_crop_and_flip(tree):
    f = sorted((tree / "train").glob("*/*.jpg"))[0]
    img = tf.io.decode_jpeg(f.read_bytes())
    big = tf.io.encode_jpeg(tf.cast(tf.image.resize(img, [128, 160]), tf.uint8), quality=90)
    flips = 0
    for s in range(40):
        seed = tf.constant([s, 1], tf.int64)
        fast = preprocess.train_image(big, "bytes", seed, 48, True, True).numpy()
        full = preprocess.train_image(big, "bytes", seed, 48, True, False).numpy()
        assert np.abs(fast - full).mean() < 2e-3  # only window-border chroma differs
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        flips += int(tf.image.stateless_random_flip_left_right(
            tf.reshape(tf.range(2.0), [1, 2, 1]), seed=flip_seed)[0, 0, 0] == 1.0)
    assert 8 <= flips <= 32  # about half are flipped


def test_resize_skips_antialiasing_only_where_it_is_a_no_op():
    x = tf.random.stateless_uniform([30, 50, 3], [0, 1], maxval=255.0)
    for size in ([64, 64], [40, 50], [20, 60], [30, 50]):
        expected = tf.image.resize(x, size, "bilinear", antialias=True)
        np.testing.assert_allclose(preprocess._resize(x, size, True), expected, atol=1e-3)
    shrunk = preprocess._resize(x, [10, 10], True)
    assert np.abs(shrunk - tf.image.resize(x, [10, 10], "bilinear")).max() > 1.0


def _index_of(src, path):
    return [src.splits["train"].store.describe(i) for i in range(src.num_train)].index(str(path))


def _first_step_using(stream, index, limit=50):
    for step in range(limit):
        if index in np.concatenate(stream.local_indices(step)):
            return step
    raise AssertionError(f"index {index} not drawn in {limit} steps")


@pytest.fixture
def broken_tree(tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    bad_train = sorted((root / "train" / "truck").glob("*.jpg"))[1]  # the rarest class
    bad_test = sorted((root / "test" / "bird").glob("*.jpg"))[2]
    testing.truncate_file(str(bad_train))
    testing.truncate_file(str(bad_test))
    return root, bad_train, bad_test


def test_unreadable_training_image_is_named(broken_tree):
    root, bad, _ = broken_tree
    cfg = _cfg(root)
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, 16, seed=0)
    bad_index = _index_of(src, bad)
    step = _first_step_using(it, bad_index)
    _take(it, step)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        next(it)


def test_unreadable_training_image_skipped(broken_tree, caplog):
    root, bad, _ = broken_tree
    cfg = _cfg(root, corrupt_images="skip")
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, 16, seed=0)
    bad_index = _index_of(src, bad)
    step = _first_step_using(it, bad_index)
    with caplog.at_level(logging.WARNING):
        batches = _take(it, step + 2)
    assert str(bad) in caplog.text
    assert bad_index not in np.concatenate(it.local_indices(step))
    groups = batches[step]["cb"]["label"].reshape(-1, 4)
    assert np.all(groups == groups[:, :1])  # substitutes come from the same class


def test_unreadable_eval_image(broken_tree):
    root, _, bad = broken_tree
    with pytest.raises(DataError, match=f"cannot read image {bad} \\(test split"):
        list(data.make_eval_stream(data.get_source(_cfg(root)), _cfg(root), "test", 16))
    cfg = _cfg(root, corrupt_images="skip")
    ev = data.make_eval_stream(data.get_source(cfg), cfg, "test", 16)
    assert sum(int(b["mask"].sum()) for b in ev) == 10 * EVAL_PER_CLASS - 1
    assert len(ev.skipped) == 1


def test_load_image_files_names_bad_files(broken_tree, tmp_path):
    root, _, bad = broken_tree
    good = sorted((root / "test" / "cat").glob("*.jpg"))[:2]
    assert data.load_image_files(good, _cfg(root)).shape == (2, 32, 32, 3)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        data.load_image_files([good[0], bad], _cfg(root))
    with pytest.raises(DataError, match="missing.jpg"):
        data.load_image_files([tmp_path / "missing.jpg"], _cfg(root))


def test_split_lists_equal_tree(tree, tmp_path):
    src = data.get_source(_cfg(tree))
    lists = {}
    for split in ("train", "test"):
        s = src.splits[split]
        rows = [f"{os.path.relpath(s.store.describe(i), tree)} {s.labels[i]}\n"
                for i in range(len(s))]
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("".join(rows))
    cfg = _cfg(tree, train_list=str(lists["train"]), test_list=str(lists["test"]))
    from_lists = data.get_source(cfg)
    assert from_lists.train_counts.tolist() == COUNTS
    _assert_same(next(data.make_train_stream(from_lists, cfg, 16, seed=2)),
                 next(data.make_train_stream(src, _cfg(tree), 16, seed=2)))


def test_image_folder_tree_errors(tree, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(tree / "train", root / "train")
    (root / "val" / "unicorn").mkdir(parents=True)
    with pytest.raises(DataError, match="unicorn has no counterpart"):
        data.get_source(_cfg(root))
    with pytest.raises(DataError, match=r"train does not exist"):
        data.get_source(_cfg(tmp_path))
