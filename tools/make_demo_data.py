#!/usr/bin/env python3
"""Builds the demo's long-tailed dataset from the CIFAR-10 JPEG archive.

    python tools/make_demo_data.py                        # -> demo/cifar10_lt6 (shipped)
    python tools/make_demo_data.py --test_per_class=1000 --out=/tmp/lt6_full   # bigger test set

The 10 CIFAR-10 classes are split in two disjoint halves:
  * pretraining classes (airplane, automobile, bird, cat): only used by
    tools/pretrain_demo_backbone.py, never written here;
  * target classes (deer, dog, frog, horse, ship, truck): a long-tailed train split with
    400/200/90/45/20/10 images (alphabetical order; each count about half the previous, an
    exponential profile, imbalance ratio 40), a balanced val split (20 per class) and a
    balanced test split (200 per class by default), as image_folder trees.

JPEG bytes are copied unchanged (no re-encoding). The selection is a pure function of the
archive and --seed: the same train/val images are chosen whatever --test_per_class is, so a
bigger test set keeps the demo's training split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "images" / "cifar10-jpg.tar.gz"
DEFAULT_OUT = REPO / "demo" / "cifar10_lt6"

PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat")
TARGET_CLASSES = ("deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_COUNTS = (400, 200, 90, 45, 20, 10)   # release rule: many 2 / medium 2 / few 2
VAL_PER_CLASS = 20
TEST_PER_CLASS = 200
SEED = 0


def archive_members(archive: str) -> dict[tuple[str, str], list[str]]:
    """{(split, class): sorted member names} of the archive's `split/class/NNNN.jpg` files."""
    index: dict[tuple[str, str], list[str]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.strip("./").split("/")
            if m.isfile() and len(parts) == 3 and parts[2].lower().endswith(".jpg"):
                index.setdefault((parts[0], parts[1]), []).append(m.name)
    return {k: sorted(v) for k, v in index.items()}


def select_files(index: dict, *, seed: int = SEED, train_counts=TRAIN_COUNTS,
                 val_per_class: int = VAL_PER_CLASS,
                 test_per_class: int = TEST_PER_CLASS) -> dict[str, dict[str, list[str]]]:
    """{split: {class: member names}} for the target classes.

    Train and val come from one shuffle of each class's train images (train first, then the
    next val_per_class), test from a separate shuffle of its test images.
    """
    out: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}}
    for c, (name, n) in enumerate(zip(TARGET_CLASSES, train_counts)):
        rng = np.random.default_rng([seed, c])
        pool = [index[("train", name)][i] for i in rng.permutation(len(index[("train", name)]))]
        if n + val_per_class > len(pool):
            raise ValueError(f"{name}: {n} train + {val_per_class} val > {len(pool)} images")
        out["train"][name] = pool[:n]
        out["val"][name] = pool[n:n + val_per_class]
        test = index[("test", name)]
        if test_per_class > len(test):
            raise ValueError(f"{name}: {test_per_class} test images asked, {len(test)} exist")
        order = np.random.default_rng([seed, c, 1]).permutation(len(test))
        out["test"][name] = [test[i] for i in order[:test_per_class]]
    return out


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tree(archive: str, selection: dict, out: Path) -> int:
    """Copies the selected JPEG bytes to out/<split>/<class>/<split>_<NNNN>.jpg; returns bytes."""
    wanted = {m: (split, c) for split, classes in selection.items()
              for c, members in classes.items() for m in members}
    total = 0
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if m.name not in wanted:
                continue
            split, c = wanted[m.name]
            data = tar.extractfile(m).read()
            # Keep the archive's split in the name: val images come from CIFAR's train split.
            src_split = m.name.strip("./").split("/")[0]
            dest = out / split / c / f"{src_split}_{os.path.basename(m.name)}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            total += len(data)
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=str(DEFAULT_ARCHIVE))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--test_per_class", type=int, default=TEST_PER_CLASS)
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it first (the tree must hold only the "
                         "selected images)")
    index = archive_members(args.archive)
    selection = select_files(index, seed=args.seed, test_per_class=args.test_per_class)
    nbytes = write_tree(args.archive, selection, out)
    manifest = {
        "source": "CIFAR-10 (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html), "
                  "as the JPEG archive cifar10-jpg.tar.gz (train/<class>/NNNN.jpg, "
                  "test/<class>/NNNN.jpg); JPEG bytes copied unchanged",
        "archive": os.path.basename(args.archive),
        "archive_sha256": sha256(args.archive),
        "generator": "tools/make_demo_data.py",
        "seed": args.seed,
        "pretrain_classes_excluded": list(PRETRAIN_CLASSES),
        "classes": list(TARGET_CLASSES),
        "counts": {split: {c: len(v) for c, v in classes.items()}
                   for split, classes in selection.items()},
        "archive_members": {split: {c: sorted(m.strip("./") for m in v)
                          for c, v in classes.items()} for split, classes in selection.items()},
        "bytes": nbytes,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    counts = {s: sum(v.values()) for s, v in manifest["counts"].items()}
    print(f"wrote {out}: {counts} images, {nbytes / 1e6:.2f} MB of JPEG")


if __name__ == "__main__":
    main()
