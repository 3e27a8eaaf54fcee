"""Input pipelines: `pipeline` (the shipped tf.data training stream, per core) and `proxy` (a
TF-free stand-in on all host cores for the GPU machine, against the GPU step's rate). Images:
CIFAR-10 JPEGs upscaled (bicubic) and re-encoded at quality 90 to 256x256 (Places-LT) and
500x375 (a typical photo); smoother than photos, so they decode somewhat faster.
"""

from __future__ import annotations

import collections
import io
import json
import re
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import harness
import host
from harness import arg, case, log

TARBALL = harness.REPO.parent / "shared" / "data" / "images" / "cifar10-jpg.tar.gz"
OUT_SIZE = 224


def reencode(args) -> bytes:
    """(path, (w, h)) -> the image resized (bicubic) and re-encoded as JPEG quality 90."""
    from PIL import Image
    path, wh = args
    out = io.BytesIO()
    Image.open(path).convert("RGB").resize(wh, Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


@case("pipeline", "input_pipeline",
      "the shipped tf.data training stream at 224 px: images/s and per core, four variants",
      arg("--steps", type=int, default=20), arg("--warmup", type=int, default=3),
      arg("--batch", type=int, default=64, help="per stream; a step decodes 2x this"),
      arg("--sizes", default="256x256,500x375"),
      arg("--n-max", type=int, default=300), arg("--n-min", type=int, default=12))
def pipeline(args, rec):
    import shipped  # TensorFlow on first use
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp, "small")
        shipped.cifar_tree(str(TARBALL), str(small), args.n_max, args.n_min)
        files = sorted(small.glob("train/*/*.jpg"))
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            tree = Path(tmp, f"tree_{size}")
            for f in files:
                out = tree / f.relative_to(small)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(reencode((f, (w, h))))
            prepared = Path(tmp, f"prepared_{size}")
            shipped.prepare_folder(str(tree), str(prepared))
            for name, root, fields in (
                    ("image files, JPEG crop-window decode (default)", tree, {}),
                    ("image files, full decode then crop", tree, dict(jpeg_fast_crop=False)),
                    ("prepared format (in RAM), crop-window decode", prepared, {}),
                    ("image files, default, 1 tf.data thread", tree, dict(tf_threads=1))):
                it = shipped.train_stream(str(root), args.batch, **fields)
                for _ in range(args.warmup):
                    next(it)
                wall, cpu, _ = harness.timed(lambda s=it: [next(s) for _ in range(args.steps)])
                n = 2 * args.batch * args.steps  # both batches
                rows.append(dict(source=size, variant=name, images_per_s=n / wall,
                                 per_core=n / cpu))
                log(f"{size} {name}: {n / wall:.1f} img/s, {n / cpu:.1f} img/CPU-s")
    text = (f"Dual-sampling stream, batch {args.batch} per stream ({2 * args.batch} images a "
            "step), float32 in [-1, 1]; "
            f"{args.steps} timed steps after {args.warmup}; {len(files)} CIFAR-10 JPEGs, "
            "long-tailed over 10 classes. Per core = images per CPU-second of the process "
            "(all threads), which does not depend on how busy the machine is.\n\n")
    text += harness.table(["source images", "variant", "images/s (wall)", "images/s per core"],
                          [[r["source"], r["variant"], f"{r['images_per_s']:.0f}",
                            f"{r['per_core']:.0f}"] for r in rows])
    rec.write(text, dict(args=vars(args), rows=rows))


# ----------------------------------------------------------------------------- proxy

STATEMENT = ("A TF-free PROXY for the tf.data pipeline, not the shipped one: JPEG decode + "
             "RandomResizedCrop (area 0.08-1, aspect 3/4-4/3) + flip + bilinear resize to 224 + "
             "float32 [-1, 1], per image in a process pool, full decode then crop.")
_BACKEND, _BUFS = None, None


def _init(backend, bufs):
    global _BACKEND, _BUFS
    _BACKEND, _BUFS = backend, bufs
    if backend == "cv2":
        import cv2
        cv2.setNumThreads(1)


def _crop_window(rng, h, w):
    for _ in range(10):
        a = h * w * rng.uniform(0.08, 1.0)
        r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1), ch, cw
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
    return np.asarray(img, np.float32) * (1 / 127.5) - 1.0 if as_float else \
        np.ascontiguousarray(img)


def _work(task):
    """(images, CPU seconds, batch or None): deliver=True returns the uint8 batch (the copy to
    the parent counts); else float32 images are made and dropped in the worker."""
    seed, batch, deliver = task
    c, rng = time.process_time(), np.random.default_rng(seed)
    imgs = [_one(_BUFS[i], rng, not deliver) for i in rng.integers(0, len(_BUFS), batch)]
    return batch, time.process_time() - c, np.stack(imgs) if deliver else None


def measure(backend, bufs, workers, batch, seconds, deliver) -> dict:
    with get_context("fork").Pool(workers, initializer=_init, initargs=(backend, bufs)) as pool:
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


def tf_per_core():
    """The newest tf.data per-core figure (256x256, default row) of results/input_pipeline.md."""
    path = harness.RESULTS / "input_pipeline.md"
    m = re.search(r"\| 256x256 \| image files, JPEG crop-window decode \(default\) \| [\d.]+ \| "
                  r"([\d.]+) \|", path.read_text() if path.exists() else "")
    return float(m.group(1)) if m else None


def fastest_train_step(gpu_json: str):
    try:
        data = json.loads(Path(gpu_json).read_text())
    except (OSError, ValueError):
        return None
    rows = (data["runs"][-1] if "runs" in data else data).get("rows", [])
    train = [r for r in rows if "images_per_s" in r and r.get("images", 0) == 2 * r["batch"]]
    return max(train, key=lambda r: r["images_per_s"]) if train else None


@case("proxy", "input_proxy",
      "a TF-free input-pipeline proxy on all host cores vs the gpu case's fastest step",
      arg("--root", default="demo/cifar10_lt6"), arg("--max-images", type=int, default=512),
      arg("--batch", type=int, default=64), arg("--seconds", type=float, default=6.0),
      arg("--gpu-json", default="", help="the gpu case's results JSON"))
def proxy(args, rec):
    log(STATEMENT)
    cores, backends = host.cores(), []
    for module, label in (("cv2", "OpenCV"), ("PIL", "Pillow")):
        try:
            backends.append((module.lower(), f"{label} {__import__(module).__version__}"))
        except ImportError:
            pass
    if not backends or backends[-1][0] != "pil":
        raise SystemExit("Pillow is not importable: no input proxy")
    paths = sorted(Path(args.root).glob("*/*/*.jpg"))[: args.max_images]
    sizes = {"256x256": (256, 256), "500x375": (500, 375)}
    with get_context("fork").Pool(cores) as pool:
        bufs = {k: pool.map(reencode, [(str(q), wh) for q in paths]) for k, wh in sizes.items()}
    main = backends[0][0]
    plan = [(main, "256x256", False), (main, "500x375", False), (main, "256x256", True)]
    rows = []
    for backend, size, deliver in plan + [(b, "256x256", False) for b, _ in backends[1:]]:
        r = measure(backend, bufs[size], cores, args.batch, args.seconds, deliver)
        r.update(backend=dict(backends)[backend], source=size, workers=cores,
                 mode=("uint8 batches delivered to the parent process" if deliver
                       else "float32 [-1, 1] made in the worker, not delivered"))
        rows.append(r)
        log(f"  {r['backend']}, {size}, {r['mode']}: {r['images_per_s']:.0f} images/s")
    step = fastest_train_step(args.gpu_json) if args.gpu_json else None
    tf_core = tf_per_core()
    lines = [STATEMENT, "", f"{len(paths)} demo JPEGs ({args.root}) upscaled; batch "
             f"{args.batch}; {args.seconds:g} s per row; {cores} worker processes.", "",
             harness.table(["library", "source", "mode", "images/s (wall)", "images per CPU-s"],
                           [[r["backend"], r["source"], r["mode"], f"{r['images_per_s']:.0f}",
                             f"{r['per_core']:.0f}"] for r in rows]), ""]
    if tf_core:
        lines.append(f"tf.data (results/input_pipeline.md, 256x256): {tf_core:.0f} images per "
                     f"CPU-second -> {tf_core * cores:.0f} images/s on {cores} cores if it "
                     "scaled linearly (not measured here).")
    if step:
        need, best = step["images_per_s"], rows[0]
        ratio = best["images_per_s"] / need
        lines.append(f"Fastest train step of the gpu case: {step['case']} at B={step['batch']}, "
                     f"{need:.0f} images/s. Proxy / step = {ratio:.2f}x (target >= 1.5x: "
                     f"{'met' if ratio >= 1.5 else 'not met'}); 1.5x needs "
                     f"{1.5 * need / best['per_core']:.1f} cores at this per-core rate.")
    else:
        lines.append("No train-step figure of the gpu case to compare with.")
    rec.write("\n".join(lines), dict(statement=STATEMENT, cores=cores, rows=rows,
                                     tf_per_core=tf_core, fastest_train_step=step and {
                                         k: step[k] for k in ("case", "batch", "images_per_s")}))
