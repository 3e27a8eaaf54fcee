"""Datasets defined by split lists + an image root: Places-LT, ImageNet-LT, iNat lists."""

import dataclasses
import os

from lpt_jax.data import prepared, split_lists
from lpt_jax.data.registry import register
from lpt_jax.data.source import Source, SplitData
from lpt_jax.data.stores import FileStore
from lpt_jax.errors import DataError
from lpt_jax.storage import files


@dataclasses.dataclass(frozen=True)
class ListLayout:
    """Where a list-defined dataset's files are and what its root must hold."""
    name: str
    shipped_subdir: str
    list_files: dict  # split -> file name looked up in split_dir, then the shipped lists
    class_names_file: str  # '' = names are the label ids
    num_classes: int
    root_hint: str


def _lists(prefix: str, test: str = "test") -> dict:
    """The OLTR list file names: <prefix>_{train,val,test}.txt."""
    return {"train": f"{prefix}_train.txt", "val": f"{prefix}_val.txt",
            "test": f"{prefix}_{test}.txt"}


PLACES_LT = ListLayout(
    "places_lt", "places_lt", _lists("Places_LT"), "classnames.txt", 365,
    "the places365_standard folder that holds train/<class>/*.jpg and "
    "val/<class>/Places365_val_*.jpg, or a prepared directory")
IMAGENET_LT = ListLayout(
    "imagenet_lt", "imagenet_lt", _lists("ImageNet_LT"), "classnames.txt", 1000,
    "the ImageNet folder that holds train/<wnid>/*.JPEG and the validation images arranged "
    "as val/<wnid>/ILSVRC2012_val_*.JPEG, or a prepared directory")
INATURALIST_LISTS = ListLayout(  # the official val split is the test set
    "inaturalist2018", "inaturalist18", _lists("iNaturalist18", test="val"), "", 8142,
    "the iNaturalist 2018 folder that holds train_val2018/..., or a prepared directory")


def _list_override(cfg, split: str) -> str:
    return {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}[split]


def resolve_list(layout: ListLayout, cfg, split: str) -> str:
    """Path of a split list: explicit override, else data.split_dir, else the shipped copy."""
    override = _list_override(cfg, split)
    if override:
        if not files.exists(override):
            raise DataError(f"{layout.name}: data.{split}_list={override} does not exist")
        return override
    shipped = os.path.join(split_lists.SHIPPED_SPLIT_DIR, layout.shipped_subdir)
    searched = [d for d in (cfg.split_dir, shipped) if d]
    for d in searched:
        path = split_lists.find_list(d, layout.list_files[split])
        if path:
            return path
    raise DataError(
        f"{layout.name}: split list {layout.list_files[split]} not found in {searched}; "
        f"put it in data.split_dir or name it with data.{split}_list "
        f"(the {split} list of this dataset is not shipped with lpt_jax)")


def load_lists(layout: ListLayout, cfg) -> tuple[list, dict]:
    """Class names and {split: (relative paths, labels)}, without touching any image."""
    fix = (f"{layout.name} has {layout.num_classes} classes: is this list from another "
           "dataset? (data.split_dir / data.<split>_list)")
    lists = {split: split_lists.parse_split_list(resolve_list(layout, cfg, split),
                                                 layout.num_classes, fix, root=cfg.root)
             for split in layout.list_files}
    if layout.class_names_file:
        names_dir = cfg.split_dir if cfg.split_dir and split_lists.find_list(
            cfg.split_dir, layout.class_names_file) else os.path.join(
                split_lists.SHIPPED_SPLIT_DIR, layout.shipped_subdir)
        class_names = split_lists.read_class_names(
            split_lists.find_list(names_dir, layout.class_names_file))
    else:
        class_names = [str(c) for c in range(layout.num_classes)]
    if len(class_names) != layout.num_classes:
        raise DataError(f"{layout.name}: {len(class_names)} class names, expected "
                        f"{layout.num_classes}")
    return class_names, lists


def check_root(name: str, root: str, hint: str) -> None:
    if not root:
        raise DataError(f"{name}: data.root is empty; set it to {hint}")
    if not files.exists(root):
        raise DataError(f"{name}: data.root={root} does not exist; expected {hint}")


def check_first_files(name: str, root: str, lists: dict, hint: str) -> None:
    """One stat per split catches a wrong root before training starts."""
    for split, (paths, _) in lists.items():
        first = os.path.join(root, paths[0])
        if not files.exists(first):
            raise DataError(f"{name}: {first} (first entry of the {split} list) does not exist; "
                            f"data.root should be {hint}")


def files_source(name: str, class_names, lists: dict, root: str, origin: str) -> Source:
    splits = {split: SplitData(labels=labels, store=FileStore(root, paths))
              for split, (paths, labels) in lists.items()}
    return Source(name=name, class_names=tuple(class_names), splits=splits, origin=origin)


def prepared_source(name: str, root: str) -> Source:
    class_names, splits, manifest = prepared.load_prepared(root, name)
    return Source(name=name, class_names=tuple(class_names), splits=splits,
                  origin=f"prepared {root} ({manifest.get('origin', '')})")


def use_prepared(cfg) -> bool:
    if cfg.format == "prepared":
        return True
    return cfg.format == "auto" and prepared.is_prepared(cfg.root)


def build_list_source(layout: ListLayout, cfg) -> Source:
    check_root(layout.name, cfg.root, layout.root_hint)
    if use_prepared(cfg):
        return prepared_source(layout.name, cfg.root)
    class_names, lists = load_lists(layout, cfg)
    if cfg.check_files:
        check_first_files(layout.name, cfg.root, lists, layout.root_hint)
    return files_source(layout.name, class_names, lists, cfg.root, origin=f"files under {cfg.root}")


@register("places_lt")
def places_lt(cfg) -> Source:
    return build_list_source(PLACES_LT, cfg)


@register("imagenet_lt")
def imagenet_lt(cfg) -> Source:
    return build_list_source(IMAGENET_LT, cfg)

