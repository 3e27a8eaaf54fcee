"""lpt_jax's shipped CPU steps against the PyTorch LPT release's, side by side on one machine.

    .venv/bin/python benchmarks/vs_pytorch.py [--rounds 2] [--repeats 3] [--batch 8]
        [--torch-python /work/oracle_venv/bin/python] [--baseline-repo DIR] [--bf16]

Both sides run ViT-B/16 at 224 px, fp32, batch B, 365 classes, in fresh processes that take
turns (torch, ours[, baseline] in round 1, the order reversed in round 2, ...), so both see
the same machine and much the same load; a case's figure is the best of its rounds (each
round: median of --repeats calls after a warm-up). The comparison is per CPU-second of the
process (all its threads), which other jobs on the cores disturb far less than wall time.

  ours                             the release (benchmarks/bench_torch_reference.py)
  phase-1 train step (PHASES[1])   phase1_train_step
  phase-2 train step (PHASES[2])   phase2_train_step_reference (query pass + main pass)
  phase-2 inference                phase2_inference_reference

Ours is the shipped code (benchmarks/shipped.py: `steps.make_train_step` jitted by
`TrainStep.jit`, `inference.make_predict_fn`); train steps take the dual pair (2B images).
`--baseline-repo DIR` times the same cases from another checkout too (e.g. a worktree of an
earlier commit: `git worktree add /tmp/before <commit>`), for before/after figures from one
run. `--bf16` adds our steps with `model.vit.dtype='bfloat16'`. The torch side runs in its own
venv (torch and TensorFlow must not share a process; `benchmarks/requirements-torch.txt`).

Writes benchmarks/results/vs_pytorch.md and .json. Never touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TORCH_PYTHON = os.environ.get("LPT_TORCH_PYTHON", "/work/oracle_venv/bin/python")

# our case -> the release's case it is compared with
PAIRS = {"phase1_step": "phase1_train_step",
         "phase2_step": "phase2_train_step_reference",
         "phase2_inference": "phase2_inference_reference"}
LABELS = {"phase1_step": "phase-1 train step", "phase2_step": "phase-2 train step",
          "phase2_inference": "phase-2 inference",
          "phase1_step_bf16": "phase-1 train step, bf16",
          "phase2_step_bf16": "phase-2 train step, bf16",
          "phase2_inference_bf16": "phase-2 inference, bf16"}


# ------------------------------------------------------------------------------ our side


def worker(repo: Path, batch: int, repeats: int, bf16: bool) -> dict:
    """Times the shipped steps of the checkout at `repo` (run in a fresh process)."""
    sys.path[:0] = [str(repo), str(repo / "benchmarks")]
    import jax

    import shipped

    mesh = shipped.make_mesh()
    results = {}
    for dtype in ("float32",) + (("bfloat16",) if bf16 else ()):
        suffix = "" if dtype == "float32" else "_bf16"
        config = shipped.bench_config("B/16", batch=batch, dtype=dtype)
        model, params = shipped.build(config)
        prepared = {
            "phase1_step": lambda: shipped.prepare_step(model, shipped.PHASE1, config, params,
                                                        batch=batch, mesh=mesh),
            "phase2_step": lambda: shipped.prepare_step(model, shipped.SHARED_TRUNK, config,
                                                        params, batch=batch, mesh=mesh),
            "phase2_inference": lambda: shipped.prepare_predict(
                model, shipped.SHARED_TRUNK, params, batch=batch, image_size=224, mesh=mesh),
        }
        for name, prepare in prepared.items():
            p = prepare()
            p.call()  # warm-up
            calls = [p.call() for _ in range(repeats)]
            if not p.finite():
                raise SystemExit(f"{name}{suffix}: non-finite outputs")
            wall = [w for w, _ in calls]
            cpu = [c for _, c in calls]
            results[name + suffix] = dict(
                images_per_call=p.images, wall_s=wall, cpu_s=cpu,
                images_per_s=p.images / statistics.median(wall),
                images_per_cpu_s=p.images / statistics.median(cpu),
                cpu_share=statistics.median(c / (w * os.cpu_count()) for w, c in calls),
                xla_gflop=p.footprint.get("xla_flops", float("nan")) / 1e9,
                compile_s=p.compile_s)
            print(f"  {name + suffix:24s} {results[name + suffix]['images_per_cpu_s']:.3f} "
                  f"img/CPU-s", flush=True)
            del p
    results["_meta"] = dict(jax=jax.__version__, repo=str(repo))
    return results


# ------------------------------------------------------------------------------ the runs


def run_ours(repo: Path, args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(repo),
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--worker-out", str(out)]
    if args.bf16:
        cmd.append("--bf16")
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return json.loads(out.read_text())


def run_torch(args, out: Path) -> dict:
    cmd = [args.torch_python, str(HERE / "bench_torch_reference.py"), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--cases", *PAIRS.values(), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return json.loads(out.with_suffix(".json").read_text())


def best(rounds: list[dict], case: str) -> dict:
    """The round with the most images per CPU-second for `case`."""
    return max((r[case] for r in rounds if case in r), key=lambda r: r["images_per_cpu_s"])


def markdown(meta: dict, sides: dict, baseline: bool) -> str:
    torch_best = {c: best(sides["torch"], c) for c in PAIRS.values()}
    lines = [
        "# lpt_jax vs the PyTorch LPT release on one CPU, side by side",
        "",
        f"Measured {meta['date']} by `benchmarks/vs_pytorch.py --rounds {meta['rounds']} "
        f"--repeats {meta['repeats']} --batch {meta['batch']}` on {meta['cpu']}, "
        f"{meta['cores']} cores, {meta['memory_gib']} GiB; jax {meta['jax']}, torch "
        f"{meta['torch']}, timm {meta['timm']}; 1-minute load {meta['load_before']:.2f} before "
        f"/ {meta['load_after']:.2f} after; {meta['seconds']:.0f} s in all.",
        "",
        "ViT-B/16, 224 px, fp32, 365 classes, batch B = "
        f"{meta['batch']} (train steps: the dual pair, 2B images). Each side in fresh processes "
        "taking turns; per case the best round (median of its calls). img/CPU-s: images per "
        "CPU-second of the process, all threads; the ratio is ours over the release's.",
        "",
        "| case | ours img/CPU-s | release img/CPU-s | **ratio per CPU-s** | ours img/s | "
        "release img/s | ratio wall | ours XLA GFLOP |" + (" baseline img/CPU-s | ours vs "
                                                          "baseline |" if baseline else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else ""),
    ]
    for ours_case, theirs_case in PAIRS.items():
        o, t = best(sides["ours"], ours_case), torch_best[theirs_case]
        row = (f"| {LABELS[ours_case]} (vs `{theirs_case}`) | {o['images_per_cpu_s']:.3f} | "
               f"{t['images_per_cpu_s']:.3f} | **{o['images_per_cpu_s'] / t['images_per_cpu_s']:.2f}x** | "
               f"{o['images_per_s']:.2f} | {t['images_per_s']:.2f} | "
               f"{o['images_per_s'] / t['images_per_s']:.2f}x | {o['xla_gflop']:.0f} |")
        if baseline:
            b = best(sides["baseline"], ours_case)
            row += (f" {b['images_per_cpu_s']:.3f} | "
                    f"{o['images_per_cpu_s'] / b['images_per_cpu_s']:.2f}x |")
        lines.append(row)
    bf16 = [c for c in LABELS if c.endswith("_bf16") and any(c in r for r in sides["ours"])]
    if bf16:
        lines += ["", "bf16 activations and weights (`model.vit.dtype='bfloat16'`), ours only:", "",
                  "| case | img/CPU-s | vs fp32 |", "|---|---|---|"]
        for c in bf16:
            o, f = best(sides["ours"], c), best(sides["ours"], c[:-5])
            lines.append(f"| {LABELS[c]} | {o['images_per_cpu_s']:.3f} | "
                         f"{o['images_per_cpu_s'] / f['images_per_cpu_s']:.2f}x |")
    lines += ["", "Per round (img/CPU-s; CPU share = CPU time / (wall x cores), near 1 when "
              "the process had the machine):", "",
              "| side | case | " + " | ".join(f"round {i + 1}" for i in range(meta["rounds"]))
              + " |", "|---|---|" + "---|" * meta["rounds"]]
    for side, cases in (("release", list(PAIRS.values())), ("ours", list(PAIRS) + bf16),
                        ("baseline", list(PAIRS) if baseline else [])):
        key = "torch" if side == "release" else side
        for c in cases:
            cells = [f"{r[c]['images_per_cpu_s']:.3f} (share {r[c]['cpu_share']:.2f})"
                     for r in sides[key] if c in r]
            lines.append(f"| {side} | {c} | " + " | ".join(cells) + " |")
    if baseline:
        lines += ["", f"Baseline: the checkout at `{meta['baseline_repo']}` "
                  f"(commit {meta.get('baseline_commit', '?')})."]
    lines += ["", f"Ours: commit {meta.get('commit', '?')}."]
    return "\n".join(lines) + "\n"


def git_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    ap.add_argument("--baseline-repo", default="")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results/vs_pytorch"),
                    help="results path without extension (.md and .json)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(Path(args.worker), args.batch, args.repeats, args.bf16)
        Path(args.worker_out).write_text(json.dumps(result))
        return
    if not Path(args.torch_python).exists():
        raise SystemExit(f"--torch-python {args.torch_python} does not exist: make the "
                         "oracle venv (benchmarks/requirements-torch.txt) or pass its python")
    if args.baseline_repo and not (Path(args.baseline_repo) / "benchmarks/shipped.py").exists():
        raise SystemExit(f"--baseline-repo {args.baseline_repo} has no benchmarks/shipped.py")

    sys.path.insert(0, str(HERE))
    import host
    meta = dict(host.describe(), rounds=args.rounds, repeats=args.repeats, batch=args.batch,
                load_before=os.getloadavg()[0], commit=git_commit(REPO))
    if args.baseline_repo:
        meta.update(baseline_repo=args.baseline_repo,
                    baseline_commit=git_commit(Path(args.baseline_repo)))
    sides = {"torch": [], "ours": [], "baseline": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["torch", "ours"] + (["baseline"] if args.baseline_repo else [])
            for side in (order if r % 2 == 0 else order[::-1]):
                print(f"round {r + 1}: {side}", flush=True)
                out = Path(tmp) / f"{side}{r}.json"
                if side == "torch":
                    sides["torch"].append(run_torch(args, out.with_suffix("")))
                else:
                    repo = REPO if side == "ours" else Path(args.baseline_repo)
                    sides[side].append(run_ours(repo, args, out))
    torch_meta = sides["torch"][0]
    meta.update(seconds=time.perf_counter() - t0, load_after=os.getloadavg()[0],
                jax=sides["ours"][0]["_meta"]["jax"], torch=torch_meta["torch"],
                timm=torch_meta["timm"])
    sides["torch"] = [r["cases"] for r in sides["torch"]]
    text = markdown(meta, sides, bool(args.baseline_repo))
    print(text)
    out = Path(args.out)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, **sides), indent=1) + "\n")


if __name__ == "__main__":
    main()
