"""iNaturalist 2018: TFDS `i_naturalist2018` by random access, or image files + lists.

With `data.root` empty, images come from TFDS through `tfds.data_source`
(random access to ArrayRecord files), which the class-aware sampler needs:
437k images do not fit in host RAM as the small datasets do, and a sequential
TFRecord stream cannot serve per-class draws. A TFDS copy built as TFRecord is
converted once with `tfds convert_format` (see the error message). ArrayRecord
is read from local disk (or a mounted bucket), not from gs:// URLs. Labels are
scanned once (one read of the split) and cached as .npy in `data.cache_dir`.

With `data.root` set, the source reads image files (or a prepared directory)
with the official lists in the OLTR format: the val list is shipped, the train
list (`iNaturalist18_train.txt`) goes in `data.split_dir`. The paper's test set
is the official val split, so 'val' and 'test' are the same images.
"""

import io
import logging
import os

import numpy as np

from lpt_jax.data._tf import tf
from lpt_jax.data.list_datasets import INATURALIST_LISTS, build_list_source
from lpt_jax.data.registry import register
from lpt_jax.data.source import Source, SplitData
from lpt_jax.data.stores import RandomAccessStore
from lpt_jax.data.tfds_util import open_dataset, tfds
from lpt_jax.errors import DataError
from lpt_jax.storage import files

log = logging.getLogger(__name__)

TFDS_SPLITS = {"train": "train", "val": "validation", "test": "validation"}
_SCAN_CHUNK = 1024


def _open(cfg, name: str, split: str):
    def open_fn():
        try:
            return tfds.data_source(name, split=split, data_dir=cfg.tfds_data_dir or None,
                                    download=False,
                                    decoders={"image": tfds.decode.SkipDecoding()})
        except NotImplementedError as e:  # prepared as TFRecord: no random access
            raise DataError(
                f"TFDS {name!r} in {cfg.tfds_data_dir or 'the default TFDS data dir'} is not "
                "in a random-access format; convert it once with `tfds convert_format "
                f"--dataset_dir=<data_dir>/{name}/<version> --out_file_format=array_record` "
                f"(or rebuild with `tfds build {name} --file_format=array_record`)") from e
    return open_dataset(cfg, name, split, open_fn)


_GCS_HINT = ("ArrayRecord files cannot be read from gs:// directly: copy the TFDS folder to "
             "local disk (or mount the bucket, e.g. with gcsfuse) and point data.tfds_data_dir "
             "there")


def _cache_path(cfg, name: str, split: str, n: int) -> str:
    tfds_dir = (cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
                or os.path.expanduser("~/tensorflow_datasets"))
    base = cfg.cache_dir or os.path.join(tfds_dir, "lpt_jax_cache")
    return os.path.join(base, f"{name}-{split}-{n}-labels.npy")


def scan_labels(store: RandomAccessStore, cache_path: str) -> np.ndarray:
    """All labels of a random-access split, read once and cached."""
    if files.exists(cache_path):
        try:
            labels = np.load(io.BytesIO(files.read_bytes(cache_path)), allow_pickle=False)
            if labels.ndim == 1 and len(labels) == len(store):
                return labels.astype(np.int64)
        except (ValueError, OSError, EOFError) as e:  # a damaged cache: scan again
            log.warning("label cache %s is unreadable (%s); scanning again", cache_path, e)
    log.info("scanning %d labels for %s (once; cached at %s)", len(store), cache_path, cache_path)
    labels = np.empty(len(store), dtype=np.int64)
    for start in range(0, len(store), _SCAN_CHUNK):
        chunk = range(start, min(start + _SCAN_CHUNK, len(store)))
        labels[start:chunk.stop] = [int(np.asarray(r["label"])) for r in store.read_records(chunk)]
    try:
        buf = io.BytesIO()
        np.save(buf, labels)
        files.write_bytes(cache_path, buf.getvalue())  # atomic: never half a cache
    except (tf.errors.OpError, OSError) as e:
        log.warning("could not cache labels at %s: %s", cache_path, e)
    return labels


def tfds_source(cfg) -> Source:
    name = cfg.tfds_name or "i_naturalist2018"
    splits, opened = {}, {}
    for split, tfds_split in TFDS_SPLITS.items():
        if tfds_split not in opened:
            records = _open(cfg, name, tfds_split)
            store = RandomAccessStore(records, "image", f"{name}[{tfds_split}]")
            try:
                labels = scan_labels(store, _cache_path(cfg, name, tfds_split, len(store)))
            except RuntimeError as e:  # array_record's reader fails on open
                hint = _GCS_HINT if files.is_remote(cfg.tfds_data_dir or "") else "see the cause"
                raise DataError(f"cannot read {name}[{tfds_split}] records: {e}; {hint}") from e
            opened[tfds_split] = SplitData(labels=labels, store=store)
        splits[split] = opened[tfds_split]
    class_names = tuple(tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
                        .info.features["label"].names)
    return Source(name="inaturalist2018", class_names=class_names, splits=splits,
                  origin=f"TFDS {name} (random access)")


@register("inaturalist2018")
def inaturalist2018(cfg) -> Source:
    if cfg.root:
        return build_list_source(INATURALIST_LISTS, cfg)
    return tfds_source(cfg)
