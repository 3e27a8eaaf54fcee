#!/usr/bin/env python3
"""The small-scale replication: LPT and its ablations on the demo's data and backbone.

    python tools/replicate_ablation.py --workdir=/tmp/lpt_replication --seeds=0,1,2

Every variant is `configs/demo.py` with a few overrides (VARIANTS below), trained by
`lpt_jax.trainer.train` on the same split, backbone and budget (5 epochs per phase, batch 32
per stream). Phase-2 variants start from the same seed's lpt_phase1 export, so they isolate
phase 2. Finished runs are skipped (results/results.json exists): rerun the command to resume.
Writes <workdir>/summary.json, <workdir>/table.md and the plot (--plot). `--help` lists the
variants, the defaults and the run times measured for docs/replication.md; it imports
neither JAX nor TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

GROUPS = ("many", "medium", "few")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    phases: str
    overrides: dict
    phase1_from: str = ""     # variant whose phase-1 export phase 2 starts from
    help: str = ""            # one line for --help
    config_arg: str = ""      # configs/demo.py's argument ('lift': LIFT's recipe)


VARIANTS = {
    # The plain backbone (LIFT's method with no module) and LPT's demo schedule.
    "linear_probe": Variant("linear probe (CE)", "1", {
        "model.lift.tuners": "none", "phase1.trainable": ("head/.*",), "loss.name": "ce",
        "loss.scale": 20.0, "model.head_init": "random", "phase1.epochs": 5,
        "optim.base_lr": 0.16, "optim.lr_reference_batch": 256, "optim.weight_decay": 0.01},
        config_arg="lift",
        help="cosine head only on the plain backbone, cross-entropy, instance-balanced "
             "batches, LPT's demo schedule"),
    "vpt_deep_ce": Variant("VPT-deep (CE)", "1", {
        "loss.ib.name": "ce", "loss.dual_sampling": False},
        help="shared (VPT-deep) prompt + head, cross-entropy, instance-balanced batches"),
    "lpt_phase1": Variant("LPT phase 1", "1", {},
                          help="LPT phase 1: shared prompt + head, A-GCL, dual sampling"),
    "lpt_phase1_2": Variant("LPT phase 1+2", "2", {}, phase1_from="lpt_phase1",
                            help="LPT phase 2 (pool + keys + head) from lpt_phase1's export"),
    "phase2_no_dual": Variant("phase 2 w/o dual sampling", "2", {
        "loss.dual_sampling": False}, phase1_from="lpt_phase1",
        help="phase 2 on the instance-balanced batch only (A-GCL, its ib branch)"),
    "phase2_ce": Variant("phase 2 with CE", "2", {
        "loss.cb.name": "ce", "loss.ib.name": "ce"}, phase1_from="lpt_phase1",
        help="phase 2 with cross-entropy on both branches instead of A-GCL"),
    "lift": Variant("LIFT (AdaptFormer)", "1", {}, config_arg="lift",
                    help="LIFT: AdaptFormer in every block + cosine head from class means, "
                         "logit-adjusted loss, instance-balanced batches, 10 epochs"),
}

# Named sets of variants (--set): the LPT ablation, and LPT against LIFT on one trunk.
SETS = {
    "ablation": ("linear_probe", "vpt_deep_ce", "lpt_phase1", "lpt_phase1_2", "phase2_no_dual",
                 "phase2_ce"),
    "comparison": ("linear_probe", "vpt_deep_ce", "lpt_phase1", "lpt_phase1_2", "lift"),
}

# Per-variant run times of the committed replication (docs/replication.md), shown by --help.
MEASURED = REPO / "docs" / "replication_summary.json"
HELP_WIDTH = 95


def set_path(config, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def variant_config(name: str, seed: int, workdir: Path, base_overrides: dict):
    from configs import demo
    v = VARIANTS[name]
    config = demo.get_config(v.config_arg or None)
    config.seed = seed
    config.train.phases = v.phases
    for path, value in {**v.overrides, **base_overrides}.items():
        set_path(config, path, value)
    if v.phase1_from:
        config.train.start_export = str(run_dir(workdir, v.phase1_from, seed) /
                                        "phase1" / "export.npz")
    return config


def run_dir(workdir: Path, name: str, seed: int) -> Path:
    return workdir / name / f"seed{seed}"


def read_results(rdir: Path) -> dict | None:
    """Test table of a finished run, with its phase's val table when present."""
    path = rdir / "results" / "results.json"
    if not path.exists():
        return None
    test = json.loads(path.read_text())
    val_path = rdir / f"phase{test['phase']}" / "val" / "results.json"
    val = json.loads(val_path.read_text()) if val_path.exists() else None
    timing = rdir / "timing.json"
    return {"test": test, "val": val, "test_ensembled": test.get("ensembled"),
            "timing": json.loads(timing.read_text()) if timing.exists() else None}


def run_variant(name: str, seed: int, workdir: Path, base_overrides: dict) -> dict:
    from lpt_jax.run import trainer
    rdir = run_dir(workdir, name, seed)
    done = read_results(rdir)
    if done is not None:
        print(f"[skip] {name} seed {seed}: {rdir} is finished", flush=True)
        return done
    config = variant_config(name, seed, workdir, base_overrides)
    print(f"[run ] {name} seed {seed} -> {rdir}", flush=True)
    t0, cpu0 = time.time(), _cpu_seconds()
    trainer.train(config, str(rdir))
    timing = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(_cpu_seconds() - cpu0, 1)}
    (rdir / "timing.json").write_text(json.dumps(timing) + "\n")
    print(f"[done] {name} seed {seed}: {timing}", flush=True)
    return read_results(rdir)


def cost(name: str, workdir: Path, base_overrides: dict, repeats: int = 10) -> dict:
    """What a variant costs, from the trainer's own train step (steps.make_train_step, as
    trainer.run_phase builds it): the parameters it trains (every phase it runs, with the
    phase 1 it starts from), and per phase XLA's FLOPs of one step (cost_analysis of the
    compiled step) and the median time of `repeats` steps on this machine times the steps
    per epoch (the input pipeline is not included)."""
    import jax

    from lpt_jax import parallel, tree
    from lpt_jax.method import steps
    from lpt_jax.run import trainer
    from lpt_jax.run.context import build_context
    v = VARIANTS[name]
    config = variant_config(name, 0, workdir, base_overrides)
    ctx = build_context(config, str(workdir / "_cost"))  # checks and builds; writes nothing
    numbers = ("1," if v.phase1_from else "") + v.phases
    phases = ctx.method.parse_phases(numbers)
    params = jax.device_get(ctx.params)  # host copies: each phase's step donates its own
    flat = tree.flatten(params)
    trained = set()
    out = {"phases": {}}
    for phase in phases:
        patterns = phase.trainable_patterns(config)
        trained |= {k for k in flat if tree.matches(k, patterns)}
        batch_size, spe, _ = trainer.phase_schedule(config, phase, ctx.source.num_train)
        step = steps.make_train_step(ctx.model, phase, config,
                                     class_counts=ctx.source.train_counts,
                                     steps_per_epoch=spe, batch_size=batch_size)
        state, frozen = jax.device_put(step.init(params), parallel.replicated(ctx.mesh))
        size = config.data.image_size
        one = {"image": np.zeros((batch_size, size, size, 3), np.float32),
               "label": np.arange(batch_size, dtype=np.int32) % ctx.source.num_classes}
        batch = parallel.global_batch({"cb": one, "ib": one}, ctx.mesh)
        fn = step.jit(ctx.mesh)
        analysis = fn.lower(state, frozen, batch).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        times = []
        for i in range(repeats + 2):  # two warm-up calls
            t0 = time.perf_counter()
            state, metrics = fn(state, frozen, batch)
            jax.block_until_ready(metrics)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out["phases"][phase.number] = {
            "gflop_per_step": float(analysis.get("flops", float("nan"))) / 1e9,
            "step_s": float(np.median(times)), "steps_per_epoch": spe,
            "epochs": phase.section(config).epochs,
            "s_per_epoch": float(np.median(times)) * spe}
    backbone = sum(int(np.size(a)) for k, a in flat.items()
                   if k.startswith("backbone/") and k not in trained)
    out["trainable_params"] = sum(int(np.size(flat[k])) for k in trained)
    out["frozen_backbone_params"] = backbone
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------
# Summary.

def metric_values(runs: list[dict], split: str, rule: str = "release") -> dict[str, list]:
    """Per metric, the runs' values; a group with no evaluated image (None) is left out."""
    out = {"overall": [r[split]["overall"] for r in runs if r[split]]}
    for g in GROUPS:
        out[g] = [r[split][rule][g] for r in runs if r[split] and r[split][rule][g] is not None]
    return out


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    """{variant: {split: {rule: {metric: {mean, std, values}}}}}; std is the sample std."""
    summary = {}
    for name, by_seed in results.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        entry = {"label": VARIANTS[name].label, "seeds": sorted(by_seed)}
        for split in ("test", "val", "test_ensembled"):
            if not all(r.get(split) for r in runs):
                continue  # (ensembled numbers exist only where eval.ensemble was set)
            entry[split] = {}
            for rule in ("release", "oltr"):
                vals = metric_values(runs, split, rule)
                entry[split][rule] = {
                    k: {"mean": float(np.mean(v)) if v else None,
                        "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "values": [round(x, 2) for x in v]} for k, v in vals.items()}
        times = [r["timing"] for r in runs if r.get("timing")]
        entry["wall_s"] = float(np.mean([t["wall_s"] for t in times])) if times else None
        entry["cpu_s"] = float(np.mean([t["cpu_s"] for t in times])) if times else None
        summary[name] = entry
    return summary


def markdown(summary: dict, split: str = "test", rule: str = "release") -> str:
    lines = ["| variant | overall | many | medium | few | seeds |", "|---|---|---|---|---|---|"]
    for name, e in summary.items():
        cells = []
        for k in ("overall",) + GROUPS:
            m = e[split][rule][k]
            cells.append("–" if m["mean"] is None else f"{m['mean']:.1f} ± {m['std']:.1f}")
        lines.append(f"| {e['label']} | " + " | ".join(cells) + f" | {len(e['seeds'])} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(summary: dict, costs: dict, rule: str = "release") -> str:
    """One row per variant: test accuracy single-view and ensembled, and what it costs."""
    ensembled = any("test_ensembled" in e for e in summary.values())
    head = ["variant", "overall", "many", "medium", "few"]
    if ensembled:
        head += ["overall, ensembled", "many", "medium", "few"]
    head += ["trained params (% of backbone)", "GFLOP / step", "s / epoch (step only)",
             "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary.items():
        cells = []
        for split in ("test", "test_ensembled") if ensembled else ("test",):
            for k in ("overall",) + GROUPS:
                m = e.get(split, {}).get(rule, {}).get(k)
                cells.append("–" if not m or m["mean"] is None
                             else f"{m['mean']:.1f} ± {m['std']:.1f}")
        c = costs.get(name)
        if c:
            phases = c["phases"].values()
            share = 100 * c["trainable_params"] / c["frozen_backbone_params"]
            cells += [f"{c['trainable_params']:,} ({share:.2f} %)",
                      " + ".join(f"{p['gflop_per_step']:.1f}" for p in phases),
                      " + ".join(f"{p['s_per_epoch']:.2f}" for p in phases),
                      " + ".join(str(p["epochs"]) for p in phases)]
        else:
            cells += ["–"] * 4
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, title: str) -> None:
    """Grouped bars: overall / many / medium / few per variant, mean with std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    metrics = ("overall",) + GROUPS
    colors = {"overall": "tab:gray", "many": "tab:blue", "medium": "tab:orange",
              "few": "tab:red"}
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    x = np.arange(len(names))
    for j, m in enumerate(metrics):
        means = [summary[n]["test"]["release"][m]["mean"] or 0 for n in names]
        stds = [summary[n]["test"]["release"][m]["std"] for n in names]
        ax.bar(x + (j - 1.5) * width, means, width, yerr=stds, capsize=2, color=colors[m],
               label=m)
        for n_i, n in enumerate(names):  # the individual seeds as dots
            vals = summary[n]["test"]["release"][m]["values"]
            ax.scatter([x[n_i] + (j - 1.5) * width] * len(vals), vals, s=5, color="black",
                       zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([summary[n]["label"] for n in names], rotation=15, ha="right",
                       fontsize=8)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=4, fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                    if l.startswith("Model name")), cpu)
    except OSError:
        pass
    import jax
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def measured_times(default_seeds: int) -> str:
    """The run times recorded in docs/replication_summary.json, as --help text (no JAX)."""
    try:
        data = json.loads(MEASURED.read_text())
        meta, measured = data["meta"], data["variants"]
        rows = {n: measured[n] for n in VARIANTS if measured.get(n, {}).get("wall_s")}
    except (OSError, ValueError, KeyError, AttributeError):
        rows = {}
    if not rows:
        return "run time: see docs/replication.md (about 11 minutes per seed on 2 CPU cores)\n"
    seeds = max(len(e.get("seeds", [])) for e in rows.values())
    wall = sum(e["wall_s"] for e in rows.values())
    cpu = sum(e["cpu_s"] or 0 for e in rows.values())
    head = (f"run time, as measured for docs/replication.md ({meta.get('machine', '?')}, "
            f"{meta.get('date', '?')}, a machine shared with other jobs), per variant and "
            f"seed, mean of {seeds} seeds:")
    lines = textwrap.wrap(head, HELP_WIDTH)
    lines += [f"  {n:<15} {e['wall_s']:5.0f} s wall, {e['cpu_s'] or 0:4.0f} s CPU"
              for n, e in rows.items()]
    lines.append(f"  {'all of them':<15} {wall / 60:5.1f} min wall, {cpu / 60:.1f} CPU-min per "
                 f"seed; the default {default_seeds} seeds: about "
                 f"{default_seeds * wall / 60:.0f} min")
    lines += textwrap.wrap("Phase-2 variants time phase 2 only (their phase 1 is lpt_phase1's "
                           "run). A --max_steps run is mostly start-up and compilation.",
                           HELP_WIDTH)
    return "\n".join(lines) + "\n"


def help_epilog(default_seeds: int) -> str:
    width = max(map(len, VARIANTS))
    lines = textwrap.wrap("variants (--variants; a phase-2 variant also runs the lpt_phase1 "
                          "it starts from when that is not listed):", HELP_WIDTH)
    lines += [f"  {n:<{width}}  {v.help}" for n, v in VARIANTS.items()]
    return "\n".join(lines) + "\n\n" + measured_times(default_seeds)


def main(argv=None) -> None:
    default_seeds = "0,1,2"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n  " + __doc__.split("\n\n")[1].strip(),
        epilog=help_epilog(len(default_seeds.split(","))),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/lpt_replication",
                   help="one folder per variant and seed, summary.json, table.md, the plot "
                        "(default: %(default)s)")
    p.add_argument("--seeds", default=default_seeds,
                   help="comma-separated seeds; each runs every variant (default: %(default)s)")
    p.add_argument("--set", default="ablation", choices=sorted(SETS),
                   help="the variants to run: 'ablation' (LPT's) or 'comparison' (linear "
                        "probe, VPT-deep, LPT, LIFT on one trunk) (default: %(default)s)")
    p.add_argument("--variants", default="",
                   help="comma-separated variants (below) instead of --set's")
    p.add_argument("--ensemble", default="five_crop",
                   choices=("none", "five_crop", "ten_crop"),
                   help="test-time ensembling reported beside the single view (eval.ensemble; "
                        "default: %(default)s)")
    p.add_argument("--ensemble_expand", type=int, default=4,
                   help="eval.ensemble_expand: LIFT's 24 is for 224 px; the demo's 32 px get "
                        "the same share, 4 (default: %(default)s)")
    p.add_argument("--cost", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each variant's trained parameters, GFLOP and time per step "
                        "(the trainer's own step, compiled and run here)")
    p.add_argument("--plot", default="",
                   help="PNG path of the plot (default: <workdir>/replication.png)")
    p.add_argument("--max_steps", type=int, default=0,
                   help="N > 0: a quick smoke run, N steps per phase and 64 test images; "
                        "0: the full budget (default: %(default)s)")
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [n for n in args.variants.split(",") if n] or list(SETS[args.set])
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    for n in names:  # a phase-2 variant needs its phase-1 run first
        dep = VARIANTS[n].phase1_from
        if dep and dep not in names:
            names.insert(names.index(n), dep)
    base = {"eval.ensemble": args.ensemble, "eval.ensemble_expand": args.ensemble_expand}
    if args.max_steps:
        base.update({"train.max_steps": args.max_steps, "eval.max_examples": 64})

    from lpt_jax.run import trainer  # noqa: F401  (imports TF and JAX once)
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    t0 = time.time()
    for seed in seeds:
        for n in names:
            results[n][seed] = run_variant(n, seed, workdir, base)
    summary = summarize(results)
    costs = {n: cost(n, workdir, base) for n in names} if args.cost else {}
    for n, c in costs.items():
        summary[n]["cost"] = c
    meta = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "total_wall_s_this_call": round(time.time() - t0, 1)}
    (workdir / "summary.json").write_text(json.dumps({"meta": meta, "variants": summary},
                                                     indent=1) + "\n")
    table = (f"test split, release rule (many > 100, medium 21-100, few <= 20 training "
             f"images), mean ± sample std over seeds {seeds}; ensembled: {args.ensemble} of "
             f"the image resized to image_size + {args.ensemble_expand}\n\n" +
             comparison_markdown(summary, costs) +
             "\nOLTR rule (few < 20; LIFT's groups):\n\n" +
             comparison_markdown(summary, costs, rule="oltr") +
             "\nval split (20 images per class), release rule:\n\n" +
             markdown(summary, split="val"))
    (workdir / "table.md").write_text(table)
    plot_path = args.plot or str(workdir / "replication.png")
    what = "LPT and LIFT" if "lift" in names else "LPT ablations"
    plot(summary, plot_path, f"{what} on the demo (CIFAR-10 6-class LT, own ViT), "
                             f"{len(seeds)} seeds: test accuracy, mean ± std")
    print(table)
    print(f"wrote {workdir / 'summary.json'}, {workdir / 'table.md'}, {plot_path}")


if __name__ == "__main__":
    main()
