"""Training-stream throughput: images/s of the dual-sampling pair (both batches),
with read + JPEG decode + RandomResizedCrop + flip at 224 px, per core.

    .venv/bin/python benchmarks/bench_input_pipeline.py [--steps 30] [--batch 64]

Builds a long-tailed tree of JPEGs from the CIFAR-10 images in ../shared (upscaled
to 256x256 as Places-LT's images are, and to 500x375 as a typical ImageNet image),
then times `lpt_jax.data.make_train_stream` after a warm-up, in wall-clock images/s
and per core (images per CPU-second of the process). Variants: the JPEG crop-window
decode on/off, image files vs the prepared (in-RAM) format, one tf.data thread.
Writes results/input_pipeline.md.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tensorflow as tf  # noqa: E402

from lpt_jax import data  # noqa: E402
from lpt_jax.data import prepare, testing  # noqa: E402

TARBALL = REPO.parent / "shared" / "data" / "images" / "cifar10-jpg.tar.gz"
RESULTS = Path(__file__).resolve().parent / "results" / "input_pipeline.md"


def make_tree(workdir: Path, size_hw, counts) -> Path:
    """CIFAR-10 JPEGs upscaled to `size_hw` and re-encoded (quality 90)."""
    small = workdir / "small"
    testing.cifar10_tree(str(TARBALL), str(small), counts)
    big = workdir / f"tree_{size_hw[0]}x{size_hw[1]}"
    for f in small.glob("train/*/*.jpg"):
        out = big / f.relative_to(small)
        out.parent.mkdir(parents=True, exist_ok=True)
        img = tf.io.decode_jpeg(f.read_bytes())
        img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, size_hw, "bicubic")), 0, 255),
                      tf.uint8)
        out.write_bytes(tf.io.encode_jpeg(img, quality=90).numpy())
    return big


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_stream(root: Path, batch: int, steps: int, warmup: int, **cfg_fields) -> tuple:
    """(images/s wall clock, images per CPU-second of this process) over both batches."""
    cfg = data.default_config()
    cfg.name, cfg.root = "image_folder", str(root)
    for k, v in cfg_fields.items():
        setattr(cfg, k, v)
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, global_batch_size=batch, seed=0)
    for _ in range(warmup):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        b = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert b["cb"]["image"].shape == (batch, 224, 224, 3)
    images = 2 * batch * steps  # both batches
    return images / elapsed, images / cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per stream; a step decodes 2x this")
    p.add_argument("--no_write", action="store_true")
    args = p.parse_args()
    counts = testing.long_tail_counts(10, 300, 12)
    n_cores = cores()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in ((256, 256), (375, 500)):
            tree = make_tree(tmp / f"{size[0]}", size, counts)
            prepared = tmp / f"prepared_{size[0]}"
            prepare.prepare(_cfg_for(tree), str(prepared))
            variants = [
                ("image files, JPEG crop-window decode (default)", tree, dict()),
                ("image files, full decode then crop", tree, dict(jpeg_fast_crop=False)),
                ("prepared format (in RAM), crop-window decode", prepared, dict()),
                ("image files, default, 1 tf.data thread", tree, dict(tf_threads=1)),
            ]
            for name, root, fields in variants:
                ips, per_cpu = time_stream(root, args.batch, args.steps, args.warmup, **fields)
                rows.append((f"{size[1]}x{size[0]}", name, ips, per_cpu))
                print(f"{size[1]}x{size[0]:<4} {name:<48} {ips:8.1f} img/s  "
                      f"{per_cpu:8.1f} img/CPU-s", flush=True)
    if not args.no_write:
        write(rows, args, n_cores, sum(counts), (load_before, os.getloadavg()[0]))


def _cfg_for(tree):
    cfg = data.default_config()
    cfg.name, cfg.root = "image_folder", str(tree)
    return cfg


def write(rows, args, n_cores, n_images, loads):
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines = [
        "# Input pipeline throughput (training stream)",
        "",
        f"Measured {datetime.date.today().isoformat()} by `benchmarks/bench_input_pipeline.py` on "
        f"{cpu}, {n_cores} cores available, {platform.python_version()}, TF {tf.__version__}.",
        f"Dual-sampling stream, batch {args.batch} per stream (a step = {2 * args.batch} images: "
        "class-balanced + instance-balanced), read + JPEG decode + RandomResizedCrop + flip + "
        f"resize to 224 px, float32 in [-1, 1]; {args.steps} timed steps after {args.warmup} "
        f"warm-up steps; {n_images} CIFAR-10 JPEGs upscaled to the stated size (quality 90), "
        "long-tailed over 10 classes. Images count both batches. **Per core** = images per "
        "CPU-second of the whole process (user + system time of all threads, including the "
        "index plan and the copy to numpy), which does not depend on how busy the shared "
        "machine is; wall-clock images/s does.",
        "",
        "| source images | variant | images/s (wall) | images/s per core |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {v} | {ips:.0f} | {pc:.0f} |" for s, v, ips, pc in rows]
    lines += [
        "",
        f"1-minute load average before / after the run: {loads[0]:.1f} / {loads[1]:.1f} "
        f"(other jobs share these {n_cores} cores).",
        "Timings on these shared 2-core machines vary by up to 2x between runs (other jobs);",
        "compare rows of one run. Upscaled CIFAR images are smoother than photographs, so",
        "real JPEGs of the same size decode somewhat slower.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
