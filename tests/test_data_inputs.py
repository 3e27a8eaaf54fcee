"""Bad or unusual training data is refused when the source is built (one line naming the
file and what to do), never halfway through a run; and the identity of the training data
that a resume compares."""

import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data  # noqa: E402
from lpt_jax.data import prepare, split_lists, testing  # noqa: E402
from lpt_jax.errors import DataError

from helpers import TRAIN_COUNTS, make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("inputs"))


def _cfg(root, **kw):
    return testing.image_folder_config(root, **kw)


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------
# (a) Split-list paths stay under data.root.

def _lists(root, tmp_path, extra_line=""):
    src = data.get_source(_cfg(root))
    rows = [f"{os.path.relpath(src.splits['train'].store.describe(i), root)} "
            f"{src.splits['train'].labels[i]}" for i in range(src.num_train)]
    rows.insert(2, extra_line) if extra_line else None
    path = tmp_path / "train.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("line,why", [
    ("../../../etc/passwd 0", "climbs out of data.root"),
    ("train/class_0/../../../secret.png 1", "climbs out of data.root"),
    ("/etc/passwd 0", "an absolute path"),
    ("gs://other-bucket/x.jpg 0", "an absolute path"),
])
def test_list_path_outside_the_root_is_refused_with_its_line(folder, tmp_path, line, why):
    train = _lists(folder, tmp_path, line)
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(train), check_files=False))
    msg = _one_line(err)
    assert msg.startswith(f"{train}:3: {line.rsplit(' ', 1)[0]!r} is ")
    assert why in msg and "fix or remove that line" in msg


def test_list_paths_inside_the_root_are_accepted(folder, tmp_path):
    train = _lists(folder, tmp_path, "train/class_1/../class_0/./0.png 0")
    src = data.get_source(_cfg(folder, train_list=str(train)))
    assert src.num_train == sum(TRAIN_COUNTS) + 1
    assert split_lists.check_relative("a/b/../c.jpg") == ""
    assert split_lists.check_relative("..foo/x.jpg") == ""  # a name, not a climb
    assert "absolute" in split_lists.check_relative("C:\\data\\x.jpg")


# ------------------------------------------------------------------------------------------
# (b) image_folder reads every format tf.io.decode_image decodes, refuses other files.

@pytest.fixture
def mixed_folder(folder, tmp_path):
    """The folder, with a BMP, a GIF and a WebP image added to the rarest class (3 images),
    and macOS / Finder debris that must be ignored."""
    from PIL import Image
    root = tmp_path / "mixed"
    shutil.copytree(folder, root)
    cls = root / "train" / "class_3"
    pixels = np.asarray(Image.open(cls / "0.png").convert("RGB"))
    for fmt in ("bmp", "gif", "webp"):
        Image.fromarray(pixels).save(cls / f"extra.{fmt.upper()}")  # upper case: still read
    (cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cls / "._0.png").write_bytes(b"\0\5\26\7")  # an AppleDouble file, not a PNG
    return root


def test_bmp_gif_webp_are_read(mixed_folder):
    cfg = _cfg(mixed_folder)
    src = data.get_source(cfg)
    assert src.train_counts.tolist() == [*TRAIN_COUNTS[:3], TRAIN_COUNTS[3] + 3]
    names = [src.splits["train"].store.describe(i) for i in range(src.num_train)]
    extra = [i for i, n in enumerate(names) if "extra." in n]
    assert len(extra) == 3
    stream = data.make_train_stream(src, cfg, 16, seed=0)
    seen = set()
    for _ in range(6):  # class 3 is visited every step: its 6 images come up quickly
        batch = next(stream)
        assert np.isfinite(batch["cb"]["image"]).all()
        seen |= set(stream.local_indices(stream.step - 1)[0].tolist()) & set(extra)
    stream.close()
    assert seen == set(extra)
    pixels = data.load_image_files([n for n in names if "extra." in n or n.endswith("3/0.png")],
                                   cfg)
    # BMP and GIF (palette of a flat noisy patch: lossy) decode to about the same image.
    assert np.abs(pixels[1:] - pixels[:1]).mean() < 0.1


def test_files_of_other_types_are_refused_with_count_and_accepted_extensions(folder, tmp_path):
    root = tmp_path / "tif"
    shutil.copytree(folder, root)
    (root / "train" / "class_0" / "scan.tif").write_bytes(b"II*\0")
    (root / "train" / "class_2" / "notes.txt").write_text("photographer: me")
    (root / "train" / "class_2" / "nested").mkdir()  # a subfolder is not a file of the class
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(root))
    msg = _one_line(err)
    assert msg.startswith(f"image_folder: 2 files in the class folders of {root}/train are not "
                          "images this reader decodes (.tif, .txt), e.g. ")
    assert f"{root}/train/class_0/scan.tif" in msg
    assert "accepted: .jpg .jpeg .png .bmp .gif .webp" in msg


# ------------------------------------------------------------------------------------------
# (c) The identity of the training data.

def test_identity_names_the_training_data_not_its_path(folder, tmp_path):
    src = data.get_source(_cfg(folder))
    ident = src.identity()
    assert json.loads(json.dumps(ident)) == ident
    counts = json.dumps(list(TRAIN_COUNTS)).encode()  # "[24, 12, 6, 3]"
    names = json.dumps([f"class_{c}" for c in range(4)]).encode()
    assert {k: v for k, v in ident.items() if k != "train_content_sha256"} == {
        "name": "image_folder", "num_classes": 4, "num_train": sum(TRAIN_COUNTS),
        "train_counts_sha256": hashlib.sha256(counts).hexdigest(),
        "class_names_sha256": hashlib.sha256(names).hexdigest()}
    assert len(ident["train_content_sha256"]) == 64
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert data.get_source(_cfg(moved)).identity() == ident  # a clone at another path
    # An image replaced under its own name (other bytes, other size): only the content differs.
    replaced = moved / "train" / "class_0" / "0.png"
    replaced.write_bytes(replaced.read_bytes() + b"\0" * 7)
    swapped = data.get_source(_cfg(moved)).identity()
    assert swapped["train_content_sha256"] != ident["train_content_sha256"]
    assert {k: v for k, v in swapped.items() if k != "train_content_sha256"} == {
        k: v for k, v in ident.items() if k != "train_content_sha256"}
    shutil.copy(moved / "train" / "class_3" / "0.png", moved / "train" / "class_3" / "new.png")
    grown = data.get_source(_cfg(moved)).identity()
    assert grown["num_train"] == ident["num_train"] + 1
    assert grown["train_counts_sha256"] != ident["train_counts_sha256"]
    (moved / "train" / "class_3").rename(moved / "train" / "class_9")
    (moved / "val" / "class_3").rename(moved / "val" / "class_9")
    (moved / "test" / "class_3").rename(moved / "test" / "class_9")
    renamed = data.get_source(_cfg(moved)).identity()
    assert renamed["class_names_sha256"] != ident["class_names_sha256"]
    assert renamed["train_counts_sha256"] == grown["train_counts_sha256"]


# ------------------------------------------------------------------------------------------
# 5. Damaged inputs: one line naming the file, never a traceback.

def test_damaged_list_files_are_one_line_errors(folder, tmp_path):
    binary = tmp_path / "train.txt"
    binary.write_bytes(b"train/class_0/0.png 0\ntrain/class_0/1.png 0\n\xff\xfe\x00junk 1\n")
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(binary)))
    assert _one_line(err).startswith(f"{binary}:3: not UTF-8 text")
    bad_gz = tmp_path / "train.txt.gz"
    bad_gz.write_bytes(gzip.compress(b"train/class_0/0.png 0\n" * 50)[:40])
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(bad_gz)))
    assert _one_line(err).startswith(f"{bad_gz} is not a readable gzip file")
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(tmp_path)))
    assert _one_line(err) == f"{tmp_path} is a folder, not a text file"


def test_unreadable_folder_is_a_one_line_error(folder, monkeypatch):
    from lpt_jax.storage import files

    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(files, "listdir", denied)
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder))
    assert _one_line(err) == (f"image_folder: cannot read {folder}/train: Permission denied; "
                              "check the path and its permissions (or credentials, for a "
                              "bucket)")


def test_damaged_prepared_directory_is_a_one_line_error(folder, tmp_path):
    out = tmp_path / "prepared"
    assert prepare.main(["--name=image_folder", f"--root={folder}", f"--out={out}"]) == 0
    manifest = out / "lpt_prepared.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])  # half-written
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(out))
    assert _one_line(err).startswith(f"{manifest} is not readable JSON (")
    entry = json.loads(good)
    del entry["splits"]["train"]["labels"]
    manifest.write_text(json.dumps(entry))
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(out))
    assert _one_line(err) == f"{manifest} lacks splits.train.labels; prepare the directory again"
    manifest.write_text(good)
    shard = sorted(out.glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated copy
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(out))
    assert _one_line(err).startswith(f"prepared split 'train' in {out}: a shard cannot be read (")


def test_prepare_lists_unreadable_images_on_one_line(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    bad = sorted((broken / "train" / "class_0").glob("*.png"))[:5]
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert prepare.main(["--name=image_folder", f"--root={broken}", f"--out={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: 5 unreadable images in the train split: ")
    assert f"{bad[0]}, " in err and "and 2 more" in err and "--on_corrupt=skip" in err
