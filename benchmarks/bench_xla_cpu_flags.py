"""Which XLA CPU options speed up LPT's train steps on this CPU, and are they safe?

    .venv/bin/python benchmarks/bench_xla_cpu_flags.py [--variants default,ynn_off,...]

Each variant runs in its own subprocess (XLA_FLAGS is read once, when the CPU backend starts)
on the shipped phase-1 and phase-2 train steps (`lpt_jax.steps.make_train_step(...)` compiled
by `TrainStep.jit(mesh)`, as the trainer runs them; set up by benchmarks/shipped.py) of a small
ViT at 224 px (width 192, 6 blocks, patch 16, K=3, batch 4 per stream: a Ti/16 cut to half
depth to fit the time budget), with the same random parameters and batch. It records the
median step time, the custom fusion kinds in the compiled HLO (whether the option changed
anything), and the step's outputs (loss, grad norm, updated parameters; the lr is the
post-warm-up one so that the update is not negligible), which are compared with the
default's: a variant is *safe* when every output stays within --rtol of the default's (matmul
libraries sum in other orders, so bit equality is not expected). Writes
results/xla_cpu_flags.md and .json.

Outcome so far (results/xla_cpu_flags.md): no option won, so the library keeps XLA's default
CPU flags and sets none itself (the former `lpt_jax.platform` hook was deleted); this script
stays as the evidence and as the way to re-check on a new jaxlib.

Flags were found with `strings` on jaxlib's libjax_common.so (jaxlib 0.10.2): its XLA CPU
backend compiles dots to YNNPACK fusions by default (`xla_cpu_experimental_ynn_fusion_type`),
has XNNPACK (`xla_cpu_use_xnnpack`, `xla_cpu_experimental_xnn_fusion_type`,
`..._xnn_graph_fusion_mode`) and oneDNN (`xla_cpu_use_onednn`,
`xla_cpu_experimental_onednn_fusion_type`) switches, `xla_cpu_multi_thread_eigen`,
`xla_cpu_enable_fast_math`, `xla_cpu_enable_concurrency_optimized_scheduler`,
`xla_cpu_use_thunk_runtime`, `xla_cpu_prefer_vector_width`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "xla_cpu_flags.md"

VARIANTS = {
    "default": "",
    "ynn_off (Eigen dots)": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn dot+eltwise": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
    "xnnpack dots": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true "
                     "--xla_cpu_experimental_xnn_fusion_type=dot"),
    "xnn graph fusion greedy": ("--xla_cpu_use_xnnpack=true "
                                "--xla_cpu_experimental_xnn_graph_fusion_mode="
                                "XNN_GRAPH_FUSION_MODE_GREEDY"),
    "onednn dots": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
                    "--xla_cpu_experimental_onednn_fusion_type=dot"),
    "eigen single-threaded": "--xla_cpu_multi_thread_eigen=false",
    "concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


# ----------------------------------------------------------------------------- worker


def worker(out_prefix: str, repeats: int, batch: int) -> None:
    """Runs in the subprocess (XLA_FLAGS already set): times both steps, saves outputs."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import jax
    import numpy as np

    from lpt_jax import parallel, tree

    import shipped

    config = shipped.bench_config(
        image_size=224, batch=batch, shared_depth=3,
        vit=dict(patch_size=16, width=192, depth=6, mlp_dim=768, num_heads=3))
    config.optim.warmup_epochs = 0  # the cosine peak lr: updates large enough to compare
    model, params = shipped.build(config)
    mesh = shipped.make_mesh()
    params = jax.device_put(params, parallel.replicated(mesh))
    result, outputs, compiled = {}, {}, {}
    for phase in (shipped.PHASE1, shipped.SHARED_TRUNK):
        p = shipped.prepare_step(model, phase, config, params, batch=batch, mesh=mesh)
        n = phase.number
        result[f"p{n}_compile_s"] = p.compile_s
        result[f"p{n}_kinds"] = sorted(set(re.findall(r'"(__[a-z_]+)"', p.compiled.as_text())))
        p.call()  # warm-up (the first step from the shared start); its outputs are compared
        outputs.update({f"p{n}/loss": np.asarray(p.last["loss"]),
                        f"p{n}/gnorm": np.asarray(p.last["grad_norm"]),
                        **{f"p{n}/{k}": np.asarray(v)
                           for k, v in tree.flatten(p.args[0]["trainable"]).items()}})
        compiled[n] = p
    times = {1: [], 2: []}
    for _ in range(repeats):  # round-robin: load changes hit both steps alike
        for n, p in compiled.items():
            times[n].append(p.call()[0])
    for phase, ts in times.items():
        result[f"p{phase}_s"] = statistics.median(ts)
        result[f"p{phase}_times"] = ts
    np.savez(out_prefix + ".npz", **outputs)
    Path(out_prefix + ".json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def compare(ref: dict, other: dict) -> float:
    """Largest |a - b| / (|b|_max + 1e-12) over the outputs, per array."""
    worst = 0.0
    for k, b in ref.items():
        a = other[k]
        scale = float(abs(b).max()) + 1e-12
        worst = max(worst, float(abs(a.astype("float64") - b).max()) / scale)
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.repeats, args.batch)

    import numpy as np
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"xla_cpu_flags_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        flags = VARIANTS[name]
        prefix = str(tmp / re.sub(r"\W+", "_", name))
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")  # the library sets none
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", prefix, "--repeats",
                               str(args.repeats), "--batch", str(args.batch)],
                              env=env, capture_output=True, text=True)
        row = dict(variant=name, flags=flags, wall_s=time.perf_counter() - t0)
        if proc.returncode:
            row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        else:
            row.update(json.loads(Path(prefix + ".json").read_text()))
            row["outputs"] = dict(np.load(prefix + ".npz"))
        timing = row.get("error") or f"p1 {row['p1_s']:.3f} s, p2 {row['p2_s']:.3f} s"
        print(f"{name}: {timing}  ({row['wall_s']:.0f} s)", flush=True)
        rows.append(row)

    base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r:
            continue
        r["max_rel_diff"] = compare(base["outputs"], r["outputs"])
        r["safe"] = r["max_rel_diff"] <= args.rtol
        r["p1_speedup"] = base["p1_s"] / r["p1_s"]
        r["p2_speedup"] = base["p2_s"] / r["p2_s"]
    for r in rows:
        r.pop("outputs", None)

    info = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                cpu=_cpu_model(), cores=len(os.sched_getaffinity(0)),
                load_before=load_before, load_after=os.getloadavg()[0])
    text = report(rows, info, args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            dict(info=info, args=vars(args), rows=rows), indent=1, default=str))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def report(rows, info, args) -> str:
    import jax
    lines = [
        "# XLA CPU options on LPT's train steps",
        "",
        f"Measured {info['date']} by `benchmarks/bench_xla_cpu_flags.py --repeats {args.repeats} "
        f"--batch {args.batch}` on {info['cpu']}, {info['cores']} cores; jax {jax.__version__}; "
        f"1-minute load average {info['load_before']:.1f} before / {info['load_after']:.1f} "
        "after (shared machine).",
        "",
        "Model: ViT width 192, 6 blocks, 3 heads, patch 16, 224 px (Ti/16 at half depth), "
        f"K=3, P=10, M=20, 365 classes, fp32; train steps on the dual pair (2 x {args.batch} "
        "images), trainable-only gradients, A-GCL, SGD. Median of "
        f"{args.repeats} calls per step, the two steps called in turn. Each variant in its own "
        "process. 'max rel diff' = the largest |output - default output| / max|default "
        f"output| over loss, grad norm and every updated parameter; safe = <= {args.rtol:g}.",
        "",
        "| variant | XLA_FLAGS | custom fusions (p1) | phase-1 s | x default | phase-2 s | "
        "x default | max rel diff | safe |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | `{r['flags']}` | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | `{r['flags'] or '(none)'}` | {', '.join(r['p1_kinds']) or '-'} | "
            f"{r['p1_s']:.3f} | {r.get('p1_speedup', float('nan')):.2f}x | {r['p2_s']:.3f} | "
            f"{r.get('p2_speedup', float('nan')):.2f}x | {r.get('max_rel_diff', float('nan')):.1e} | "
            f"{'yes' if r.get('safe') else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
