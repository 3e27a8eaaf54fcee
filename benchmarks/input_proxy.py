"""TF-free proxy for LPT's tf.data training pipeline (decode + RandomResizedCrop + flip at 224).

For the lent GPU machine, which has no TensorFlow (benchmarks/device_run.sh runs it there):
images/s of JPEG decode and augmentation with OpenCV and PIL over a process pool on all host
cores, from the committed demo JPEGs re-encoded at 256x256 and 500x375, against the fastest
train step of a gpu_h100.py JSON. The real tf.data figure per core is
benchmarks/results/input_pipeline.md.

    python benchmarks/input_proxy.py [--seconds 6] [--gpu-json OUT/gpu_h100.json] [--out F.md]
"""
import argparse
import collections
import io
import json
import os
import re
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

OUT_SIZE = 224
STATEMENT = ("TF-free PROXY for the tf.data pipeline (TensorFlow cannot be installed on this "
             "machine): JPEG decode + RandomResizedCrop (area 0.08-1, aspect 3/4-4/3) + random "
             "flip + bilinear resize to 224 + float32 [-1, 1], per image in a process pool, "
             "full decode then crop (no crop-window decode). It is not the shipped "
             "lpt_jax.data pipeline; the real tf.data figure per core is in "
             "benchmarks/results/input_pipeline.md (measured on the 2-core build machine).")
_BACKEND, _BUFS = None, None


def _init(backend, bufs):
    global _BACKEND, _BUFS
    _BACKEND, _BUFS = backend, bufs
    if backend == "cv2":
        import cv2
        cv2.setNumThreads(1)


def _encode(args):
    path, (w, h) = args
    from PIL import Image
    img = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def _crop_window(rng, h, w):
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(0.08, 1.0)
        r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return y, x, ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def _one(buf, rng, as_float):
    if _BACKEND == "cv2":
        import cv2
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        y, x, ch, cw = _crop_window(rng, *img.shape[:2])
        img = cv2.resize(np.ascontiguousarray(img[y:y + ch, x:x + cw]), (OUT_SIZE, OUT_SIZE),
                         interpolation=cv2.INTER_LINEAR)
    else:
        from PIL import Image
        im = Image.open(io.BytesIO(buf)).convert("RGB")
        y, x, ch, cw = _crop_window(rng, im.height, im.width)
        img = np.asarray(im.resize((OUT_SIZE, OUT_SIZE), Image.BILINEAR,
                                   box=(x, y, x + cw, y + ch)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if as_float:
        return np.asarray(img, np.float32) * (1 / 127.5) - 1.0
    return np.ascontiguousarray(img)


def _work(task):
    """(images, CPU seconds, batch or None): deliver=True returns the uint8 batch (the copy
    to the parent counts); else float32 images are made and dropped in the worker."""
    seed, batch, deliver = task
    c = time.process_time()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(_BUFS), batch)
    imgs = [_one(_BUFS[i], rng, not deliver) for i in idx]
    out = np.stack(imgs) if deliver else None
    return batch, time.process_time() - c, out


def measure(backend, bufs, workers, batch, seconds, deliver):
    ctx = get_context("fork")
    with ctx.Pool(workers, initializer=_init, initargs=(backend, bufs)) as pool:
        pool.map(_work, [(i, 4, deliver) for i in range(2 * workers)])  # warm-up
        pending, done, cpu, task = collections.deque(), 0, 0.0, 1000
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            while len(pending) < 2 * workers and time.perf_counter() - t0 < seconds:
                pending.append(pool.apply_async(_work, ((task, batch, deliver),)))
                task += 1
            if not pending:
                break
            n, c, _ = pending.popleft().get()
            done, cpu = done + n, cpu + c
        wall = time.perf_counter() - t0
        cpu += time.process_time() - c0  # the parent: unpickling delivered batches
    return dict(images=done, wall_s=wall, images_per_s=done / wall,
                per_core=done / cpu if cpu else float("nan"))


def tf_per_core(repo):
    """The tf.data per-core figure (256x256, default row) from results/input_pipeline.md."""
    try:
        text = (repo / "benchmarks/results/input_pipeline.md").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(r"\|\s*256x256\s*\|\s*image files, JPEG crop-window decode \(default\)"
                     r"\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            return float(m.group(2))
    return None


def fastest_train_step(gpu_json):
    try:
        rows = json.loads(Path(gpu_json).read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    train = [r for r in rows if "images_per_s" in r and str(r.get("kind", "")).endswith("_train")]
    return max(train, key=lambda r: r["images_per_s"]) if train else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="demo/cifar10_lt6")
    p.add_argument("--max-images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--gpu-json", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    print(STATEMENT, flush=True)
    repo = Path.cwd()
    cores = len(os.sched_getaffinity(0))
    backends = []
    try:
        import cv2
        backends.append(("cv2", f"OpenCV {cv2.__version__}"))
    except ImportError:
        pass
    try:
        import PIL
        backends.append(("pil", f"Pillow {PIL.__version__}"))
    except ImportError:
        sys.exit("neither OpenCV nor Pillow is importable: no input proxy")
    paths = sorted(Path(args.root).glob("*/*/*.jpg"))[: args.max_images]
    print(f"{len(paths)} source JPEGs from {args.root}, {cores} cores, "
          f"backends {[b[1] for b in backends]}", flush=True)
    sizes = {"256x256": (256, 256), "500x375": (500, 375)}
    with get_context("fork").Pool(cores) as pool:
        bufs = {k: pool.map(_encode, [(str(q), wh) for q in paths]) for k, wh in sizes.items()}
    main_b = backends[0][0]
    plan = [(main_b, "256x256", False), (main_b, "500x375", False), (main_b, "256x256", True)]
    plan += [(b, "256x256", False) for b, _ in backends[1:]]
    rows = []
    for backend, size, deliver in plan:
        r = measure(backend, bufs[size], cores, args.batch, args.seconds, deliver)
        r.update(backend=dict(backends)[backend], source=size, workers=cores,
                 mode=("uint8 batches delivered to the parent process" if deliver
                       else "float32 [-1, 1] made in the worker, not delivered"))
        rows.append(r)
        print(f"  {r['backend']}, {size}, {r['mode']}: {r['images_per_s']:.0f} images/s on "
              f"{cores} workers, {r['per_core']:.0f} per CPU-second", flush=True)
    step = fastest_train_step(args.gpu_json) if args.gpu_json else None
    tf_core = tf_per_core(repo)
    lines = [f"# Input pipeline proxy on {cores} host cores (TF-free)", "", STATEMENT, "",
             f"{len(paths)} committed demo JPEGs ({args.root}, 32x32 CIFAR) upscaled (bicubic) "
             f"and re-encoded at quality 90 in memory; batch {args.batch}; "
             f"{args.seconds:g} s per row.", "",
             "| library | source | mode | images/s (wall) | images per CPU-second |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['source']} | {r['mode']} | {r['images_per_s']:.0f} | "
              f"{r['per_core']:.0f} |" for r in rows]
    lines.append("")
    best = rows[0]
    if tf_core:
        lines.append(f"tf.data (results/input_pipeline.md, 256x256, crop-window decode): "
                     f"{tf_core:.0f} images per CPU-second -> {tf_core * cores:.0f} images/s on "
                     f"{cores} cores if it scaled linearly (not measured here).")
    if step:
        need = step["images_per_s"]
        ratio = best["images_per_s"] / need
        lines.append(
            f"Fastest train step measured by gpu_h100.py: {step['case']} at B={step['batch']}, "
            f"{need:.0f} images/s. Proxy ({best['backend']}, 256x256) / step = {ratio:.2f}x "
            f"(target >= 1.5x: {'met' if ratio >= 1.5 else 'not met'}); 1.5x needs "
            f"{1.5 * need / best['per_core']:.1f} cores at this per-core rate.")
    else:
        lines.append("No train-step figure from gpu_h100.py to compare with.")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(
            statement=STATEMENT, cores=cores, rows=rows, tf_per_core=tf_core,
            fastest_train_step=step and {k: step[k] for k in ("case", "batch", "images_per_s")}),
            indent=1))


if __name__ == "__main__":
    main()
