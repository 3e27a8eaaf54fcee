"""The prepared format: `python -m lpt_jax.data.prepare` on a tiny tree of real JPEGs."""

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from lpt_jax import data  # noqa: E402
from lpt_jax.data import prepare, testing  # noqa: E402
from lpt_jax.errors import DataError

COUNTS = testing.long_tail_counts(10, 24, 2)


@pytest.fixture(scope="module")
def tree(cifar10_tree):
    return cifar10_tree(COUNTS, eval_per_class=3, eval_splits=("val",))


def _cfg(root, **kw):
    return testing.image_folder_config(root, **kw)


def _flat(batches):
    return [x for b in batches for x in tf.nest.flatten(b)]


def test_prepared_equals_files(tree, tmp_path):
    out = tmp_path / "prepared"
    rc = prepare.main(["--name=image_folder", f"--root={tree}", f"--out={out}", "--shard_mb=0.02"])
    assert rc == 0
    manifest = json.loads((out / "lpt_prepared.json").read_text())
    assert len(manifest["splits"]["train"]["files"]) > 1  # several shards
    files_src = data.get_source(_cfg(tree))
    prep_src = data.get_source(_cfg(out))  # format 'auto' finds the manifest
    assert prep_src.splits["train"].store.kind == "bytes"
    assert prep_src.class_names == files_src.class_names
    for split in ("train", "val"):
        np.testing.assert_array_equal(prep_src.splits[split].labels, files_src.splits[split].labels)
    assert "airplane" in prep_src.splits["train"].store.describe(0)
    streams = [data.make_train_stream(s, _cfg(tree), 8, seed=4) for s in (files_src, prep_src)]
    a, b = ([next(s) for _ in range(3)] for s in streams)
    for x, y in zip(_flat(a), _flat(b)):
        np.testing.assert_array_equal(x, y)
    ev = [list(data.make_eval_stream(s, _cfg(tree), "val", 8)) for s in (files_src, prep_src)]
    for x, y in zip(_flat(ev[0]), _flat(ev[1])):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError, match="holds prepared 'image_folder' data, not 'places_lt'"):
        data.get_source(_cfg(out, name="places_lt"))


def test_prepare_resizes_large_images(tree, tmp_path):
    out = tmp_path / "small"
    prepare.prepare(_cfg(tree), str(out), splits=["train"], resize_shorter=16)
    src = data.get_source(_cfg(out))
    store = src.splits["train"].store
    assert set(src.splits) == {"train"}
    shapes = {tuple(tf.io.decode_image(b).shape) for b in store.fetch(np.arange(5))}
    assert shapes == {(16, 16, 3)}


def test_prepare_reports_unreadable_images(tree, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    bad = sorted((broken / "train" / "cat").glob("*.jpg"))[0]
    testing.truncate_file(str(bad))
    out = tmp_path / "out"
    assert prepare.main(["--name=image_folder", f"--root={broken}", f"--out={out}"]) == 1
    assert str(bad) in capsys.readouterr().err
    assert not (out / "lpt_prepared.json").exists()
    manifest = prepare.prepare(_cfg(broken), str(out), on_corrupt="skip")
    assert manifest["splits"]["train"]["skipped"] == [str(bad)]
    assert data.get_source(_cfg(out)).num_train == sum(COUNTS) - 1


def test_missing_prepared_shard_is_named(tree, tmp_path):
    out = tmp_path / "p"
    prepare.prepare(_cfg(tree), str(out), shard_mb=0.02)
    shard = sorted(out.glob("train-*.tfrecord"))[-1]
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {shard} .* is missing"):
        data.get_source(_cfg(out))
