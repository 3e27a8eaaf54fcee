"""`image_folder`: a user's own long-tailed data.

Either a tree `root/train/<class>/<image>` with `root/val/<class>/*` and/or
`root/test/<class>/*` (classes = sorted folder names of train/), or split lists
(`data.train_list`, `data.val_list`, `data.test_list`) of `<path> <label>` lines
with paths relative to `data.root`, or a prepared directory.

In a tree, every file of a class folder is read: JPEG, PNG, BMP, GIF (first frame) and
WebP, by extension (`IMAGE_EXTENSIONS`, what `tf.io.decode_image` decodes). Any other file
there (e.g. `.tif`, `.txt`) stops the source with a DataError naming how many there are and
one of them, rather than being left out without a word; hidden files (`.DS_Store`, `._x`)
and subfolders of a class folder are ignored. Under a local root, an image that is a symlink
leading out of data.root (or sits in a class folder that is one), or that is not a regular
file (a FIFO, a device), is a DataError naming it (local_images.py).
"""

import os

import numpy as np

from lpt_jax.data import split_lists
from lpt_jax.data.list_datasets import (
    check_first_files,
    check_root,
    files_source,
    prepared_source,
    use_prepared,
)
from lpt_jax.data.local_images import RootCheck
from lpt_jax.data.registry import register
from lpt_jax.data.source import Source
from lpt_jax.errors import DataError
from lpt_jax.storage import files

# What tf.io.decode_image (so preprocess.decode_rgb) reads; JPEG takes the fast crop path.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_HINT = ("a folder with train/<class>/*.jpg and val/<class>/* or test/<class>/* "
         "(or set data.train_list / data.val_list / data.test_list)")


def _class_files(folder: str) -> tuple[list, list]:
    """(image files, other files) of a class folder, sorted; hidden files and subfolders
    are ignored (one stat per non-image name only: a bucket lists fast, stats slowly)."""
    images, other = [], []
    for f in files.listdir(folder):
        if f.startswith("."):  # .DS_Store, macOS's ._<image> resource forks
            continue
        if f.lower().endswith(IMAGE_EXTENSIONS):
            images.append(f)
        elif not files.isdir(os.path.join(folder, f)):
            other.append(f)
    return sorted(images), sorted(other)


def _subfolders(folder: str) -> list:
    """Sorted names of the folders in `folder`: the class order, so class ids, follow it."""
    return sorted(d for d in files.listdir(folder) if files.isdir(os.path.join(folder, d)))


def scan_tree(root: str) -> tuple[list, dict]:
    """Class names and {split: (relative paths, labels)} of a class-folder tree."""
    train_dir = os.path.join(root, "train")
    if not files.isdir(train_dir):
        raise DataError(f"image_folder: {train_dir} does not exist; data.root should be {_HINT}")
    class_names = _subfolders(train_dir)
    if not class_names:
        raise DataError(f"image_folder: {train_dir} has no class folders; data.root should be "
                        f"{_HINT}")
    class_ids = {c: i for i, c in enumerate(class_names)}
    check = RootCheck(root)  # local root: no symlink out of it, no FIFO or device
    lists = {}
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        if not files.isdir(split_dir):
            continue
        paths, labels, unread = [], [], []
        for c in _subfolders(split_dir):
            if c not in class_ids:
                raise DataError(f"image_folder: class folder {os.path.join(split_dir, c)} has no "
                                f"counterpart in {train_dir}")
            names, other = _class_files(os.path.join(split_dir, c))
            name, problem = check.first_problem(f"{split}/{c}", names)
            if problem:
                raise DataError(f"image_folder: {os.path.join(split_dir, c, name)} {problem}")
            paths += [f"{split}/{c}/{f}" for f in names]
            labels += [class_ids[c]] * len(names)
            unread += [f"{split}/{c}/{f}" for f in other]
        if unread:
            kinds = sorted({os.path.splitext(f)[1].lower() or "no extension" for f in unread})
            raise DataError(
                f"image_folder: {len(unread)} files in the class folders of {split_dir} are "
                f"not images this reader decodes ({', '.join(kinds[:5])}), e.g. "
                f"{os.path.join(root, unread[0])}; accepted: {' '.join(IMAGE_EXTENSIONS)}: "
                "convert them, or move them out of the class folders")
        if not paths:
            raise DataError(
                f"image_folder: {split_dir} holds no {'/'.join(IMAGE_EXTENSIONS[:3])} images "
                f"(nor {'/'.join(IMAGE_EXTENSIONS[3:])}) in its class folders; data.root should "
                f"be {_HINT}")
        lists[split] = (np.array(paths, dtype=object), np.array(labels, dtype=np.int64))
    return class_names, lists


def read_lists(cfg) -> tuple[list, dict]:
    """Class names and lists from data.train_list / val_list / test_list."""
    if not cfg.train_list:
        raise DataError("image_folder with split lists needs data.train_list")
    class_names = (split_lists.read_class_names(cfg.class_names_file)
                   if cfg.class_names_file else None)
    if class_names is not None:
        num_classes, fix = len(class_names), (
            f"fix the label, or name the class in data.class_names_file={cfg.class_names_file} "
            f"(it names {len(class_names)})")
    else:
        num_classes, fix = cfg.num_classes, (
            f"fix the label, or raise data.num_classes (now {cfg.num_classes})")
    lists = {}
    for split, path in (("train", cfg.train_list), ("val", cfg.val_list), ("test", cfg.test_list)):
        if path:
            if not files.exists(path):
                raise DataError(f"image_folder: data.{split}_list={path} does not exist")
            lists[split] = split_lists.parse_split_list(path, num_classes, fix, root=cfg.root)
    if class_names is None:
        c = cfg.num_classes or 1 + max(int(labels.max()) for _, labels in lists.values())
        class_names = [f"class_{i}" for i in range(c)]
    return class_names, lists


@register("image_folder")
def image_folder(cfg) -> Source:
    check_root("image_folder", cfg.root, _HINT)
    if use_prepared(cfg):
        return prepared_source("image_folder", cfg.root)
    if cfg.train_list or cfg.val_list or cfg.test_list:
        class_names, lists = read_lists(cfg)
        if cfg.check_files:
            check_first_files("image_folder", cfg.root, lists,
                              "the folder the list paths start from")
    else:
        class_names, lists = scan_tree(cfg.root)
    return files_source("image_folder", class_names, lists, cfg.root,
                        origin=f"files under {cfg.root}")
