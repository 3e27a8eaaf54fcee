"""Phase-2 compute on a SigLIP So400m/14 tower: the shared trunk vs the release's two passes.

    .venv/bin/python benchmarks/bench_siglip_compute.py [--variant So400m/14] [--batch 8]
        [--image-size 224] [--timed-calls 1] [--out benchmarks/results/siglip_compute.md]

The shipped code (benchmarks/shipped.py): the phase-2 train step is
`lpt_jax.steps.make_train_step(...)` compiled by `TrainStep.jit(mesh)`, inference is
`lpt_jax.inference.make_predict_fn`; the variants are `PHASES[2]` (`LPT.phase2`: blocks
0..K-1 once, then the query and main branches, 2L-K blocks) and the release's way,
`PHASES[2]` with `forward_method=LPT.phase2_reference` (a full query pass and a full main
pass, 2L blocks, an optimization barrier keeping XLA from merging them). The backbone is the
SigLIP image tower as `configs/common.py:use_siglip` builds it (MAP pooling, no class token,
tanh GELU, LayerNorm eps 1e-6), random weights, K = L // 2 (13 of 27), 365 classes, P=10,
M=20, top-2, fp32, B images per stream (the train step sees the dual pair, 2B).

A So400m step takes about a minute on a 2-core CPU, so the main number is XLA's
`cost_analysis()` FLOP count of each compiled program (exact for what XLA will run, and
independent of the load of a shared machine); `--timed-calls N` adds N timed calls per
variant after one warm-up call (wall and process CPU seconds), alternating the variants.
Writes the markdown (and a .json beside it) to --out. Never touches the network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402

from lpt_jax.backbones.vit import decode_variant  # noqa: E402

import host  # noqa: E402
import shipped  # noqa: E402

RESULTS = HERE / "results" / "siglip_compute.md"
VARIANTS = {"release way (LPT.phase2_reference, 2L blocks)": shipped.RELEASE_WAY,
            "shared trunk (LPT.phase2, shipped PHASES[2])": shipped.SHARED_TRUNK}


def siglip_config(variant: str, image_size: int, batch: int):
    """shipped.bench_config with the SigLIP image tower of `variant` (e.g. 'So400m/14')."""
    sizes = decode_variant(variant)
    vit = dict(width=sizes["width"], depth=sizes["depth"], mlp_dim=sizes["mlp_dim"],
               num_heads=sizes["num_heads"], patch_size=sizes["patch_size"][0],
               pool_type="map", layernorm_epsilon=1e-6, gelu_approximate=True)
    return shipped.bench_config(image_size=image_size, batch=batch, vit=vit)


def run(args, log) -> list[dict]:
    config = siglip_config(args.variant, args.image_size, args.batch)
    model, params = shipped.build(config)
    mesh = shipped.make_mesh()
    params = jax.device_put(params, shipped.parallel.replicated(mesh))
    log(f"{args.variant}: depth {model.backbone.depth}, K {model.shared_depth}, grid "
        f"{model.backbone.grid}, pool {model.backbone.pool_type}")
    rows = []
    for comparison in ("phase-2 inference", "phase-2 train step"):
        prepared = []
        for name, phase in VARIANTS.items():
            log(f"  {comparison} | {name}: compiling ...")
            if comparison == "phase-2 train step":
                p = shipped.prepare_step(model, phase, config, params, batch=args.batch,
                                         mesh=mesh, name=name)
            else:
                p = shipped.prepare_predict(model, phase, params, batch=args.batch,
                                            image_size=args.image_size, mesh=mesh, name=name)
            log(f"    {p.footprint['xla_flops'] / 1e9:.1f} GFLOP, temp "
                f"{p.footprint.get('temp', float('nan')) / 2**20:.0f} MiB, compile "
                f"{p.compile_s:.0f} s")
            p.times, p.cpu = [], []
            prepared.append(p)
        if args.timed_calls:
            for p in prepared:
                p.call()  # warm-up
            for _ in range(args.timed_calls):
                for p in prepared:
                    w, c = p.call()
                    p.times.append(w)
                    p.cpu.append(c)
                    log(f"    {p.name}: {w:.1f} s, {c:.1f} CPU-s")
        base = prepared[0]
        for p in prepared:
            row = dict(comparison=comparison, variant=p.name, images=p.images,
                       gflops=p.footprint["xla_flops"] / 1e9,
                       temp_mib=p.footprint.get("temp", float("nan")) / 2**20,
                       compile_s=p.compile_s, times=p.times, cpu=p.cpu,
                       finite=p.finite() if p.times else None)
            row["flop_ratio"] = base.footprint["xla_flops"] / p.footprint["xla_flops"]
            if p.times:
                row["seconds"] = statistics.median(p.times)
                row["cpu_seconds"] = statistics.median(p.cpu)
                row["speedup_wall"] = statistics.median(base.times) / row["seconds"]
                row["speedup_cpu"] = statistics.median(base.cpu) / row["cpu_seconds"]
            rows.append(row)
        prepared.clear()
    return rows


def report(rows, args, info) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [
        "# Phase-2 compute on a SigLIP So400m/14 tower (the shipped step)", "",
        f"Measured {info['when']} by `benchmarks/bench_siglip_compute.py --variant "
        f"{args.variant} --batch {args.batch} --image-size {args.image_size} --timed-calls "
        f"{args.timed_calls}` on {info['cpu']}, {info['cores']} cores, device "
        f"{info['device']}; jax {jax.__version__}, fp32; load average before / after "
        f"{info['load_before']:.1f} / {info['load_after']:.1f}; {info['total_s'] / 60:.0f} min "
        "in all.", "",
        f"SigLIP image tower {args.variant} at {args.image_size} px (MAP pooling, no class "
        "token, tanh GELU, LayerNorm eps 1e-6; random weights), K = L // 2, 365 classes, P=10, "
        f"M=20, top-2. Inference: B={args.batch} images; train step: the dual pair "
        f"(2B={2 * args.batch} images), A-GCL on both branches, SGD. FLOPs from XLA's "
        "`cost_analysis()` of each compiled program; FLOP ratio = release way / variant.", "",
        "| comparison | variant | GFLOP | FLOP ratio | temp MiB | compile s | median s | "
        "median CPU-s | speedup (wall) | speedup (CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['comparison']} | {r['variant']} | {r['gflops']:.0f} | "
            f"{r['flop_ratio']:.3f}x | {r['temp_mib']:.0f} | {r['compile_s']:.0f} | "
            f"{f(r.get('seconds'), '.1f')} | {f(r.get('cpu_seconds'), '.1f')} | "
            f"{f(r.get('speedup_wall'), '.2f')} | {f(r.get('speedup_cpu'), '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="So400m/14")
    parser.add_argument("--batch", type=int, default=8, help="images per stream")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--timed-calls", type=int, default=1,
                        help="timed calls per variant after one warm-up (0: FLOPs only)")
    parser.add_argument("--out", default=str(RESULTS), help="markdown path ('' = no file)")
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    info = dict(when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=host.cpu_model(),
                cores=host.cores(), device=str(jax.devices()[0].device_kind),
                load_before=shipped.loadavg()[0])
    rows = run(args, log)
    info.update(load_after=shipped.loadavg()[0], total_s=time.perf_counter() - t0)
    text = report(rows, args, info)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(dict(machine=info, args=vars(args),
                                                            rows=rows), indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
