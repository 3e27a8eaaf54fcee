"""Issue 14: one frozen ViT-B/16 serving many tasks (`lpt_jax.serving`) against one model per task.

Setup, in a temporary folder deleted afterwards: a random ViT-B/16 backbone (224 px, no head)
in big_vision layout, and random exports of 365 classes (Places-LT's) with the trainer's meta:
16 of phase 2 and 8 of phase 1 (values drawn in NumPy; nothing is trained).

Memory, each case in a FRESH subprocess (the same imports in every case, then the RSS
high-water mark reset, so only what the case loads and runs counts):

    shared N     MultiTaskPredictor.from_exports(backbone, N phase-2 exports), then one
                 mixed batch of 8 images over the N tasks (the shipped predictor);
    separate N   N single-task models as the single-task path holds one: the LPT tree with
                 its own backbone loaded from the file and the export put in
                 (`exports.apply`), on the device; one batch of 8 through the first and the
                 last of them (`inference.make_predict_fn`, the single-task forward).

and reports the parameter bytes held on the device (what an accelerator would hold; on this
CPU the device is host memory) and the peak RSS above the post-import baseline.

Throughput, in one process, after a warm-up call each, every round timing each variant once
in a new random order (images per wall second and per CPU second of the process, median over
rounds; the ratios are taken within each round, then their median):

    single p2    the single-task phase-2 forward (`inference.make_predict_fn`), batch 8;
    mixed p2     `MultiTaskPredictor.scores`, batch 8, each row a random one of 8 phase-2 tasks;
    single p1    the single-task phase-1 forward, batch 8;
    mixed p1+p2  `scores`, batch 8 rows: 4 of random phase-1 tasks, 4 of random phase-2 tasks,
                 in random positions; compared with serving the same images single-task,
                 i.e. half a phase-1 batch plus half a phase-2 batch.

    .venv/bin/python benchmarks/multitask.py                       # all, ~4 min idle
    .venv/bin/python benchmarks/multitask.py --tasks 1,4 --repeats 2 --results ''

Results go to benchmarks/results/multitask.md; a hand-written '## Analysis' section in that
file is kept on reruns. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import host  # noqa: E402

MiB = 2 ** 20
NUM_CLASSES = 365
BATCH = 8
NOTES_HEADING = "## Analysis"


# ------------------------------------------------------------------------------------------
# Memory held.

def nbytes(tree) -> int:
    import jax
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------
# Setup: the backbone file and the exports (parent process).

def bench_config():
    from shipped import bench_config as shipped_config
    return shipped_config("B/16", batch=BATCH)


def abstract(model, image_size=224):
    import jax
    import jax.numpy as jnp
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))[
        "params"]


def draw(shapes, seed: int):
    """Random values of `shapes`: LayerNorm scales 1, biases 0, the rest N(0, 0.02^2)."""
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "bias" in name:
            return np.zeros(leaf.shape, np.float32)
        return 0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)
    return jax.tree_util.tree_map_with_path(one, shapes)


def write_inputs(folder: Path, phase2: int, phase1: int) -> dict:
    """backbone.npz and exports p2_<i>.npz / p1_<i>.npz in `folder`; returns their paths."""
    from lpt_jax.backbones import vit_weights
    from lpt_jax.method.lpt_model import lpt_from_config
    from lpt_jax.method.phases import PHASES
    from lpt_jax.run import exports
    from lpt_jax.weights import npz
    config = bench_config()
    model = lpt_from_config(config.model, NUM_CLASSES)
    shapes = abstract(model)
    path = str(folder / "backbone.npz")
    vit_weights.save_big_vision_npz(path, draw(shapes["backbone"], seed=0))
    config.backbone.checkpoint = path
    meta = {"step": 1, "config": json.loads(config.to_json_best_effort()),
            "backbone": npz.file_fingerprint(path), "num_classes": NUM_CLASSES,
            "class_names": [f"class_{c}" for c in range(NUM_CLASSES)]}
    prompts = {k: v for k, v in shapes.items() if k != "backbone"}
    out = {"backbone": path, "phase2": [], "phase1": []}
    for phase, count in ((2, phase2), (1, phase1)):
        for i in range(count):
            p = str(folder / f"p{phase}_{i}.npz")
            trained = exports.exported_subtree(draw(prompts, seed=100 * phase + i), PHASES[phase])
            exports.write(p, trained, {**meta, "phase": phase})
            out[f"phase{phase}"].append(p)
    return out


# ------------------------------------------------------------------------------------------
# One memory case (a subprocess).

def images(n: int, seed: int = 1):
    import numpy as np
    return np.random.default_rng(seed).uniform(-1, 1, (n, 224, 224, 3)).astype(np.float32)


def memory_case(kind: str, n: int, inputs: dict) -> dict:
    import jax
    import numpy as np

    from lpt_jax import parallel, serving
    from lpt_jax.backbones import vit
    from lpt_jax.method.lpt_model import lpt_from_config
    from lpt_jax.method.phases import PHASES
    from lpt_jax.run import exports, inference  # noqa: F401 - same imports
    config = bench_config()
    model = lpt_from_config(config.model, NUM_CLASSES)
    shapes = abstract(model)
    batch = images(BATCH)
    gc.collect()
    base = host.rss_bytes()
    host.reset_hwm()
    t0 = time.perf_counter()
    paths = inputs["phase2"][:n]
    if kind == "shared":
        predictor = serving.MultiTaskPredictor.from_exports(
            inputs["backbone"], {f"task{i}": p for i, p in enumerate(paths)}, batch_size=BATCH)
        held = nbytes(predictor._params) + nbytes(predictor._stack)
        tasks = [f"task{i}" for i in np.random.default_rng(0).integers(0, n, BATCH)]
        ok = np.isfinite(predictor.scores(batch, tasks).probabilities).all()
    else:
        predict = inference.make_predict_fn(model, PHASES[2], parallel.make_mesh(
            jax.devices()[:1]))
        held_models = []
        for p in paths:
            params, _ = exports.apply(shapes, p)
            params["backbone"] = vit.load_params(inputs["backbone"], shapes["backbone"],
                                                 ignore=config.backbone.ignore,
                                                 model=model.backbone)
            held_models.append(jax.device_put(params))
            del params
        held = nbytes(held_models)
        ok = all(np.isfinite(np.asarray(predict(m, batch)[0])).all()
                 for m in {id(held_models[0]): held_models[0],
                           id(held_models[-1]): held_models[-1]}.values())
    seconds = time.perf_counter() - t0
    peak = host.hwm_bytes()
    return {"kind": kind, "tasks": n, "held_bytes": held, "baseline_rss": base,
            "peak_rss": peak, "peak_extra": peak - base, "seconds": round(seconds, 1),
            "finite": bool(ok)}


def run_memory_case(kind: str, n: int, inputs_file: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", f"{kind}:{n}",
                          "--inputs", inputs_file], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"case {kind}:{n} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------
# Throughput (one process).

def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def throughput(inputs: dict, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lpt_jax import parallel, serving
    from lpt_jax.backbones import vit
    from lpt_jax.method.lpt_model import lpt_from_config
    from lpt_jax.method.phases import PHASES
    from lpt_jax.run import exports, inference
    config = bench_config()
    model = lpt_from_config(config.model, NUM_CLASSES)
    shapes = abstract(model)
    mesh = parallel.make_mesh(jax.devices()[:1])
    p2, p1 = inputs["phase2"][:8], inputs["phase1"][:8]
    predictor = serving.MultiTaskPredictor.from_exports(
        inputs["backbone"], {**{f"p2_{i}": p for i, p in enumerate(p2)},
                             **{f"p1_{i}": p for i, p in enumerate(p1)}}, batch_size=BATCH)
    backbone_params = vit.load_params(inputs["backbone"], shapes["backbone"],
                                      ignore=config.backbone.ignore, model=model.backbone)

    def single(phase, path):
        params, _ = exports.apply(shapes, path)
        params["backbone"] = backbone_params
        params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype)
                              if isinstance(x, jax.ShapeDtypeStruct) else x, params)
        params = jax.device_put(params)
        predict = inference.make_predict_fn(model, PHASES[phase], mesh)
        return lambda imgs: np.asarray(predict(params, jnp.asarray(imgs))[0])

    rng = np.random.default_rng(0)
    batch = images(BATCH)
    single_p2, single_p1 = single(2, p2[0]), single(1, p1[0])

    def mixed_p2_tasks():
        return [f"p2_{i}" for i in rng.integers(0, 8, BATCH)]

    def mixed_half_tasks():
        rows = [f"p1_{i}" for i in rng.integers(0, 8, BATCH // 2)] + [
            f"p2_{i}" for i in rng.integers(0, 8, BATCH // 2)]
        return [rows[i] for i in rng.permutation(BATCH)]

    variants = {
        "single p2": lambda: single_p2(batch),
        "mixed p2": lambda: predictor.scores(batch, mixed_p2_tasks()),
        "single p1": lambda: single_p1(batch),
        "mixed p1+p2": lambda: predictor.scores(batch, mixed_half_tasks()),
    }
    compile_s = {name: round(timed(fn)[0], 1) for name, fn in variants.items()}  # warm-up
    times = {name: [] for name in variants}
    order = list(variants)
    for _ in range(repeats):  # each round in a new order: load drifts hit every variant alike
        for name in [order[i] for i in rng.permutation(len(order))]:
            times[name].append(timed(variants[name]))
    med = {name: (float(np.median([w for w, _ in t])), float(np.median([c for _, c in t])))
           for name, t in times.items()}
    ratios = {}  # per round (variants timed within minutes of each other), then the median
    for clock in (0, 1):
        def at(name, r):
            return times[name][r][clock]
        per_round = {
            "mixed p2 / single p2": [at("single p2", r) / at("mixed p2", r)
                                     for r in range(repeats)],
            "mixed p1+p2 / (half single p1 + half single p2)": [
                (at("single p1", r) + at("single p2", r)) / 2 / at("mixed p1+p2", r)
                for r in range(repeats)]}
        for name, values in per_round.items():
            ratios.setdefault(name, {})[("wall", "cpu")[clock]] = (
                float(np.median(values)), float(min(values)), float(max(values)))
    return {"compile_s": compile_s, "median_s": med, "ratios": ratios,
            "rounds": {n: [[round(w, 2), round(c, 2)] for w, c in t] for n, t in times.items()}}


# ------------------------------------------------------------------------------------------
# Report.

def machine() -> str:
    import jax
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{host.cpu_model()}, {host.cores()} cores, {mem:.1f} GiB RAM, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, jax {jax.__version__}; "
            f"load average at the end {load}. Date: "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.")


def report(memory: list, speed: dict, repeats: int) -> str:
    lines = ["# One backbone serving many tasks (`lpt_jax.serving`) vs one model per task", "",
             f"Machine: {machine()}",
             "Script: `benchmarks/multitask.py` (random ViT-B/16 at 224 px, exports of "
             f"{NUM_CLASSES} classes, batch {BATCH}, fp32, CPU).", ""]
    if memory:
        by = {(m["kind"], m["tasks"]): m for m in memory}
        lines += ["## Memory", "",
                  "held = parameter bytes on the device (backbone + prompts, pools, keys, heads); "
                  "peak extra = RSS high-water mark of a fresh process above its post-import "
                  "baseline, while it loads the tasks and runs one batch of 8.", "",
                  "| tasks | shared: held MiB | shared: peak extra MiB | separate: held MiB | "
                  "separate: peak extra MiB | held ratio | peak ratio |",
                  "|---|---|---|---|---|---|---|"]
        for n in sorted({m["tasks"] for m in memory}):
            s, p = by.get(("shared", n)), by.get(("separate", n))
            cell = lambda m, k: f"{m[k] / MiB:.0f}" if m else "-"  # noqa: E731
            ratio = lambda k: (f"**{p[k] / s[k]:.1f}x**" if s and p else "-")  # noqa: E731
            lines.append(f"| {n} | {cell(s, 'held_bytes')} | {cell(s, 'peak_extra')} | "
                         f"{cell(p, 'held_bytes')} | {cell(p, 'peak_extra')} | "
                         f"{ratio('held_bytes')} | {ratio('peak_extra')} |")
        lines += ["", "Per case: " + "; ".join(
            f"{m['kind']} {m['tasks']}: {m['seconds']} s, baseline "
            f"{m['baseline_rss'] / MiB:.0f} MiB, finite {m['finite']}" for m in memory), ""]
    if speed:
        med = speed["median_s"]
        rate = {n: (BATCH / w, BATCH / c) for n, (w, c) in med.items()}
        lines += ["## Throughput", "",
                  f"Median of {repeats} rounds (each variant once a round, in a random order) "
                  "after one warm-up call each "
                  f"(compile + first call, s: {speed['compile_s']}).", "",
                  "| variant | s / batch (wall) | img/s (wall) | img / CPU-s |", "|---|---|---|---|"]
        for n, (w, c) in med.items():
            lines.append(f"| {n} | {w:.2f} | {rate[n][0]:.2f} | {rate[n][1]:.2f} |")
        lines += ["", "Throughput ratios, mixed-task over single-task (> 1: mixed is faster), "
                  "computed per round and given as median (min-max over rounds):", "",
                  "| ratio | wall | CPU seconds |", "|---|---|---|"]
        for name, by_clock in speed["ratios"].items():
            cells = [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in
                     (by_clock["wall"], by_clock["cpu"])]
            lines.append(f"| {name} | {cells[0]} | **{cells[1]}** |")
        lines += ["", "Rounds (wall s, CPU s): " + json.dumps(speed["rounds"]), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="1,4,16", help="N of the memory cases")
    parser.add_argument("--repeats", type=int, default=7, help="throughput rounds")
    parser.add_argument("--skip", default="", help="'memory' and/or 'throughput'")
    parser.add_argument("--results", default=str(REPO / "benchmarks/results/multitask.md"))
    parser.add_argument("--case", help=argparse.SUPPRESS)    # subprocess: kind:N
    parser.add_argument("--inputs", help=argparse.SUPPRESS)  # subprocess: the inputs' JSON
    args = parser.parse_args()
    if args.case:
        kind, n = args.case.split(":")
        print(json.dumps(memory_case(kind, int(n), json.loads(Path(args.inputs).read_text()))))
        return
    counts = [int(n) for n in args.tasks.split(",") if n]
    folder = Path(tempfile.mkdtemp(prefix="lpt_multitask_"))
    try:
        t0 = time.perf_counter()
        inputs = write_inputs(folder, phase2=max(counts + [8]), phase1=8)
        (folder / "inputs.json").write_text(json.dumps(inputs))
        print(f"inputs written in {time.perf_counter() - t0:.0f} s", flush=True)
        memory = []
        if "memory" not in args.skip:
            for n in counts:
                for kind in ("shared", "separate"):
                    memory.append(run_memory_case(kind, n, str(folder / "inputs.json")))
                    print(json.dumps(memory[-1]), flush=True)
        speed = {}
        if "throughput" not in args.skip:
            speed = throughput(inputs, args.repeats)
            print(json.dumps(speed), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = report(memory, speed, args.repeats)
    print(text)
    if args.results:
        out = Path(args.results)
        old = out.read_text() if out.exists() else ""
        if NOTES_HEADING in old:  # keep the hand-written analysis
            text += "\n" + old[old.index(NOTES_HEADING):]
        out.write_text(text)


if __name__ == "__main__":
    main()
