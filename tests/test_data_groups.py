"""Counts, shot groups and split lists: the numbers docs/spec.md fixes."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data  # noqa: E402
from lpt_jax.data import list_datasets, split_lists  # noqa: E402
from lpt_jax.errors import DataError


def _cfg(**kw):
    cfg = data.default_config()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("ratio,total", [(100, 10_847), (50, 12_608), (10, 19_573)])
def test_cifar100_lt_totals(ratio, total):
    counts = data.cifar_lt_counts(100, ratio)
    assert counts.sum() == total
    assert counts[0] == 500 and counts[-1] == 500 // ratio
    assert np.all(np.diff(counts) <= 0)


def test_cifar10_lt_total_ir100():
    assert data.cifar_lt_counts(10, 100).sum() == 12_406  # the LDAM-DRW paper's CIFAR-10-LT size


def test_shot_group_boundaries():
    counts = np.array([101, 100, 21, 20, 19, 5, 500])
    release = data.shot_groups(counts, "release")
    oltr = data.shot_groups(counts, "oltr")
    assert release["many"].tolist() == [0, 6]
    assert release["medium"].tolist() == [1, 2]
    assert release["few"].tolist() == [3, 4, 5]
    assert oltr["medium"].tolist() == [1, 2, 3]
    assert oltr["few"].tolist() == [4, 5]
    with pytest.raises(DataError):
        data.shot_groups(counts, "other")


def test_steps_per_epoch():
    assert data.steps_per_epoch(62_500, 256) == 245
    assert data.steps_per_epoch(512, 256) == 3
    assert data.steps_per_epoch(10, 256) == 1


def test_places_lt_shipped_lists():
    names, lists = list_datasets.load_lists(list_datasets.PLACES_LT, _cfg())
    assert len(names) == 365 and names[0] == "airfield"
    assert {s: len(l[0]) for s, l in lists.items()} == {"train": 62_500, "val": 7_300,
                                                       "test": 36_500}
    counts = np.bincount(lists["train"][1], minlength=365)
    assert counts.max() == 4_980 and counts.min() == 5
    assert np.all(np.bincount(lists["test"][1], minlength=365) == 100)
    sizes = {rule: {g: len(v) for g, v in data.shot_groups(counts, rule).items()}
             for rule in ("release", "oltr")}
    assert sizes["release"] == {"many": 131, "medium": 157, "few": 77}
    assert sizes["oltr"] == {"many": 131, "medium": 163, "few": 71}


def test_imagenet_lt_shipped_eval_lists():
    cfg = _cfg(train_list=os.path.join(split_lists.SHIPPED_SPLIT_DIR, "imagenet_lt",
                                       "ImageNet_LT_val.txt.gz"))  # stand-in train list
    names, lists = list_datasets.load_lists(list_datasets.IMAGENET_LT, cfg)
    assert len(names) == 1000 and names[0] == "tench"
    assert np.all(np.bincount(lists["val"][1], minlength=1000) == 20)
    assert np.all(np.bincount(lists["test"][1], minlength=1000) == 50)


@pytest.mark.parametrize("subdir", ["places_lt", "imagenet_lt", "inaturalist18"])
def test_shipped_lists_equal_shared_lists(subdir, shared_splits):
    shipped = Path(split_lists.SHIPPED_SPLIT_DIR) / subdir
    originals = sorted((shared_splits / subdir).iterdir())
    assert originals
    for original in originals:
        copy = shipped / original.name
        raw = copy.read_bytes() if copy.exists() else gzip.decompress(
            (shipped / (original.name + ".gz")).read_bytes())
        assert raw == original.read_bytes(), original.name


def _stub_root(tmp_path, lists):
    """A root holding only the first file of each split list (what get_source stats)."""
    for paths, _ in lists.values():
        f = tmp_path / paths[0]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"stub")
    return str(tmp_path)


def test_places_lt_source_counts(tmp_path):
    _, lists = list_datasets.load_lists(list_datasets.PLACES_LT, _cfg())
    src = data.get_source(_cfg(root=_stub_root(tmp_path, lists)))
    assert src.num_classes == 365 and len(src.class_names) == 365
    assert src.num_train == 62_500
    assert src.train_counts.dtype == np.int64 and src.train_counts.sum() == 62_500
    assert data.num_eval_examples(src, "val") == 7_300
    assert data.num_eval_examples(src, "test") == 36_500
    assert len(data.shot_groups(src.train_counts, "release")["few"]) == 77
    assert len(src.shot_groups("oltr")["few"]) == 71


def test_missing_root_messages(tmp_path):
    with pytest.raises(DataError, match="data.root is empty"):
        data.get_source(_cfg(root=""))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist.*places365_standard"):
        data.get_source(_cfg(root=missing))
    with pytest.raises(DataError, match=r"train/airfield/00004851\.jpg.*first entry"):
        data.get_source(_cfg(root=str(tmp_path)))


def test_imagenet_lt_train_list_missing_says_where(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt not found.*data\.split_dir"):
        data.get_source(_cfg(name="imagenet_lt", root=str(tmp_path)))


def test_imagenet_lt_train_list_from_split_dir(tmp_path):
    split_dir = tmp_path / "lists"
    split_dir.mkdir()
    lines = [f"train/n{c:08d}/img_{i}.JPEG {c}" for c in range(1000) for i in range(1 + c % 3)]
    (split_dir / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    _, lists = list_datasets.load_lists(list_datasets.IMAGENET_LT, _cfg(split_dir=str(split_dir)))
    src = data.get_source(_cfg(name="imagenet_lt", split_dir=str(split_dir),
                               root=_stub_root(tmp_path / "img", lists)))
    assert src.num_train == len(lines)
    assert src.train_counts.tolist() == [1 + c % 3 for c in range(1000)]
    assert data.num_eval_examples(src, "test") == 50_000


def _write_list(path, rows):
    path.write_text("".join(f"{p} {l}\n" for p, l in rows))
    return str(path)


def test_label_out_of_range_is_reported(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    train = _write_list(tmp_path / "train.txt", [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 3)])
    names = tmp_path / "names.txt"
    names.write_text("zero\none\ntwo\n")
    with pytest.raises(DataError, match=r"label 3 of .*c\.jpg is outside \[0, 3\)"):
        data.get_source(_cfg(name="image_folder", root=str(tmp_path), train_list=train,
                             class_names_file=str(names)))


def test_class_without_training_image_is_reported(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    train = _write_list(tmp_path / "train.txt", [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 3)])
    with pytest.raises(DataError, match=r"1 classes have no training image: 2 \(class_2\)"):
        data.get_source(_cfg(name="image_folder", root=str(tmp_path), train_list=train))


def test_malformed_list_line_names_file_and_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    bad = tmp_path / "train.txt"
    bad.write_text("a.jpg 0\na.jpg zero\n")
    with pytest.raises(DataError, match=r"train\.txt:2: expected"):
        data.get_source(_cfg(name="image_folder", root=str(tmp_path), train_list=str(bad)))


def test_config_checks():
    with pytest.raises(DataError, match="data.name"):
        data.get_source(_cfg(name="mnist_lt"))
    with pytest.raises(DataError, match="image_size"):
        data.get_source(_cfg(image_size=300))
    with pytest.raises(DataError, match="corrupt_images"):
        data.get_source(_cfg(corrupt_images="ignore"))
