"""TFDS-backed sources on `tfds.testing.mock_data`: CIFAR-LT subsets and iNaturalist 2018."""

import os
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from lpt_jax import data  # noqa: E402
from lpt_jax.data import testing  # noqa: E402
from lpt_jax.errors import DataError


def _cfg(**kw):
    cfg = data.default_config()
    cfg.image_size, cfg.resize_size = 16, 20
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _fake_cifar(num_classes: int):
    """CIFAR-shaped splits whose pixel (0, 0) encodes the original file position,
    stored in a shuffled order as TFDS stores CIFAR, with ids 'train_00042'."""
    rng = np.random.RandomState(123)
    splits = {}
    for prefix, n in (("train", 50_000), ("test", 10_000)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n // num_classes))
        pos = np.arange(n)
        images = np.zeros((n, 32, 32, 3), np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = pos % 256, pos // 256
        images[:, 1:, :, 2] = (labels % 256)[:, None, None]
        stored = rng.permutation(n)
        splits[prefix] = {
            "id": np.array([f"{prefix}_{p:05d}".encode() for p in pos])[stored],
            "image": images[stored], "label": labels[stored].astype(np.int64),
            "coarse_label": (labels[stored] // 5).astype(np.int64)}
        splits[prefix + "_file_order_labels"] = labels

    def as_dataset(self, split, **kwargs):
        del self, kwargs
        name = "test" if "test" in str(split) else "train"
        return tf.data.Dataset.from_tensor_slices(splits[name])
    return as_dataset, splits


def _positions(src, split):
    store = src.splits[split].store
    images = store.fetch(np.arange(len(store)))
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def _reference_subset(labels, imb_factor, num_classes):
    """LDAM-DRW's IMBALANCECIFAR, literally (global legacy RNG seeded with 42)."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        img_max = len(labels) / num_classes
        img_num = [int(img_max * (imb_factor ** (i / (num_classes - 1.0))))
                   for i in range(num_classes)]
        kept = []
        for the_class, the_img_num in zip(np.unique(labels), img_num):
            idx = np.where(labels == the_class)[0]
            np.random.shuffle(idx)
            kept.append(idx[:the_img_num])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("ratio", [100, 10])
def test_cifar100_lt_reproduces_reference_subset(ratio):
    as_dataset, fake = _fake_cifar(100)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        src = data.get_source(_cfg(name="cifar100_lt", imbalance_ratio=ratio))
    expected = _reference_subset(fake["train_file_order_labels"], 1 / ratio, 100)
    np.testing.assert_array_equal(_positions(src, "train"), expected)
    np.testing.assert_array_equal(src.splits["train"].labels,
                                  fake["train_file_order_labels"][expected])
    assert src.num_train == {100: 10_847, 10: 19_573}[ratio]
    assert src.num_classes == 100 and len(src.class_names) == 100  # names: TFDS metadata
    np.testing.assert_array_equal(_positions(src, "test"), np.arange(10_000))
    assert set(src.splits) == {"train", "test"}
    with pytest.raises(DataError, match="no 'val' split.*config.eval.final_split='test'"):
        data.make_eval_stream(src, _cfg(), "val", 8)


def test_cifar10_lt_stream():
    as_dataset, fake = _fake_cifar(10)
    cfg = _cfg(name="cifar10_lt", imbalance_ratio=100)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        src = data.get_source(cfg)
    assert src.num_train == 12_406
    expected = _reference_subset(fake["train_file_order_labels"], 0.01, 10)
    np.testing.assert_array_equal(_positions(src, "train"), expected)
    batch = next(data.make_train_stream(src, cfg, 8, seed=0))
    assert batch["cb"]["image"].shape == (8, 16, 16, 3)
    ev = next(iter(data.make_eval_stream(src, cfg, "test", 8)))
    assert np.all(ev["label"] == src.splits["test"].labels[:8])
    # The label is painted into the blue channel: images and labels travel together.
    for b in (batch["cb"], batch["ib"], ev):
        np.testing.assert_allclose(b["image"][:, 8, 8, 2], b["label"] / 127.5 - 1, atol=1e-3)


def test_missing_tfds_data_fails_fast_without_download(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"tfds build cifar100 .*data.download=True"):
        data.get_source(_cfg(name="cifar100_lt", tfds_data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 20


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails at once (and is recorded)."""
    import socket
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(101, "Network is unreachable (tests never use the network)")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _offline_download_and_prepare(self, *args, **kwargs):
    """What TFDS 4.9 does without network (observed with the socket blocked): it creates
    downloads/<name>/<url>.tmp.<hex>/, downloads/extracted/ and <name>/ under the data dir,
    then raises requests' ConnectionError (after ~3.5 min of retries)."""
    import requests
    root = self.data_dir_root
    (root / "downloads" / self.name / "cs.toronto.edu_kriz_cifar-100-binary.tar.gz.tmp.3a2a")\
        .mkdir(parents=True)
    (root / "downloads" / "extracted").mkdir(parents=True)
    (root / self.name).mkdir(parents=True)
    raise requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded with "
        "url: /~kriz/cifar-100-binary.tar.gz (Caused by NameResolutionError(\"HTTPSConnection("
        "host='www.cs.toronto.edu', port=443): Failed to resolve 'www.cs.toronto.edu' ([Errno -3]"
        " Temporary failure in name resolution)\"))")


def test_missing_tfds_data_says_what_to_do_in_one_line(tmp_path, no_network, caplog):
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(name="cifar100_lt", tfds_data_dir=str(tmp_path)))
    msg = err.value.text(cli=True)  # as run.py words it
    assert "\n" not in msg and len(msg) - len(str(tmp_path)) < 300
    assert f"not prepared in {tmp_path}: run `tfds build cifar100 --data_dir=DIR` on a " in msg
    assert "then pass --config.data.tfds_data_dir=DIR" in msg
    assert msg.endswith(", or set --config.data.download=True to download it now")
    assert "download_and_prepare" not in msg and "tfds.load" not in msg  # TFDS's own advice
    assert "Variant folder" not in caplog.text  # TFDS's look-up noise before it
    assert not no_network and list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="TFDS has no dataset named 'cifar1000'"):
        data.get_source(_cfg(name="cifar100_lt", tfds_name="cifar1000",
                             tfds_data_dir=str(tmp_path)))


@pytest.mark.parametrize("root_exists", [True, False])
def test_failed_download_removes_what_it_created(tmp_path, monkeypatch, no_network,
                                                 root_exists):
    monkeypatch.setattr(tfds.core.dataset_builder.DatasetBuilder, "download_and_prepare",
                        _offline_download_and_prepare)
    root = tmp_path / "tfds"
    if root_exists:  # a data dir that already holds another dataset and other downloads
        (root / "mnist" / "3.0.1").mkdir(parents=True)
        (root / "downloads" / "mnist.tar").mkdir(parents=True)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(name="cifar100_lt", tfds_data_dir=str(root), download=True))
    assert time.perf_counter() - start < 20
    msg = str(err.value)
    assert "\n" not in msg and len(msg) - msg.count(str(root)) * len(str(root)) < 440
    assert f"downloading TFDS dataset 'cifar100' into {root} failed (ConnectionError: " in msg
    assert "download=True" not in msg  # it was True: never suggested again
    assert "Without network access: run `tfds build cifar100 --data_dir=DIR`" in msg
    if root_exists:
        assert ("removed what it created there (cifar100, downloads/cifar100, "
                "downloads/extracted)") in msg
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
            "downloads", "downloads/mnist.tar", "mnist", "mnist/3.0.1"]
    else:
        assert f"removed {root}, which the attempt created" in msg
        assert not root.exists()
    assert not no_network


class _FakeRecords:
    """A random-access source like tfds.data_source with SkipDecoding images."""

    def __init__(self, labels, images):
        self.labels, self.images, self.reads = labels, images, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i % len(self.images)], "label": np.int64(self.labels[i]),
                "id": f"img{i:06d}".encode(), "supercategory": np.int64(0)}


def _fake_inat():
    rng = np.random.RandomState(0)
    tail = np.repeat(np.arange(50), np.arange(50, 0, -1))  # classes 0..49 get extra images
    sources = {"train": _FakeRecords(np.concatenate([np.arange(8142), tail]), [
        testing.png_bytes(rng.randint(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(3)]),
               "validation": _FakeRecords(np.arange(8142)[::-1].copy(), [
                   testing.png_bytes(rng.randint(0, 255, (9, 9, 3), dtype=np.uint8))])}

    def as_data_source(self, split, decoders=None, **kwargs):
        del self, kwargs
        assert isinstance(decoders["image"], tfds.decode.SkipDecoding)  # images stay encoded
        return sources[str(split)]
    return as_data_source, sources


def test_inaturalist2018_from_tfds(tmp_path):
    as_data_source, sources = _fake_inat()
    cfg = _cfg(name="inaturalist2018", cache_dir=str(tmp_path / "cache"))
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        src = data.get_source(cfg)
        reads = sources["train"].reads
        again = data.get_source(cfg)  # labels come from the cache this time
        assert sources["train"].reads == reads
    assert src.num_classes == 8142 and len(src.class_names) == 8142
    np.testing.assert_array_equal(src.train_counts, again.train_counts)
    assert src.train_counts[0] == 51 and src.train_counts[49] == 2 and src.train_counts[50] == 1
    assert src.splits["val"] is src.splits["test"]
    assert data.num_eval_examples(src, "test") == 8142
    assert len(list((tmp_path / "cache").iterdir())) == 2
    it = data.make_train_stream(src, cfg, 16, seed=0)
    batch = next(it)
    cb, ib = it.local_indices(0)
    np.testing.assert_array_equal(batch["cb"]["label"], sources["train"].labels[cb])
    np.testing.assert_array_equal(batch["ib"]["label"], sources["train"].labels[ib])
    assert batch["ib"]["image"].shape == (16, 16, 16, 3)
    ev = next(iter(data.make_eval_stream(src, cfg, "val", 8)))
    np.testing.assert_array_equal(ev["label"], np.arange(8142)[::-1][:8])
    assert "record 3, id img000003" in src.splits["train"].store.describe(3)


def test_tfrecord_only_tfds_copy_explains_conversion():
    def no_random_access(self, split, **kwargs):
        raise NotImplementedError("Random access data source for file format TFRECORD")
    with tfds.testing.mock_data(as_data_source_fn=no_random_access):
        with pytest.raises(DataError, match="tfds convert_format"):
            data.get_source(_cfg(name="inaturalist2018"))


def test_offline_download_gives_up_after_the_retry_budget(tmp_path, no_network):
    """TFDS's real download path with the sockets refused: TFDS alone retries each request
    10 times with back-off (~3.5 min); data.download_retries=2 ends it within seconds, with
    the one-line error, and TFDS's own setting is given back afterwards."""
    from tensorflow_datasets.core.download import downloader
    saved = downloader.MAX_RETRIES
    root = tmp_path / "tfds"
    start = time.perf_counter()
    with pytest.raises(DataError, match="downloading TFDS dataset 'cifar100' into"):
        data.get_source(_cfg(name="cifar100_lt", tfds_data_dir=str(root), download=True,
                             download_retries=2))
    assert time.perf_counter() - start < 30
    assert len(no_network) >= 3  # the first try and both retries were refused here
    assert downloader.MAX_RETRIES == saved
    assert not root.exists()


def test_download_retries_must_be_a_count(tmp_path):
    with pytest.raises(DataError, match=r"data.download_retries=-1: expected an integer >= 0"):
        data.get_source(_cfg(name="cifar100_lt", tfds_data_dir=str(tmp_path), download=True,
                             download_retries=-1))
    assert list(tmp_path.iterdir()) == []
