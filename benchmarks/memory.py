"""Peak host memory, each case in a FRESH process (Linux /proc): `load_memory` (the backbone
loader), `convert` (the release converter), `multitask` (one backbone serving many tasks);
`fingerprint`, the time of the backbone's identity beside its load; and `microbatches`, the
compiled peak of the trainer's step against train.microbatches and remat (compiled, not run).

Peak extra = the RSS high-water mark during the call (reset right before it) minus the RSS
right before it; retained = RSS after it minus the same. Temporary files are deleted.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np

import harness
import host
import shipped
from harness import arg, case, child, fmt, log

MiB = 2 ** 20
TORCH_SCRIPT = harness.HERE / "bench_torch_reference.py"


def peak_of(fn, stages: list = None, last: str = "rest") -> dict:
    """fn()'s wall and CPU seconds, peak extra and retained bytes; `stages` (if a list) gets
    the marks `mark(name)` set during fn (the high-water mark is reset after each)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the baseline holds no reusable heap slack
    base = host.rss_bytes()

    def mark(name):
        stages.append(dict(stage=name, peak_extra=host.hwm_bytes() - base,
                           rss_extra_after=host.rss_bytes() - base))
        host.reset_hwm()
    host.reset_hwm()
    wall, cpu, out = harness.timed(fn, mark)
    peak = host.hwm_bytes() - base
    if stages is not None:
        mark(last)
    return dict(seconds=wall, cpu_seconds=cpu, baseline_rss=base, peak_extra=peak,
                retained_extra=host.rss_bytes() - base, out=out)


# ----------------------------------------------------------------------------- load_memory

LOADS = {"augreg": ("augreg", False, False), "big_vision": ("big_vision", False, False),
         "big_vision_scan": ("big_vision_scan", False, False),
         "memory_augreg": ("augreg", True, False), "augreg_device_put": ("augreg", False, True)}


@child("load_memory")
def load_memory_child(p: dict) -> dict:
    import jax
    _, ram, device_put = LOADS[p["case"]]
    abstract, path = shipped.vit_abstract("B/16"), p["path"]
    if ram:  # a remote-like path (fsspec's memory://); the copy is part of the baseline
        import fsspec
        path = "memory://bench/" + os.path.basename(path)
        with open(p["path"], "rb") as src:
            fsspec.filesystem("memory").pipe_file(path[len("memory://"):], src.read())
    stages = []

    def load(mark):
        shipped.mark_loader_stages(mark)
        params = shipped.load_backbone(path, abstract)
        if device_put:
            mark("match_and_unflatten")
            params = jax.block_until_ready(jax.device_put(params))
        return params  # held while `retained` is read
    r = peak_of(load, stages, "device_put" if device_put else "match_and_unflatten")
    r["peak_extra"] = max(s["peak_extra"] for s in stages)  # the peaks between the marks
    return dict(r, param_bytes=shipped.tree_bytes(r.pop("out")), stages=stages,
                file_bytes=os.path.getsize(p["path"]))


@case("load_memory", "backbone_load_memory",
      "peak host memory of the backbone loader on ViT-B/16 checkpoints (layouts, memory://)",
      arg("--cases", nargs="+", default=list(LOADS), choices=list(LOADS)))
def load_memory(args, rec):
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        written = {}
        for name in args.cases:
            layout = LOADS[name][0]
            if layout not in written:
                written[layout] = Path(tmp, f"vit_b16_{layout}.npz")
                shipped.write_vit_checkpoint(str(written[layout]), layout)
                log(f"wrote {layout}: {written[layout].stat().st_size / MiB:.0f} MiB")
            r = harness.fresh("load_memory", dict(case=name, path=str(written[layout])))
            r.update(case=name, ratio=r["peak_extra"] / r["file_bytes"])
            log(f"{name}: peak extra {r['peak_extra'] / MiB:.0f} MiB, ratio {r['ratio']:.2f}")
            results.append(r)
    text = ("A fresh process per case; random float32 weights, the head dropped by "
            "`ignore=['head/.*']`; ratio = peak extra / file size. Stages (the high-water mark "
            "reset after each; the peak is the largest): peak extra / RSS extra at its end, "
            "MiB.\n\n")
    text += harness.table(
        ["case", "file MiB", "params MiB", "peak extra MiB", "ratio", "retained MiB", "s",
         "stages"],
        [[r["case"], f"{r['file_bytes'] / MiB:.0f}", f"{r['param_bytes'] / MiB:.0f}",
          f"{r['peak_extra'] / MiB:.0f}", f"**{r['ratio']:.2f}**",
          f"{r['retained_extra'] / MiB:.0f}", f"{r['seconds']:.1f}",
          "; ".join(f"{s['stage']} {s['peak_extra'] / MiB:.0f} / {s['rss_extra_after'] / MiB:.0f}"
                    for s in r["stages"])] for r in results])
    rec.write(text, dict(rows=results))


# ----------------------------------------------------------------------------- convert

CONVERT_CASES = ("convert_release", "convert_release_warm", "load_release", "backbone_npz")


@child("convert")
def convert_child(p: dict) -> dict:
    path, out, heads = p["path"], p["workdir"], p["num_heads"] or None
    if p["case"] == "convert_release_warm":  # JAX's one-time tracing out of the measured call
        shipped.trace_release(path, heads)
    if p["case"] == "backbone_npz":  # the abstract tree is built before the baseline
        fn = shipped.converted_backbone_loader(out)
    elif p["case"] == "load_release":
        fn = lambda: shipped.load_release(path, heads)  # noqa: E731 - held while `retained` is read
    else:
        fn = lambda: shipped.convert_release(path, out, heads, p["class_names"])  # noqa: E731
    r = peak_of(lambda mark: fn())
    r.pop("out")
    return dict(r, file_bytes=os.path.getsize(path), outputs={
        n: os.path.getsize(f"{out}/{n}") for n in ("backbone.npz", "export.npz")
        if p["case"].startswith("convert") and os.path.exists(f"{out}/{n}")})


# ----------------------------------------------------------------------------- fingerprint

@child("fingerprint")
def fingerprint_child(p: dict) -> dict:
    """The backbone's identity (`npz.file_fingerprint`: the whole file's sha256, streamed)
    first and again (cached per process), then the loader on the same path."""
    from lpt_jax.weights import npz
    first, _, ident = harness.timed(npz.file_fingerprint, p["path"])
    again, _, _ = harness.timed(npz.file_fingerprint, p["path"])
    load, _, _ = harness.timed(shipped.load_backbone, p["path"], shipped.vit_abstract("B/16"))
    return dict(fingerprint_s=first, cached_s=again, load_s=load, file_bytes=ident["size"])


@case("fingerprint", "backbone_fingerprint",
      "the backbone identity's cost (whole-file sha256) beside loading ViT-B/16, local and in "
      "a GCS emulator", arg("--repeats", type=int, default=3))
def fingerprint(args, rec):
    import sys
    sys.path.insert(0, str(Path(harness.REPO) / "tests"))
    from gcs_emulator import Emulator
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fingerprint_") as tmp:
        local = Path(tmp, "vit_b16.npz")
        shipped.write_vit_checkpoint(str(local), "augreg")
        emu = Emulator()
        try:
            emu.make_bucket("bench")
            env = {"STORAGE_EMULATOR_HOST": emu.url}
            remote = "gs://bench/vit_b16.npz"
            harness.fresh("upload", dict(src=str(local), dst=remote), env=env)
            for r in range(args.repeats):
                for where, path, e in (("local", str(local), None), ("emulated gs://", remote,
                                                                      env)):
                    row = dict(harness.fresh("fingerprint", dict(path=path), env=e),
                               where=where, round=r)
                    log(f"{where}: fingerprint {row['fingerprint_s']:.2f} s, load "
                        f"{row['load_s']:.2f} s")
                    rows.append(row)
        finally:
            emu.stop()
    text = (f"A random ViT-B/16 AugReg-layout .npz ({rows[0]['file_bytes'] / MiB:.0f} MiB), a "
            f"fresh process per row, {args.repeats} rounds alternating local / emulated "
            "(fake-gcs-server on the loopback, through the shipped gcsfs client). "
            "ratio = fingerprint / load.\n\n")
    text += harness.table(
        ["where", "round", "fingerprint s", "again (cached) s", "load s", "ratio"],
        [[r["where"], r["round"], f"{r['fingerprint_s']:.2f}", f"{r['cached_s']:.4f}",
          f"{r['load_s']:.2f}", f"**{r['fingerprint_s'] / r['load_s']:.2f}**"] for r in rows])
    rec.write(text, dict(rows=rows))


@child("upload")
def upload_child(p: dict) -> dict:
    from lpt_jax.storage import files
    with open(p["src"], "rb") as f:
        files.write_bytes(p["dst"], f.read())
    return dict(bytes=files.size(p["dst"]))


@case("convert", "convert",
      "time and peak host memory of converting an LPT release checkpoint (lpt_jax.convert)",
      arg("--oracle-python", default="/work/oracle_venv/bin/python",
          help="python of a torch venv: writes a random ViT-B/16 release file (~333 MiB)"),
      arg("--release", default="", help="an existing release .pth instead (e.g. the test "
          "fixture tests/data/convert/release_module.pth with --num-heads 2)"),
      arg("--num-heads", type=int, default=0), arg("--class-names", default="places_lt",
                                                    help="'none' for a head of another size"),
      arg("--cases", nargs="+", default=list(CONVERT_CASES), choices=CONVERT_CASES))
def convert(args, rec):
    results, path, write_s = [], args.release, 0.0
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        if not path:
            path = f"{tmp}/LPT_random_b16.pth"
            write_s, _, _ = harness.timed(harness.fresh, "write_release", {"path": path},
                                          python=args.oracle_python, script=TORCH_SCRIPT)
        for name in args.cases:
            r = harness.fresh("convert", dict(case=name, path=path, workdir=f"{tmp}/out",
                                              num_heads=args.num_heads,
                                              class_names=args.class_names))
            results.append(dict(r, case=name))
            log(f"{name}: {r['seconds']:.1f} s, peak extra {r['peak_extra'] / MiB:.0f} MiB")
    source = (f"`{args.release}`" if args.release else
              f"a random ViT-B/16 release written by torch in {write_s:.0f} s")
    text = (f"Release file: {source}; one fresh process per case; ratio = peak extra / size "
            "of the .pth.\n\n")
    text += harness.table(
        ["case", ".pth MiB", "wall s", "CPU s", "peak extra MiB", "ratio", "retained MiB",
         "outputs"],
        [[r["case"], f"{r['file_bytes'] / MiB:.1f}", f"{r['seconds']:.1f}",
          f"{r['cpu_seconds']:.1f}", f"{r['peak_extra'] / MiB:.0f}",
          f"**{r['peak_extra'] / r['file_bytes']:.2f}**", f"{r['retained_extra'] / MiB:.0f}",
          ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in r["outputs"].items())]
         for r in results])
    rec.write(text, dict(release=args.release, rows=results))


# ----------------------------------------------------------------------------- multitask


def images(n: int, size: int = 224, seed: int = 1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@child("multitask_memory")
def multitask_child(p: dict) -> dict:
    inputs, n, batch = p["inputs"], p["tasks"], p["batch"]
    x = images(batch)
    paths = inputs["phase2"][:n]

    def run(mark):
        if p["kind"] == "shared":  # the shipped predictor, one mixed batch over the N tasks
            scores, held = shipped.multitask(inputs["backbone"], {
                f"t{i}": q for i, q in enumerate(paths)}, batch)
            rows = [f"t{i}" for i in np.random.default_rng(0).integers(0, n, batch)]
            return held, bool(np.isfinite(scores(x, rows)).all())
        models = [shipped.single_task(inputs["backbone"], q, batch=batch) for q in paths]
        held = sum(m["held"] for m in models)  # one batch through the first and the last
        return held, all(np.isfinite(m["predict"](x)).all() for m in (models[0], models[-1]))
    r = peak_of(run)
    held, finite = r.pop("out")
    return dict(r, kind=p["kind"], tasks=n, held_bytes=held, finite=finite)


@case("multitask", "multitask",
      "one backbone serving N tasks (MultiTaskPredictor) vs N models: memory, throughput",
      arg("--tasks", default="1,4,16", help="N of the memory cases"),
      arg("--repeats", type=int, default=7, help="throughput rounds"),
      arg("--batch", type=int, default=8), arg("--skip", default="", help="memory|throughput"))
def multitask(args, rec):
    counts = [int(n) for n in args.tasks.split(",") if n]
    memory, speed = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_multitask_") as tmp:
        inputs = shipped.write_tasks(tmp, phase2=max(counts + [8]), phase1=8, batch=args.batch)
        for n in (counts if "memory" not in args.skip else []):
            for kind in ("shared", "separate"):
                memory.append(harness.fresh("multitask_memory", dict(
                    inputs=inputs, tasks=n, kind=kind, batch=args.batch)))
                log(f"{kind} {n}: peak extra {memory[-1]['peak_extra'] / MiB:.0f} MiB")
        if "throughput" not in args.skip:
            speed = throughput(inputs, args.repeats, args.batch)
    text = ""
    if memory:
        by = {(m["kind"], m["tasks"]): m for m in memory}
        text += ("held = parameter bytes on the device; peak extra = RSS high-water mark of a "
                 f"fresh process while it loads the tasks and runs one batch of {args.batch}."
                 "\n\n" + harness.table(
                     ["tasks", "shared: held MiB", "shared: peak extra MiB",
                      "separate: held MiB", "separate: peak extra MiB", "held ratio",
                      "peak ratio"],
                     [[n] + [f"{by[(k, n)][f] / MiB:.0f}" for k in ("shared", "separate")
                             for f in ("held_bytes", "peak_extra")]
                      + [f"**{by[('separate', n)][f] / by[('shared', n)][f]:.1f}x**"
                         for f in ("held_bytes", "peak_extra")] for n in counts]) + "\n\n")
    if speed:
        text += (f"Throughput: median of {args.repeats} rounds (each variant once a round, in "
                 "a random order) after a warm-up call each; ratios per round, then the median "
                 "(min-max).\n\n" + harness.table(
                     ["variant", "s / batch (wall)", "img/s (wall)", "img / CPU-s"],
                     [[k, f"{w:.3f}", f"{args.batch / w:.2f}", f"{args.batch / c:.2f}"]
                      for k, (w, c) in speed["median_s"].items()]) + "\n\n" + harness.table(
                     ["mixed over single-task", "wall", "CPU seconds"],
                     [[k] + [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in (v["wall"], v["cpu"])]
                      for k, v in speed["ratios"].items()]))
    rec.write(text, dict(args=vars(args), memory=memory, throughput=speed))


def throughput(inputs: dict, repeats: int, batch: int) -> dict:
    """single p2 / single p1: the single-task forward (`inference.make_predict_fn`); mixed p2:
    `MultiTaskPredictor` scores, each row one of 8 phase-2 tasks; mixed p1+p2: half the rows
    of phase-1 tasks, half of phase-2 tasks, against half a single p1 plus half a single p2."""
    p2, p1 = inputs["phase2"][:8], inputs["phase1"][:8]
    scores, _ = shipped.multitask(inputs["backbone"], {
        **{f"p2_{i}": p for i, p in enumerate(p2)}, **{f"p1_{i}": p for i, p in enumerate(p1)}},
        batch)
    one = shipped.single_task(inputs["backbone"], p2[0], batch=batch)
    other = shipped.single_task(inputs["backbone"], p1[0], batch=batch,
                                backbone_params=one["backbone"])
    rng, x = np.random.default_rng(0), images(batch)

    def mixed(phases):
        rows = [f"p{phases[i % len(phases)]}_{j}" for i, j in
                enumerate(rng.integers(0, 8, batch))]
        return lambda: scores(x, [rows[i] for i in rng.permutation(batch)])
    variants = {"single p2": lambda: one["predict"](x), "mixed p2": mixed((2,)),
                "single p1": lambda: other["predict"](x), "mixed p1+p2": mixed((1, 2))}
    compile_s = {k: round(harness.timed(fn)[0], 1) for k, fn in variants.items()}  # warm-up
    times = {k: [] for k in variants}
    for _ in range(repeats):  # each round in a new order: load drifts hit every variant alike
        for k in rng.permutation(list(variants)):
            times[k].append(harness.timed(variants[k])[:2])
    ratios = {}  # per round (its variants minutes apart), then the median (min, max)
    for label, num, den in (("mixed p2 / single p2", ["single p2"], "mixed p2"), (
            "mixed p1+p2 / (half single p1 + half single p2)", ["single p1", "single p2"],
            "mixed p1+p2")):
        for c, clock in enumerate(("wall", "cpu")):
            v = [sum(times[k][r][c] for k in num) / len(num) / times[den][r][c]
                 for r in range(repeats)]
            ratios.setdefault(label, {})[clock] = (float(np.median(v)), min(v), max(v))
    return dict(compile_s=compile_s, ratios=ratios, rounds=times,
                median_s={k: (float(np.median([w for w, _ in t])),
                              float(np.median([c for _, c in t]))) for k, t in times.items()})


# ----------------------------------------------------------------------------- microbatches

# The rows: METHOD:PHASE:BATCH (per stream; the streams are the method's own: LPT's dual
# sampling reads 'cb' and 'ib', so 256 + 256 images a step; LIFT's recipe: one phase, 128
# instance-balanced images).
STEP_ROWS = ["lpt:1:256", "lift:1:128"]


@case("microbatches", "memory_microbatches",
      "compiled peak memory of the trainer's step (ViT-B/16) against train.microbatches and "
      "model.vit.remat: compiled on this machine, not run",
      arg("--rows", nargs="+", default=STEP_ROWS, help="METHOD:PHASE:BATCH per stream"),
      arg("--microbatches", default="1,2,4,8"), arg("--remat", default="False,True"),
      arg("--variant", default="B/16"), arg("--image-size", type=int, default=224),
      arg("--classes", type=int, default=100),
      arg("--dtypes", default="float32", help="model.vit.dtype values, e.g. float32,bfloat16"),
      arg("--budget-gib", type=float, default=16.0, help="the memory to fit in"))
def microbatches(args, rec):
    counts = [int(k) for k in args.microbatches.split(",")]
    remats = [{"true": True, "false": False}[r.strip().lower()] for r in args.remat.split(",")]
    rows = []
    for spec, dtype, remat, k in itertools.product(args.rows, args.dtypes.split(","), remats,
                                                   counts):
        method, phase, batch = spec.split(":")
        config = shipped.step_config(method, int(phase), batch=int(batch), variant=args.variant,
                                     image_size=args.image_size, microbatches=k, remat=remat,
                                     dtype=dtype)
        r = shipped.compile_step_abstract(config, int(phase), args.classes)
        r.update(method=method, phase=int(phase), batch=int(batch), dtype=dtype, remat=remat,
                 microbatches=k, streams=list(r["streams"]), **r.pop("footprint"))
        rows.append(r)
        log(f"{spec} {dtype} remat={remat} microbatches={k}: peak {r['peak'] / 2**30:.2f} GiB "
            f"(temp {r['temp'] / 2**30:.2f}), compiled in {r['compile_s']:.0f} s")
        gc.collect()
    budget = args.budget_gib * 2**30
    same = lambda r: (r["method"], r["phase"], r["batch"], r["dtype"], r["remat"])  # noqa: E731
    for r in rows:  # ratios to microbatches = 1 of the same row, dtype and remat, this run
        base = next((b for b in rows if same(b) == same(r) and b["microbatches"] == 1), None)
        r["peak_ratio"] = r["peak"] / base["peak"] if base else float("nan")
        r["temp_ratio"] = r["temp"] / base["temp"] if base else float("nan")
    first = rows[0]
    text = (f"{args.variant} at {args.image_size} px, {args.classes} classes; the "
            "trainer's step (`steps.make_train_step(...).jit(mesh)`, one device) lowered and "
            "compiled for abstract inputs of the real shapes (no weights, no images: nothing "
            f"is run) by this machine's XLA CPU compiler. Frozen tree "
            f"{first['frozen_bytes'] / 2**20:.0f} MiB, train state "
            f"{first['state_bytes'] / 2**20:.1f} MiB, batch {first['batch_bytes'] / 2**20:.0f} "
            "MiB (the first row's; a bfloat16 model stores its frozen backbone in bfloat16). From `compiled.memory_analysis()`: **peak = arguments + "
            "outputs - aliased + temporaries**: the arguments (frozen backbone, state, batch) "
            "are resident for the whole call, the outputs that do not reuse a donated argument "
            "(`aliased`: the donated state) are new buffers, and the temporaries are XLA's "
            "scratch at its largest point (the activations kept for the backward pass: what "
            "micro-batches and remat shrink); counting the outputs beside the largest scratch "
            "makes it an upper bound (by the outputs' size, a few MiB). Ratios: to microbatches = 1 of the same row, dtype "
            "and remat, this run. A GPU compiles its own buffer assignment (other fusions; "
            "attention `xla` instead of CPU's `einsum`) and needs headroom beyond it (CUDA "
            "context, allocator, a prefetched batch): these are the CPU compiler's numbers.\n\n")
    text += harness.table(
        ["method", "phase", "images / step", "dtype", "remat", "microbatches", "args MiB",
         "outputs MiB", "aliased MiB", "temp MiB", "peak GiB", "peak ratio", "temp ratio",
         f"< {args.budget_gib:g} GiB", "compile s"],
        [[r["method"], r["phase"], " + ".join([str(r["batch"])] * len(r["streams"])),
          r["dtype"], r["remat"], r["microbatches"], f"{r['args'] / 2**20:.0f}",
          f"{r['outputs'] / 2**20:.1f}", f"{r['alias'] / 2**20:.1f}",
          f"{r['temp'] / 2**20:.0f}", f"**{r['peak'] / 2**30:.2f}**",
          fmt(r["peak_ratio"]), fmt(r["temp_ratio"]), "yes" if r["peak"] < budget else "no",
          f"{r['compile_s']:.0f}"] for r in rows])
    text += "\n\n" + "\n\n".join(verdict(rows, spec, budget, args.budget_gib)
                                  for spec in args.rows)
    rec.write(text, dict(args=vars(args), rows=rows))


def verdict(rows: list, spec: str, budget: float, gib: float) -> str:
    """Which configurations of a row fit the budget (the fewest micro-batches first), or by
    how much the smallest misses it."""
    method, phase, batch = spec.split(":")
    mine = [r for r in rows if (r["method"], str(r["phase"]), str(r["batch"])) == (
        method, phase, batch)]
    fit = sorted((r for r in mine if r["peak"] < budget),
                 key=lambda r: (r["microbatches"], r["remat"], r["dtype"] != "float32"))
    name = f"{method} phase {phase} at {batch} per stream"
    if not fit:
        best = min(mine, key=lambda r: r["peak"])
        return (f"**{name}: no configuration fits {gib:g} GiB**; the smallest, microbatches "
                f"{best['microbatches']}, remat {best['remat']}, {best['dtype']}, needs "
                f"{best['peak'] / 2**30:.2f} GiB ({(best['peak'] - budget) / 2**30:.2f} GiB "
                "over).")
    return (f"**{name} fits {gib:g} GiB with** " + "; ".join(
        f"microbatches {r['microbatches']}, remat {r['remat']}, {r['dtype']} "
        f"({r['peak'] / 2**30:.2f} GiB)"
        for r in fit) + ".")
