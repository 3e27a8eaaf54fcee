"""Inputs that are not what they seem (issue 27, item 8): a FIFO or a device where an image or
the tokenizer is read (reading one blocks forever or never ends), a tokenizer file far too
large to read whole, and symlinks that lead out of data.root. Each is one line naming the
file (and the list line), at once, before anything is read."""

import os
import shutil
import threading
import time

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data  # noqa: E402
from lpt_jax.data import testing  # noqa: E402
from lpt_jax.errors import ConfigError, DataError  # noqa: E402
from lpt_jax.storage import files  # noqa: E402
from lpt_jax.text import head as text_head  # noqa: E402

from helpers import TRAIN_COUNTS, make_image_folder  # noqa: E402

DEV_ZERO = "/dev/zero"
needs_dev_zero = pytest.mark.skipif(not os.path.exists(DEV_ZERO), reason="no /dev/zero")


def _within(seconds, fn, *args):
    """fn(*args), failing the test if it takes longer than `seconds` (a daemon thread: a read
    that would block forever does not hang the test run)."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("edges") / "root")


@pytest.fixture
def folder(pristine, tmp_path):
    """A copy of the image tree this test may change (under tmp_path/root)."""
    return shutil.copytree(pristine, tmp_path / "root", symlinks=True)


def _cfg(root, **kw):
    return testing.image_folder_config(root, **kw)


def _train_list(path, extra_line):
    """A train list of every training image of the tree, with `extra_line` as line 3."""
    rows = [f"train/class_{c}/{i}.png {c}" for c, n in enumerate(TRAIN_COUNTS)
            for i in range(n)]
    rows.insert(2, extra_line)
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# FIFOs and devices: refused before they are opened.

def test_the_seam_refuses_a_fifo_or_a_device_naming_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for read in (files.read_bytes, lambda p: files.open_read(p).close()):
        with pytest.raises(files.NotRegularFileError) as err:
            _within(10, read, str(fifo))
        assert isinstance(err.value, OSError) and err.value.filename == str(fifo)
        assert _one_line(err).startswith(f"{fifo}: a FIFO (named pipe), not a regular file")
    if os.path.exists(DEV_ZERO):
        with pytest.raises(files.NotRegularFileError, match="/dev/zero: a character device"):
            _within(10, files.read_bytes, DEV_ZERO)
    with pytest.raises(IsADirectoryError):
        files.read_bytes(str(tmp_path))
    (tmp_path / "ok").write_bytes(b"fine")
    (tmp_path / "link").symlink_to(tmp_path / "ok")
    assert files.read_bytes(str(tmp_path / "link")) == b"fine"  # a symlink to a file is one


def test_predict_refuses_a_fifo_or_a_device_as_an_image(folder, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = str(folder / "test" / "class_0" / "0.png")
    paths = [fifo] + ([DEV_ZERO] if os.path.exists(DEV_ZERO) else [])
    for bad in paths:
        with pytest.raises(DataError) as err:
            _within(20, data.load_image_files, [good, str(bad)], _cfg(folder))
        msg = _one_line(err)
        assert msg.startswith(f"cannot read image {bad}: a ") and "not a regular file" in msg


@pytest.mark.parametrize("how", ["fifo", "device_symlink"])
def test_a_fifo_or_device_in_the_image_tree_is_refused_naming_it(folder, how):
    bad = folder / "train" / "class_1" / "odd.jpg"
    if how == "fifo":
        os.mkfifo(bad)
    elif os.path.exists(DEV_ZERO):
        bad.symlink_to(DEV_ZERO)  # a symlink out of data.root, and a device
    else:
        pytest.skip("no /dev/zero")
    with pytest.raises(DataError) as err:
        _within(20, data.get_source, _cfg(folder))
    msg = _one_line(err)
    assert msg.startswith(f"image_folder: {bad} "), msg
    assert ("is a FIFO (named pipe), not an image file; replace it" in msg if how == "fifo"
            else f"is a symlink to {DEV_ZERO}, outside data.root" in msg), msg


def test_a_fifo_in_a_split_list_is_refused_with_its_line(folder, tmp_path):
    os.mkfifo(folder / "train" / "class_0" / "pipe.png")
    train = _train_list(tmp_path / "train.txt", "train/class_0/pipe.png 0")
    with pytest.raises(DataError) as err:
        _within(20, data.get_source, _cfg(folder, train_list=str(train)))
    msg = _one_line(err)
    assert msg.startswith(f"{train}:3: 'train/class_0/pipe.png' is a FIFO (named pipe), not an "
                          "image file; replace it with the image file, or remove it"), msg


def test_the_tokenizer_may_not_be_a_fifo_a_device_or_huge(tmp_path):
    fifo = tmp_path / "pipe.model"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.model"
    with open(huge, "wb") as f:  # sparse: no disk space used
        f.truncate(text_head.MAX_TOKENIZER_BYTES + (1 << 20))
    cases = [(fifo, "is a FIFO (named pipe), not a regular file"),
             (huge, "holds 257.0 MiB, more than the 256 MiB read for a SentencePiece model")]
    if os.path.exists(DEV_ZERO):
        cases.append((DEV_ZERO, "is a character device, not a regular file"))
    for path, says in cases:
        with pytest.raises(ConfigError) as err:
            _within(10, text_head.load_tokenizer, str(path))
        msg = _one_line(err)
        assert msg.startswith(f"model.text.tokenizer={str(path)!r} ") and says in msg, msg


# ------------------------------------------------------------------------------------------
# Symlinks out of data.root.

@pytest.fixture
def outside(folder, tmp_path):
    """A folder beside data.root holding one image (as if /etc held a PNG)."""
    out = tmp_path / "outside"
    out.mkdir()
    shutil.copy(folder / "train" / "class_0" / "0.png", out / "secret.png")
    return out


def test_a_list_line_through_a_symlinked_folder_out_of_the_root_is_refused(folder, outside,
                                                                           tmp_path):
    (folder / "train" / "escape").symlink_to(outside, target_is_directory=True)
    train = _train_list(tmp_path / "train.txt", "train/escape/secret.png 0")
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(train)))
    msg = _one_line(err)
    assert msg.startswith(f"{train}:3: 'train/escape/secret.png' leads out of data.root "
                          f"({folder}) through a symlinked folder: its real path is "
                          f"{outside / 'secret.png'}; every image must lie under data.root"), msg


def test_a_list_line_naming_a_file_symlink_out_of_the_root_is_refused(folder, outside,
                                                                      tmp_path):
    (folder / "train" / "class_0" / "x.png").symlink_to(outside / "secret.png")
    train = _train_list(tmp_path / "train.txt", "train/class_0/x.png 0")
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder, train_list=str(train)))
    assert _one_line(err).startswith(f"{train}:3: 'train/class_0/x.png' is a symlink to "
                                     f"{outside / 'secret.png'}, outside data.root ({folder})")


@pytest.mark.parametrize("link", ["file", "class_folder"])
def test_the_tree_walk_refuses_symlinks_out_of_the_root(folder, outside, link):
    if link == "file":
        bad = folder / "train" / "class_2" / "x.png"
        bad.symlink_to(outside / "secret.png")
        says = f"image_folder: {bad} is a symlink to {outside / 'secret.png'}, outside data.root"
    else:  # a whole class folder of the val split lives elsewhere
        shutil.rmtree(folder / "val" / "class_3")
        (folder / "val" / "class_3").symlink_to(outside, target_is_directory=True)
        says = (f"image_folder: {folder / 'val' / 'class_3' / 'secret.png'} leads out of "
                f"data.root ({folder}) through a symlinked folder")
    with pytest.raises(DataError) as err:
        data.get_source(_cfg(folder))
    assert _one_line(err).startswith(says), str(err.value)


def test_symlinks_inside_the_root_and_a_symlinked_root_are_read(folder, tmp_path):
    """What stays inside data.root's real path is fine: a file or a folder linked within the
    tree, and data.root itself given as a symlink."""
    (folder / "train" / "class_3" / "again.png").symlink_to(folder / "train" / "class_0" / "0.png")
    (folder / "shared").mkdir()
    shutil.move(folder / "val" / "class_1", folder / "shared" / "class_1")
    (folder / "val" / "class_1").symlink_to(folder / "shared" / "class_1")
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    t0 = time.time()
    src = data.get_source(_cfg(str(tmp_path / "alias")))
    assert src.num_train == sum(TRAIN_COUNTS) + 1 and len(src.splits["val"]) == 16
    assert time.time() - t0 < 10
    train = _train_list(tmp_path / "train.txt", "train/class_3/again.png 3")
    assert data.get_source(_cfg(folder, train_list=str(train))).num_train == sum(TRAIN_COUNTS) + 1
