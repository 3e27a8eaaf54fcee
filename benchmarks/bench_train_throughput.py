"""End-to-end LPT throughput on this CPU: train steps and inference, synthetic vs real input.

    .venv/bin/python benchmarks/bench_train_throughput.py [--size B/16] [--batch 8] [--repeats 2]

For ViT-<size> at 224 px (random weights, 365 classes, P=10, M=20, K=L/2, top-2, fp32):
  * phase-1 train step, phase-2 train step (shared trunk) and the release's way (two full
    passes), phase-2 inference both ways: images/s (train steps count both batches of the dual
    pair), median of --repeats calls after a warm-up, the compared variants called in turn;
  * the train steps fed by synthetic in-memory batches and by the real input pipeline
    (`lpt_jax.data.make_train_stream` over long-tailed CIFAR-10 JPEGs upscaled to 256x256, as
    Places-LT's images are; decode + RandomResizedCrop + flip, dual sampling), so that an input
    bottleneck shows as a gap; plus the pipeline alone;
  * achieved FLOP/s against the analytic FLOP count (`gpu_h100.lpt_step_flops`, written out
    there) and against XLA's `cost_analysis()`; images per CPU-second of this process (less
    sensitive to other jobs on the shared cores);
  * memory: the compiled step's peak bytes (`memory_analysis()`: arguments + outputs +
    temporaries - donated) with and without remat, and the batch that would fit in this
    machine's RAM by the per-image bytes;
  * the PyTorch + timm reference (benchmarks/results/torch_reference.json, same steps, same
    batch) as a ratio to ours.
The step functions are benchmarks/gpu_h100.py's (they mirror lpt_jax.train.make_train_step:
trainable-only gradients, A-GCL on both branches, SGD + coupled decay). Writes
results/train_throughput.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gpu_h100 as g  # noqa: E402
from lpt_jax import tree  # noqa: E402
from lpt_jax.models.lpt import LPT, TRAINABLE  # noqa: E402
from lpt_jax.models.vit import decode_variant  # noqa: E402

RESULTS = HERE / "results" / "train_throughput.md"
TORCH = HERE / "results" / "torch_reference.json"
TARBALL = HERE.parents[1] / "shared" / "data" / "images" / "cifar10-jpg.tar.gz"
TORCH_CASE = {"phase-1 train step": "phase1_train_step",
              "phase-2 train step, shared trunk": "phase2_train_step_reference",
              "phase-2 inference, shared trunk": "phase2_inference_reference"}


def real_stream(batch: int, workdir: Path):
    """The trainer's dual-sampling stream over upscaled CIFAR-10 JPEGs (None without data)."""
    if not TARBALL.exists():
        return None
    from bench_input_pipeline import make_tree
    from lpt_jax import data
    from lpt_jax.data import testing
    root = make_tree(workdir, (256, 256), testing.long_tail_counts(10, 120, 8))
    cfg = data.default_config()
    cfg.name, cfg.root, cfg.image_size = "image_folder", str(root), 224
    src = data.get_source(cfg)
    return data.make_train_stream(src, cfg, global_batch_size=batch, seed=0)


def as_step_batch(b: dict) -> dict:
    return dict(cb_images=jnp.asarray(b["cb"]["image"]), ib_images=jnp.asarray(b["ib"]["image"]),
                cb_labels=jnp.asarray(b["cb"]["label"]), ib_labels=jnp.asarray(b["ib"]["label"]))


def timed(fn):
    """(wall seconds, CPU seconds of this process) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="B/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-real", action="store_true", help="skip the real-pipeline rows")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    vit_kwargs = dict(image_size=(224, 224), **decode_variant(args.size))
    models = {r: g.build_model(vit_kwargs, jnp.float32, r) for r in (False, True)}
    model = models[False]
    params = g.random_params(model, 224)
    B = args.batch
    synth = g.synthetic_batch(B, 224)
    rng = jax.random.key(2)
    ref = functools.partial(LPT.phase2_reference, distinct_passes=True)

    cases = [  # name, kind, method, train, remat
        ("phase-1 train step", "phase1_train", LPT.phase1, True),
        ("phase-2 train step, shared trunk", "phase2_train", LPT.phase2, True),
        ("phase-2 train step, release way", "phase2_ref_train", ref, True),
        ("phase-2 inference, shared trunk", "phase2_infer", LPT.phase2, False),
        ("phase-2 inference, release way", "phase2_ref_infer", ref, False),
    ]
    compiled, rows = {}, []
    for name, kind, method, train in cases:
        phase = 1 if kind.startswith("phase1") else 2
        trainable, frozen = tree.split(params, TRAINABLE[phase])
        if train:
            tx = g.optimizer(B)
            fn = jax.jit(g.make_train_step(model, method, tx))
            fargs = (trainable, tx.init(trainable), frozen, synth, rng)
        else:
            fn = jax.jit(g.make_infer(model, method))
            fargs = (trainable, frozen, synth["ib_images"])
        t0 = time.perf_counter()
        c = fn.lower(*fargs).compile()
        fp = g.footprint(c)
        compiled[name] = (c, fargs)
        images = 2 * B if train else B
        rows.append(dict(case=name, kind=kind, input="synthetic", images=images,
                         compile_s=time.perf_counter() - t0, xla_gflop=fp["xla_flops"] / 1e9,
                         analytic_gflop=g.lpt_step_flops(model, kind, B) / 1e9,
                         peak_mib=fp.get("peak", float("nan")) / 2**20, times=[], cpu=[]))
        log(f"{name}: compiled in {rows[-1]['compile_s']:.0f} s, XLA {rows[-1]['xla_gflop']:.0f}"
            f" GFLOP, analytic {rows[-1]['analytic_gflop']:.0f} GFLOP, peak "
            f"{rows[-1]['peak_mib']:.0f} MiB")

    # Warm-up, then round-robin timing of the synthetic rows.
    by_name = {r["case"]: r for r in rows}
    for name, (c, fargs) in compiled.items():
        jax.block_until_ready(c(*fargs))
    for _ in range(args.repeats):
        for name, (c, fargs) in compiled.items():
            w, cpu = timed(lambda: jax.block_until_ready(c(*fargs)))
            by_name[name]["times"].append(w)
            by_name[name]["cpu"].append(cpu)
            log(f"  {name}: {w:.2f} s")

    # The train steps fed by the real pipeline (next batch + transfer + step, one after another).
    real = None if args.no_real else real_stream(B, Path(tempfile.mkdtemp(prefix="lpt_tp_")))
    pipeline = None
    if real is not None:
        for _ in range(2):
            next(real)  # tf.data warm-up
        n = 6
        w, cpu = timed(lambda: [next(real) for _ in range(n)])
        pipeline = dict(images_per_s=2 * B * n / w, images_per_cpu_s=2 * B * n / cpu)
        log(f"pipeline alone: {pipeline['images_per_s']:.1f} img/s")
        for name in ("phase-1 train step", "phase-2 train step, shared trunk"):
            c, fargs = compiled[name]
            row = dict(by_name[name], input="real pipeline", times=[], cpu=[])
            for _ in range(args.repeats):
                def step():
                    batch = as_step_batch(next(real))
                    jax.block_until_ready(c(*fargs[:3], batch, fargs[4]))
                w, cpu = timed(step)
                row["times"].append(w)
                row["cpu"].append(cpu)
                log(f"  {name} (real input): {w:.2f} s")
            rows.append(row)
        del real

    torch = json.loads(TORCH.read_text()) if TORCH.exists() else None
    for r in rows:
        r["step_s"] = statistics.median(r["times"])
        r["images_per_s"] = r["images"] / r["step_s"]
        r["images_per_cpu_s"] = r["images"] / statistics.median(r["cpu"])
        r["analytic_gflops"] = r["analytic_gflop"] / r["step_s"]
        r["xla_gflops"] = r["xla_gflop"] / r["step_s"]
        tc = torch and torch["cases"].get(TORCH_CASE.get(r["case"], ""))
        if tc and r["input"] == "synthetic" and torch.get("batch") == B:
            r["torch_case"] = TORCH_CASE[r["case"]]
            r["vs_torch"] = r["images_per_s"] / tc["images_per_s"]
            r["vs_torch_per_cpu_s"] = r["images_per_cpu_s"] / (
                tc["images_per_call"] / statistics.median(tc["cpu_s"]))
    for ours, base in (("phase-2 train step, shared trunk", "phase-2 train step, release way"),
                       ("phase-2 inference, shared trunk", "phase-2 inference, release way")):
        by_name[ours]["vs_release_way"] = by_name[base]["step_s"] / by_name[ours]["step_s"]

    # Memory with and without remat (compile only), and the batch RAM would allow.
    mem = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fixed = sum(x.nbytes for x in jax.tree.leaves(params))
    for remat in (False, True):
        for name, kind, method, train in cases[:2]:
            phase = 1 if kind.startswith("phase1") else 2
            trainable, frozen = tree.split(params, TRAINABLE[phase])
            tx = g.optimizer(B)
            fn = jax.jit(g.make_train_step(models[remat], method, tx))
            fp = g.footprint(fn.lower(trainable, tx.init(trainable), frozen, synth, rng).compile())
            per_image = (fp["peak"] - fixed) / B
            mem.append(dict(case=name, remat=remat, batch=B, peak_mib=fp["peak"] / 2**20,
                            temp_mib=fp["temp"] / 2**20, mib_per_b=per_image / 2**20,
                            fits_ram_b=int((0.9 * ram - fixed) // per_image)))
            log(f"memory {name} remat={remat}: {mem[-1]['peak_mib']:.0f} MiB")

    info = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=_cpu_model(),
                cores=len(os.sched_getaffinity(0)), jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), ram_gib=ram / 2**30,
                load_before=load_before, load_after=os.getloadavg()[0],
                total_s=time.perf_counter() - t_start)
    text = report(rows, mem, pipeline, torch, info, args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            dict(info=info, args=vars(args), rows=rows, memory=mem, pipeline=pipeline),
            indent=1, default=str))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def report(rows, mem, pipeline, torch, info, args) -> str:
    L = [
        "# LPT end-to-end throughput on this CPU",
        "",
        f"Measured {info['date']} by `benchmarks/bench_train_throughput.py --size {args.size} "
        f"--batch {args.batch} --repeats {args.repeats}` on {info['cpu']}, {info['cores']} "
        f"cores, {info['ram_gib']:.0f} GiB; jax {info['jax']}, fp32, XLA_FLAGS "
        f"`{info['xla_flags'] or '(none)'}`; 1-minute load average {info['load_before']:.1f} "
        f"before / {info['load_after']:.1f} after (other jobs share the cores); "
        f"{info['total_s']:.0f} s in all.",
        "",
        f"ViT-{args.size} at 224 px, random weights, 365 classes, P=10, M=20, K=L/2, top-2. "
        f"Train steps: dual pair, 2 x {args.batch} images per step (both counted). Median of "
        f"{args.repeats} calls after a warm-up. Analytic FLOPs: matmuls only, activation "
        "gradients only (frozen backbone), see `gpu_h100.lpt_step_flops`; XLA FLOPs from "
        "`cost_analysis()` (includes elementwise work). img/CPU-s = images per CPU-second of "
        "this process (all its threads).",
        "",
        "| case | input | s/step | img/s | img/CPU-s | vs release way | analytic GFLOP | "
        "XLA GFLOP | analytic GFLOP/s | XLA GFLOP/s | PyTorch ratio (wall / per CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_release_way']:.2f}x" if "vs_release_way" in r else ""
        pt = (f"{r['vs_torch']:.2f}x / {r['vs_torch_per_cpu_s']:.2f}x vs `{r['torch_case']}`"
              if "vs_torch" in r else "")
        L.append(f"| {r['case']} | {r['input']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
                 f"{r['images_per_cpu_s']:.2f} | {vs} | {r['analytic_gflop']:.0f} | "
                 f"{r['xla_gflop']:.0f} | {r['analytic_gflops']:.1f} | {r['xla_gflops']:.1f} | "
                 f"{pt} |")
    L += ["", "PyTorch ratio: our images/s over the PyTorch + timm number of "
          "benchmarks/results/torch_reference.json for the release's computation (two full "
          "passes), measured in another run at another load: read it with the per-CPU-second "
          "column, which discounts the load." if torch else
          "PyTorch reference: benchmarks/results/torch_reference.json absent.", ""]
    if pipeline:
        L += [f"Input pipeline alone (dual pair, batch {args.batch} per stream, 224 px crops of "
              f"256x256 JPEGs): {pipeline['images_per_s']:.1f} img/s, "
              f"{pipeline['images_per_cpu_s']:.1f} img/CPU-s.", ""]
    L += ["## Memory (compiled peak of one train step, `memory_analysis()`)", "",
          "| case | remat | B | peak MiB | temp MiB | MiB per B | B that fits 90 % of RAM |",
          "|---|---|---|---|---|---|---|"]
    for m in mem:
        L.append(f"| {m['case']} | {m['remat']} | {m['batch']} | {m['peak_mib']:.0f} | "
                 f"{m['temp_mib']:.0f} | {m['mib_per_b']:.0f} | {m['fits_ram_b']} |")
    L += ["", "B that fits: extrapolated from the per-B bytes (the CPU shares its RAM with other "
          "jobs; the largest batch is searched for real on a GPU by benchmarks/gpu_h100.py).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
