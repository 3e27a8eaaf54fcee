"""The prepared format: a split's images packed in a few large TFRecord shards.

A pod host then reads a handful of large files once (sequential, GCS-friendly)
and keeps the encoded images in RAM, instead of opening every small image file
every epoch. Layout of a prepared directory (local or gs://):

  lpt_prepared.json            manifest: name, class names, per split: shard files,
                               labels and byte sizes (in example order)
  <split>-NNNNN.tfrecord       tf.train.Example {image: bytes, label: int64,
                               index: int64, path: bytes}

Write one with `python -m lpt_jax.data.prepare` (see prepare.py). RAM per host is
the size of the encoded images (Places-LT train ~1.3 GB at 256 px).
"""

import json
import os

import numpy as np

from lpt_jax.data._tf import tf
from lpt_jax.data.source import SplitData
from lpt_jax.data.stores import BytesStore
from lpt_jax.data.tf_errors import first_line
from lpt_jax.errors import DataError
from lpt_jax.storage import files

MANIFEST = "lpt_prepared.json"
FORMAT_VERSION = "lpt_jax.prepared.v1"
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "index": tf.io.FixedLenFeature([], tf.int64),
    "path": tf.io.FixedLenFeature([], tf.string),
}


def is_prepared(root: str) -> bool:
    return bool(root) and files.exists(os.path.join(root, MANIFEST))


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not files.exists(path):
        raise DataError(f"no prepared data at {root}: expected {path} "
                        "(write it with `python -m lpt_jax.data.prepare`)")
    try:
        manifest = json.loads(files.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:  # half-written or damaged
        raise DataError(f"{path} is not readable JSON ({e}); prepare the directory again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format {found!r}, expected {FORMAT_VERSION!r}")
    missing = [k for k in ("name", "class_names", "splits") if k not in manifest]
    missing += [f"splits.{name}.{k}" for name, entry in manifest.get("splits", {}).items()
                for k in ("files", "labels", "num_bytes") if k not in entry]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing[:4])}; prepare the directory again")
    return manifest


def _load_split(root: str, name: str, entry: dict) -> SplitData:
    labels = np.asarray(entry["labels"], dtype=np.int64)
    sizes = np.asarray(entry["num_bytes"], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
    names = np.empty(len(labels), dtype=object)
    seen = np.zeros(len(labels), dtype=bool)
    shards = [os.path.join(root, f) for f in entry["files"]]
    for f in shards:
        if not files.exists(f):
            raise DataError(f"prepared split {name!r}: shard {f} listed in {MANIFEST} is missing")
    ds = tf.data.TFRecordDataset(shards, num_parallel_reads=min(16, len(shards)))
    ds = ds.batch(1024).map(lambda x: tf.io.parse_example(x, FEATURES))
    try:
        _fill(ds, root, name, labels, sizes, offsets, buffer, names, seen)
    except tf.errors.OpError as e:  # a truncated or damaged shard
        raise DataError(f"prepared split {name!r} in {root}: a shard cannot be read "
                        f"({first_line(e)}); prepare the directory again") from None
    if not seen.all():
        raise DataError(f"prepared split {name!r} in {root}: {int((~seen).sum())} records missing")
    return SplitData(labels=labels, store=BytesStore(buffer, offsets, names))


def _fill(ds, root, name, labels, sizes, offsets, buffer, names, seen) -> None:
    """Copies the records of `ds` into the split's buffer, checking them against the
    manifest."""
    for batch in ds.prefetch(2).as_numpy_iterator():
        for image, label, i, path in zip(batch["image"], batch["label"], batch["index"],
                                         batch["path"]):
            if not 0 <= i < len(labels) or seen[i] or len(image) != sizes[i] or label != labels[i]:
                raise DataError(
                    f"prepared split {name!r} in {root}: record {i} ({path!r}) does not "
                    f"match {MANIFEST}; prepare the directory again")
            buffer[offsets[i]:offsets[i + 1]] = np.frombuffer(image, dtype=np.uint8)
            names[i] = f"{path.decode('utf-8')} (prepared {name} record {i} in {root})"
            seen[i] = True


def load_prepared(root: str, expected_name: str) -> tuple[list, dict, dict]:
    """Reads a prepared directory.

    Returns
    -------
    class_names, {split: SplitData}, manifest
    """
    manifest = read_manifest(root)
    if manifest["name"] != expected_name:
        raise DataError(f"{root} holds prepared {manifest['name']!r} data, not {expected_name!r}")
    splits = {name: _load_split(root, name, entry) for name, entry in manifest["splits"].items()}
    return list(manifest["class_names"]), splits, manifest
