"""Write the prepared format: `python -m lpt_jax.data.prepare --name=places_lt
--root=/data/places365_standard --out=gs://bucket/places_lt_prepared`.

Reads every listed image once (in parallel; local or gs://), checks that it
decodes, optionally re-encodes images whose shorter side exceeds
`--resize_shorter` as JPEG, and packs each split into ~`--shard_mb` MB TFRecord
shards plus a `lpt_prepared.json` manifest written last. Point `data.root` at
the output directory; `data.format='auto'` picks it up.
"""

import argparse
import json
import os
import sys

import numpy as np

from lpt_jax.data import preprocess
from lpt_jax.data._tf import tf
from lpt_jax.data.config import default_config
from lpt_jax.data.prepared import FORMAT_VERSION, MANIFEST
from lpt_jax.data.source import get_source
from lpt_jax.data.tf_errors import first_line
from lpt_jax.errors import DataError
from lpt_jax.storage import files


def _example(image: bytes, label: int, index: int, path: str) -> bytes:
    f = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "image": f(bytes_list=tf.train.BytesList(value=[image])),
        "label": f(int64_list=tf.train.Int64List(value=[label])),
        "index": f(int64_list=tf.train.Int64List(value=[index])),
        "path": f(bytes_list=tf.train.BytesList(value=[path.encode("utf-8")])),
    })).SerializeToString()


def _read_checked(resize_shorter: int, jpeg_quality: int):
    def load(i, path):
        data = tf.io.read_file(path)
        image = preprocess.decode_rgb(data)  # fails on unreadable files: dropped, then reported
        shape = tf.shape(image)  # returned, so the decode check is not pruned as unused
        if resize_shorter <= 0:
            return i, data, shape
        shorter = tf.minimum(shape[0], shape[1])

        def smaller():
            scale = resize_shorter / tf.cast(shorter, tf.float32)
            size = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
            resized = tf.image.resize(image, size, method="bilinear", antialias=True)
            return tf.io.encode_jpeg(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8),
                                     quality=jpeg_quality)
        return i, tf.cond(shorter > resize_shorter, smaller, lambda: data), shape
    return load


def write_split(out_dir: str, split: str, paths, labels, shard_mb: float = 256,
                resize_shorter: int = 0, jpeg_quality: int = 95, on_corrupt: str = "fail",
                num_parallel: int = 16) -> dict:
    """Writes one split's shards; returns its manifest entry."""
    paths = list(paths)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    ds = ds.map(_read_checked(resize_shorter, jpeg_quality), num_parallel_calls=num_parallel,
                deterministic=True).ignore_errors()
    files, kept_labels, sizes, kept = [], [], [], []
    writer, shard_bytes = None, 0
    for i, data, _ in ds.prefetch(num_parallel).as_numpy_iterator():
        if writer is None or shard_bytes >= shard_mb * 2**20:
            if writer is not None:
                writer.close()
            files.append(f"{split}-{len(files):05d}.tfrecord")
            writer = tf.io.TFRecordWriter(os.path.join(out_dir, files[-1]))
            shard_bytes = 0
        writer.write(_example(data, int(labels[i]), len(kept), paths[i]))
        shard_bytes += len(data)
        kept.append(int(i))
        kept_labels.append(int(labels[i]))
        sizes.append(len(data))
    if writer is not None:
        writer.close()
    bad = sorted(set(range(len(paths))) - set(kept))
    if bad and on_corrupt != "skip":
        shown = ", ".join(paths[i] for i in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable images in the {split} split: {shown}{more} "
                        "(nothing was marked prepared; fix or remove them, or pass "
                        "--on_corrupt=skip to leave them out)")
    return {"files": files, "labels": kept_labels, "num_bytes": sizes,
            "skipped": [paths[i] for i in bad]}


def prepare(cfg, out_dir: str, splits=None, **write_kwargs) -> dict:
    """Prepares every split (or `splits`) of the file-backed source `cfg` names."""
    cfg = cfg.copy_and_resolve_references()
    cfg.format = "files"
    src = get_source(cfg)
    files.makedirs(out_dir)
    manifest = {"format": FORMAT_VERSION, "name": src.name, "class_names": list(src.class_names),
                "origin": src.origin, "splits": {}}
    for split, data in src.splits.items():
        if splits and split not in splits:
            continue
        if data.store.kind != "path":
            raise DataError(f"{src.name} is not read from image files; nothing to prepare")
        paths = [data.store.describe(i) for i in range(len(data))]
        manifest["splits"][split] = write_split(out_dir, split, paths, data.labels, **write_kwargs)
        skipped = manifest["splits"][split]["skipped"]
        print(f"{split}: {len(data) - len(skipped)} images in "
              f"{len(manifest['splits'][split]['files'])} shards, {len(skipped)} skipped")
    files.write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest))  # atomic, last
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="places_lt | imagenet_lt | inaturalist2018 | "
                   "image_folder")
    p.add_argument("--root", required=True, help="image root (local or gs://)")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    for field in ("split_dir", "train_list", "val_list", "test_list", "class_names_file"):
        p.add_argument(f"--{field}", default="")
    p.add_argument("--num_classes", type=int, default=0)
    p.add_argument("--splits", default="", help="comma-separated subset, default all")
    p.add_argument("--shard_mb", type=float, default=256)
    p.add_argument("--resize_shorter", type=int, default=0,
                   help="re-encode images whose shorter side is larger (0 = keep bytes)")
    p.add_argument("--jpeg_quality", type=int, default=95)
    p.add_argument("--on_corrupt", choices=("fail", "skip"), default="fail")
    p.add_argument("--num_parallel", type=int, default=16)
    args = p.parse_args(argv)
    cfg = default_config()
    for field in ("name", "root", "split_dir", "train_list", "val_list", "test_list",
                  "class_names_file", "num_classes"):
        setattr(cfg, field, getattr(args, field))
    try:
        prepare(cfg, args.out, splits=[s for s in args.splits.split(",") if s],
                shard_mb=args.shard_mb, resize_shorter=args.resize_shorter,
                jpeg_quality=args.jpeg_quality, on_corrupt=args.on_corrupt,
                num_parallel=args.num_parallel)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, tf.errors.OpError) as e:  # e.g. an output folder that cannot be written
        print(f"error: preparing {args.out} failed: {first_line(e)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
