"""End-to-end LPT throughput on this CPU: the shipped train steps and inference, synthetic vs
real input.

    .venv/bin/python benchmarks/bench_train_throughput.py [--size B/16] [--batch 8] [--repeats 2]

Times the library's code, not a copy (benchmarks/shipped.py builds it): the train steps are
`lpt_jax.steps.make_train_step(...)` compiled by `TrainStep.jit(mesh)`, as
`lpt_jax.trainer.run_phase` runs them, inference is `lpt_jax.inference.make_predict_fn`; the
release's way of phase 2 is the same factory given `dataclasses.replace(PHASES[2],
forward_method=LPT.phase2_reference)`. For ViT-<size> at 224 px (configs/common.py's base
config, random weights, 365 classes, P=10, M=20, K=L/2, top-2, fp32):
  * phase-1 train step, phase-2 train step (shared trunk) and the release's way (two full
    passes), phase-2 inference both ways: images/s (train steps count both batches of the dual
    pair), median of --repeats calls after a warm-up, all five called in turn (round-robin);
  * the train steps fed by synthetic batches and by the real input pipeline
    (`lpt_jax.data.make_train_stream` over long-tailed CIFAR-10 JPEGs upscaled to 256x256, as
    Places-LT's images are; decode + RandomResizedCrop + flip, dual sampling; placed with
    `parallel.global_batch` as the trainer does), so that an input bottleneck shows as a gap;
    plus the pipeline alone;
  * achieved FLOP/s against the analytic FLOP count (`gpu_h100.lpt_step_flops`, written out
    there) and against XLA's `cost_analysis()`; images per CPU-second of this process (less
    sensitive to other jobs on the shared cores);
  * memory: the compiled step's peak bytes (`memory_analysis()`: arguments + outputs +
    temporaries - donated) with and without remat (`model.vit.remat`), and the batch that
    would fit in this machine's RAM by the per-image bytes;
  * the PyTorch + timm reference (benchmarks/results/torch_reference.json, same steps, same
    batch) as a ratio to ours.
Writes results/train_throughput.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
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

import gpu_h100 as g  # noqa: E402  (the analytic FLOP count only)
import jax  # noqa: E402

from lpt_jax import parallel  # noqa: E402

import host  # noqa: E402
import shipped  # noqa: E402

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

    B = args.batch
    config = shipped.bench_config(args.size, batch=B)
    model, params = shipped.build(config)
    mesh = shipped.make_mesh()
    params = jax.device_put(params, parallel.replicated(mesh))
    synth = shipped.synthetic_batch(B, 224, mesh)

    cases = [  # name, kind, phase, train
        ("phase-1 train step", "phase1_train", shipped.PHASE1, True),
        ("phase-2 train step, shared trunk", "phase2_train", shipped.SHARED_TRUNK, True),
        ("phase-2 train step, release way", "phase2_ref_train", shipped.RELEASE_WAY, True),
        ("phase-2 inference, shared trunk", "phase2_infer", shipped.SHARED_TRUNK, False),
        ("phase-2 inference, release way", "phase2_ref_infer", shipped.RELEASE_WAY, False),
    ]
    prepared, rows = {}, []
    for name, kind, phase, train in cases:
        if train:
            p = shipped.prepare_step(model, phase, config, params, batch=B, mesh=mesh,
                                     data=synth, name=name)
        else:
            p = shipped.prepare_predict(model, phase, params, batch=B, image_size=224,
                                        mesh=mesh, name=name)
        prepared[name] = p
        fp = p.footprint
        rows.append(dict(case=name, kind=kind, input="synthetic", images=p.images,
                         compile_s=p.compile_s, xla_gflop=fp["xla_flops"] / 1e9,
                         analytic_gflop=g.lpt_step_flops(model, kind, B) / 1e9,
                         peak_mib=fp.get("peak", float("nan")) / 2**20,
                         temp_mib=fp.get("temp", float("nan")) / 2**20, times=[], cpu=[]))
        log(f"{name}: compiled in {p.compile_s:.0f} s, XLA {rows[-1]['xla_gflop']:.0f}"
            f" GFLOP, analytic {rows[-1]['analytic_gflop']:.0f} GFLOP, peak "
            f"{rows[-1]['peak_mib']:.0f} MiB")

    # Warm-up, then round-robin timing of the synthetic rows.
    by_name = {r["case"]: r for r in rows}
    for p in prepared.values():
        p.call()
    for _ in range(args.repeats):
        for name, p in prepared.items():
            w, cpu = p.call()
            by_name[name]["times"].append(w)
            by_name[name]["cpu"].append(cpu)
            log(f"  {name}: {w:.2f} s, {cpu:.2f} CPU-s")
    for name, p in prepared.items():
        by_name[name]["finite"] = p.finite()

    # The train steps fed by the real pipeline (next batch + placement + step, in turn).
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
            p = prepared[name]
            row = dict(by_name[name], input="real pipeline", times=[], cpu=[])
            for _ in range(args.repeats):
                def step():
                    p.with_batch(parallel.global_batch(next(real), mesh))
                    p.call()
                w, cpu = timed(step)
                row["times"].append(w)
                row["cpu"].append(cpu)
                log(f"  {name} (real input): {w:.2f} s")
            row["finite"] = p.finite()
            rows.append(row)
        del real
    fixed = sum(x.nbytes for x in jax.tree.leaves(params))
    mem_no_remat = {name: prepared[name].footprint for name, *_ in cases[:2]}
    prepared.clear()

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
        by_name[ours]["vs_release_way_cpu"] = (by_name[ours]["images_per_cpu_s"]
                                               / by_name[base]["images_per_cpu_s"])

    # Memory with and without remat (compile only; without remat: the programs timed above).
    mem = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    remat_config = shipped.with_remat(config)
    remat_model = shipped.lpt_from_config(remat_config.model, shipped.NUM_CLASSES)
    for remat in (False, True):
        for name, kind, phase, train in cases[:2]:
            if remat:
                fp = shipped.prepare_step(remat_model, phase, remat_config, params, batch=B,
                                          mesh=mesh, data=synth).footprint
            else:
                fp = mem_no_remat[name]
            per_image = (fp["peak"] - fixed) / B
            mem.append(dict(case=name, remat=remat, batch=B, peak_mib=fp["peak"] / 2**20,
                            temp_mib=fp["temp"] / 2**20, mib_per_b=per_image / 2**20,
                            fits_ram_b=int((0.9 * ram - fixed) // per_image)))
            log(f"memory {name} remat={remat}: {mem[-1]['peak_mib']:.0f} MiB")

    info = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                cpu=host.cpu_model(), cores=host.cores(), jax=jax.__version__,
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
        "Timed: the shipped code — `lpt_jax.steps.make_train_step(...)` compiled by "
        "`TrainStep.jit(mesh)` (what the trainer runs; state threaded through and donated) and "
        "`lpt_jax.inference.make_predict_fn`; the release way is the same factory given "
        "`dataclasses.replace(PHASES[2], forward_method=LPT.phase2_reference)` "
        "(benchmarks/shipped.py).",
        "",
        f"ViT-{args.size} at 224 px (configs/common.py base config), random weights, 365 "
        "classes, P=10, M=20, K=L/2, top-2. "
        f"Train steps: dual pair, 2 x {args.batch} images per step (both counted). Median of "
        f"{args.repeats} calls after a warm-up. Analytic FLOPs: matmuls only, activation "
        "gradients only (frozen backbone), see `gpu_h100.lpt_step_flops`; XLA FLOPs from "
        "`cost_analysis()` (includes elementwise work). img/CPU-s = images per CPU-second of "
        "this process (all its threads).",
        "",
        "| case | input | s/step | img/s | img/CPU-s | vs release way (wall / per CPU-s) | "
        "analytic GFLOP | "
        "XLA GFLOP | analytic GFLOP/s | XLA GFLOP/s | PyTorch ratio (wall / per CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = (f"{r['vs_release_way']:.2f}x / {r['vs_release_way_cpu']:.2f}x"
              if "vs_release_way" in r else "")
        pt = (f"{r['vs_torch']:.2f}x / {r['vs_torch_per_cpu_s']:.2f}x vs `{r['torch_case']}`"
              if "vs_torch" in r else "")
        L.append(f"| {r['case']} | {r['input']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
                 f"{r['images_per_cpu_s']:.2f} | {vs} | {r['analytic_gflop']:.0f} | "
                 f"{r['xla_gflop']:.0f} | {r['analytic_gflops']:.1f} | {r['xla_gflops']:.1f} | "
                 f"{pt} |")
    other_cpu = torch and torch.get("cpu") != info["cpu"]
    L += ["", "PyTorch ratio: our images/s over the PyTorch + timm number of "
          "benchmarks/results/torch_reference.json for the release's computation (two full "
          "passes), measured in another run at another load: read it with the per-CPU-second "
          "column, which discounts the load." if torch else
          "PyTorch reference: benchmarks/results/torch_reference.json absent.", ""]
    if other_cpu:
        L += [f"**The PyTorch run was on another CPU** ({torch['cpu']}, {torch['date']}; this "
              f"run: {info['cpu']}): the PyTorch column compares machines, not libraries. Rerun "
              "benchmarks/bench_torch_reference.py on this machine for a valid ratio.", ""]
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
