"""A data source: class names, splits (labels + image store) and derived counts."""

import dataclasses
import functools
import hashlib
import json

import numpy as np

from lpt_jax.data import registry
from lpt_jax.data.config import check_config
from lpt_jax.data.groups import shot_groups
from lpt_jax.errors import DataError, Setting


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split: int64 labels and the store that reads its images by index."""
    labels: np.ndarray
    store: object

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Source:
    """What every dataset exposes; `train_counts` is the one source of truth for counts."""
    name: str
    class_names: tuple
    splits: dict  # 'train' | 'val' | 'test' -> SplitData
    origin: str = ""  # one line: where the images were read from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def train_counts(self) -> np.ndarray:
        counts = np.bincount(self.splits["train"].labels, minlength=self.num_classes)
        counts = counts.astype(np.int64)
        counts.flags.writeable = False
        return counts

    @property
    def num_train(self) -> int:
        return len(self.splits["train"])

    def identity(self) -> dict:
        """What identifies the training data, whatever its path: a small JSON-able dict to
        record with a run and compare on resume (a folder that grew, another subset, other
        class names or order all differ here).

        The hashes are sha256 hex digests of `json.dumps` of the list of per-class training
        counts (ints) and of the list of class names (strs), with json's default separators;
        `train_content_sha256` digests the training images themselves where the store can do
        so cheaply (file sizes of a local folder, the packed sizes of a prepared directory, the
        pixels of an in-memory set): images replaced under the same names differ there.
        """
        def sha(values: list) -> str:
            return hashlib.sha256(json.dumps(values).encode("utf-8")).hexdigest()
        out = {"name": self.name, "num_classes": int(self.num_classes),
               "num_train": int(self.num_train),
               "train_counts_sha256": sha([int(c) for c in self.train_counts]),
               "class_names_sha256": sha([str(n) for n in self.class_names])}
        digest = getattr(self.splits["train"].store, "content_digest", lambda: None)()
        if digest is not None:
            out["train_content_sha256"] = digest
        return out

    def shot_groups(self, rule: str = "release") -> dict:
        """'many' | 'medium' | 'few' -> class ids, from `train_counts` (see groups.py)."""
        return shot_groups(self.train_counts, rule)

    def split(self, name: str) -> SplitData:
        if name not in self.splits:
            hint = (("set ", Setting("eval.final_split", "test"), " (training skips validation "
                     "where there is no 'val' split)")
                    if name == "val" and "test" in self.splits else ())
            raise DataError(f"{self.name} has no {name!r} split; it has {sorted(self.splits)}",
                            hint=hint)
        return self.splits[name]


def validate_source(src: Source) -> Source:
    """Checks labels in [0, C) in every split and no class without training images."""
    if "train" not in src.splits:
        raise DataError(f"{src.name}: no training split")
    c = src.num_classes
    if c < 2:
        raise DataError(f"{src.name}: {c} classes; a classifier needs at least 2")
    for name, split in src.splits.items():
        labels = split.labels
        if len(labels) != len(split.store):
            raise DataError(
                f"{src.name}[{name}]: {len(labels)} labels but {len(split.store)} images")
        bad = np.flatnonzero((labels < 0) | (labels >= c))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{src.name}[{name}]: label {int(labels[i])} of {split.store.describe(i)} is "
                f"outside [0, {c}) ({bad.size} such labels); check the split list or "
                "data.num_classes")
    empty = np.flatnonzero(src.train_counts == 0)
    if empty.size:
        shown = ", ".join(f"{int(k)} ({src.class_names[k]})" for k in empty[:5])
        raise DataError(
            f"{src.name}: {empty.size} classes have no training image: {shown}"
            f"{' ...' if empty.size > 5 else ''}; every class needs at least one: add training "
            "images or remove the class")
    return src


def get_source(cfg) -> Source:
    """Builds and validates the source named by `cfg.name`; raises DataError."""
    check_config(cfg)
    try:
        src = registry.builder(cfg.name)(cfg)
    except OSError as e:  # a folder, file or bucket that cannot be read
        where = f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else str(e)
        raise DataError(f"{cfg.name}: cannot read {where}; check the path and its permissions "
                        "(or credentials, for a bucket)") from e
    return validate_source(src)
