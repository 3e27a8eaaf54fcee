"""`image_folder`: a user's own long-tailed data.

Either a tree `root/train/<class>/*.{jpg,jpeg,png}` with `root/val/<class>/*` and/or
`root/test/<class>/*` (classes = sorted folder names of train/), or split lists
(`data.train_list`, `data.val_list`, `data.test_list`) of `<path> <label>` lines
with paths relative to `data.root`, or a prepared directory.
"""

import os

import numpy as np

from lpt_jax import files
from lpt_jax.data import split_lists
from lpt_jax.data.errors import DataError
from lpt_jax.data.list_datasets import (check_first_files, check_root, files_source,
                                        prepared_source, use_prepared)
from lpt_jax.data.source import Source, register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_HINT = ("a folder with train/<class>/*.jpg and val/<class>/* or test/<class>/* "
         "(or set data.train_list / data.val_list / data.test_list)")


def _image_files(folder: str) -> list:
    return sorted(f for f in files.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


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
    lists = {}
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        if not files.isdir(split_dir):
            continue
        paths, labels = [], []
        for c in _subfolders(split_dir):
            if c not in class_ids:
                raise DataError(f"image_folder: class folder {os.path.join(split_dir, c)} has no "
                                f"counterpart in {train_dir}")
            names = _image_files(os.path.join(split_dir, c))
            paths += [f"{split}/{c}/{f}" for f in names]
            labels += [class_ids[c]] * len(names)
        if not paths:
            raise DataError(
                f"image_folder: {split_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images in its "
                f"class folders; data.root should be {_HINT}")
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
            lists[split] = split_lists.parse_split_list(path, num_classes, fix)
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
