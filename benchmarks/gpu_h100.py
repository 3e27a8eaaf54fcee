"""LPT on one GPU: images/s and bf16 MFU of the shipped phase-1 / phase-2 steps, ViT-B/16.

    python benchmarks/gpu_h100.py [--out results.json]      # <= 10 min on one H100
    python benchmarks/gpu_h100.py --quick                    # tiny model, any device (smoke)

Times the library's code, not a copy: every train step is `lpt_jax.steps.make_train_step(...)`
compiled by `TrainStep.jit(mesh)` (what `lpt_jax.trainer.run_phase` runs), every inference
`lpt_jax.inference.make_predict_fn`; both are set up by benchmarks/shipped.py from
configs/common.py's base config with `model.vit.dtype='bfloat16'` (bf16 activations, float32
parameters) and, for the remat cases, `model.vit.remat=True`. The release's way of phase 2 is
the same factory given `dataclasses.replace(PHASES[2], forward_method=LPT.phase2_reference)`.
Needs jax (with CUDA), flax, optax, numpy and ml-collections (lpt_jax imports no TF on this
path): synthetic on-device batches, no data pipeline, no checkpoint (random weights: speed
does not depend on them). Run it from a checkout (the repository root is put on sys.path).

What it does, in this order, stopping cleanly when --budget-s is spent:
 1. The card's bf16 matmul rate: the best TFLOP/s of a jitted bf16 `jnp.dot` of square
    matrices (the MFU denominator; the card's data-sheet peak is printed beside it).
 2. For each case the largest batch that fits: a probe compile at a small batch gives bytes
    per image (`memory_analysis()`), then the descending list of batches is tried from the
    largest predicted to fit; a candidate whose compiled footprint exceeds the device limit,
    or that fails with out-of-memory, moves to the next one.
 3. Times the compiled step (warm-up, then enough calls for ~--seconds-per-case dispatched back
    to back, state threaded through and donated as in the trainer) and reports images/s,
    analytic model FLOP/s, MFU against step 1, the XLA `cost_analysis()` FLOPs and the
    compiled peak bytes (`memory_analysis()`).

Cases: phase-1 train step (trains shared prompt + head), phase-2 train step on the shared
trunk (`PHASES[2]`, `LPT.phase2`) and the release's way (two full passes) at the same batch,
phase-2 inference both ways, and the train steps again with remat. Train steps see the dual
pair (class-balanced + instance-balanced batch of B images each): images/s count both (2B
per step); the shipped step's loss (A-GCL both branches), SGD momentum + coupled decay on the
trainable subtree, non-finite guard and metrics are all in the timed program.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

# JAX preallocates 75 % of GPU memory by default; the batch search wants most of the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shipped  # noqa: E402
from lpt_jax import parallel  # noqa: E402
from lpt_jax.models.lpt import LPT, lpt_from_config  # noqa: E402
from lpt_jax.models.vit import ViT  # noqa: E402
from lpt_jax.phases import Phase  # noqa: E402

NUM_CLASSES = shipped.NUM_CLASSES  # Places-LT
# Dense bf16 data-sheet peaks (TFLOP/s), printed for context only; MFU uses the measured rate.
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0,
                         "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0}
TRAIN_BATCHES = (1024, 768, 512, 384, 320, 256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)
INFER_BATCHES = (4096, 3072, 2048, 1536, 1024, 768, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


# ----------------------------------------------------------------------------- FLOP count


@functools.lru_cache(maxsize=None)
def _dims(vit: ViT) -> dict:
    gh, gw = vit.grid
    ph, pw = vit.patch_size
    return dict(n=gh * gw, d=vit.width, m=vit.mlp_dim or 4 * vit.width, depth=vit.depth,
                patch_in=ph * pw * 3, prefix=vit.num_prefix_tokens)


def block_flops(t: int, d: int, m: int) -> float:
    """Forward matmul FLOPs of one pre-norm block on t tokens (2 per multiply-add):
    q,k,v,out projections 8 t d^2, MLP 4 t d m, scores + weighted sum 4 t^2 d."""
    return 8.0 * t * d * d + 4.0 * t * d * m + 4.0 * t * t * d


def block_backward_flops(t: int, d: int, m: int) -> float:
    """Backward of a frozen block w.r.t. its input only (no weight gradients): every linear
    layer once more (dX = dY W^T), attention twice more (dP, dV, dQ, dK)."""
    return 8.0 * t * d * d + 4.0 * t * d * m + 8.0 * t * t * d


def lpt_step_flops(model: LPT, kind: str, batch: int) -> float:
    """Analytic matmul FLOPs of one step (elementwise ops, norms, softmax and loss ignored).

    kind: 'phase1_train' | 'phase2_train' | 'phase2_ref_train' (the dual pair: 2*batch images)
    or 'phase2_infer' | 'phase2_ref_infer' (batch images). Model FLOPs: remat's recomputation
    is not counted (MFU convention).
    """
    v = _dims(model.backbone)
    d, m, depth, k = v["d"], v["m"], v["depth"], model.shared_depth
    seq = v["prefix"] + v["n"]
    t1 = seq + model.prompt_length            # shared prompt appended
    t2 = seq + 2 * model.prompt_length        # shared + averaged group prompts
    embed = 2.0 * v["n"] * v["patch_in"] * d
    head = 2.0 * d * model.num_classes
    fwd_p1 = embed + depth * block_flops(t1, d, m) + head
    main = (depth - k) * block_flops(t2, d, m) + head
    fwd_p2 = embed + depth * block_flops(t1, d, m) + main            # trunk + query + main
    fwd_p2_ref = embed + (depth + k) * block_flops(t1, d, m) + main  # + the trunk again
    if kind == "phase1_train":  # backward through every block (prompts from block 0), head dW
        per = fwd_p1 + depth * block_backward_flops(t1, d, m) + 2 * head
        return 2 * batch * per
    if kind in ("phase2_train", "phase2_ref_train"):  # backward from block K on, main path
        bwd = (depth - k) * block_backward_flops(t2, d, m) + 2 * head
        fwd = fwd_p2 if kind == "phase2_train" else fwd_p2_ref
        return 2 * batch * (fwd + bwd)
    if kind == "phase2_infer":
        return batch * fwd_p2
    if kind == "phase2_ref_infer":
        return batch * fwd_p2_ref
    raise ValueError(f"unknown step kind {kind!r}")


# ----------------------------------------------------------------------------- measuring


def is_oom(err: BaseException) -> bool:
    text = str(err)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "OOM", "Failed to allocate"))


def device_limit_bytes(override_gib: float) -> Optional[float]:
    if override_gib:
        return override_gib * 2**30
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def device_peak_bytes() -> Optional[float]:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


footprint = shipped.footprint  # (bytes and XLA FLOPs of a compiled program)


def matmul_tflops(sizes, repeats: int = 20) -> dict:
    """Best measured TFLOP/s of a bf16 (n, n) @ (n, n) over `sizes`."""
    best = dict(tflops=0.0, n=None)
    for n in sizes:
        try:
            a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
            b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
            dot = jax.jit(jnp.dot).lower(a, b).compile()
            jax.block_until_ready(dot(a, b))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    c = dot(a, b)
                jax.block_until_ready(c)
                times.append((time.perf_counter() - t0) / repeats)
            rate = 2.0 * n ** 3 / min(times) / 1e12
            print(f"  bf16 matmul {n}x{n}: {rate:.1f} TFLOP/s", flush=True)
            if rate > best["tflops"]:
                best = dict(tflops=rate, n=n)
            del a, b, c
        except Exception as err:  # noqa: BLE001 - a size too large for the card is skipped
            if not is_oom(err):
                raise
            print(f"  bf16 matmul {n}x{n}: out of memory", flush=True)
    return best


class Case:
    """One step kind of the shipped code: builds its compiled function and arguments for a
    given batch size (`shipped.prepare_step` / `shipped.prepare_predict`)."""

    def __init__(self, name: str, kind: str, phase: Phase, train: bool, config_for_batch,
                 model: LPT, params: dict, mesh, remat: bool):
        self.name, self.kind, self.phase, self.train = name, kind, phase, train
        self.config_for_batch, self.model, self.params = config_for_batch, model, params
        self.mesh, self.remat = mesh, remat
        self.image_size = config_for_batch(1).model.vit.image_size

    def images_per_step(self, batch: int) -> int:
        return 2 * batch if self.train else batch

    def compile(self, batch: int) -> shipped.Prepared:
        if self.train:
            return shipped.prepare_step(self.model, self.phase, self.config_for_batch(batch),
                                        self.params, batch=batch, mesh=self.mesh,
                                        name=self.name)
        return shipped.prepare_predict(self.model, self.phase, self.params, batch=batch,
                                       image_size=self.image_size, mesh=self.mesh,
                                       name=self.name)


def largest_fitting(case: Case, candidates, limit: Optional[float], probe: int,
                    margin: float, log: Callable, start_at: Optional[int] = None):
    """(batch, prepared) of the largest candidate that compiles within the memory limit and
    runs once; the probe's bytes per image skip candidates that cannot fit."""
    candidates = [b for b in candidates if start_at is None or b <= start_at]
    if limit is not None and len(candidates) > 1 and start_at is None:  # else: start_at first
        prepared = case.compile(probe)
        fp = prepared.footprint
        fixed = sum(x.nbytes for x in jax.tree.leaves(case.params))
        per_image = max(fp["peak"] - fixed, 0.0) / probe
        del prepared
        fitting = [b for b in candidates if fixed + per_image * b <= margin * limit]
        log(f"    probe B={probe}: {fp['peak'] / 2**30:.2f} GiB -> "
            f"{per_image / 2**20:.1f} MiB/image; trying from B={fitting[0] if fitting else '-'}")
        candidates = fitting or candidates[-1:]
    for batch in candidates:
        try:
            prepared = case.compile(batch)
            peak = prepared.footprint.get("peak", 0)
            if limit is None or peak <= limit:
                prepared.run(1)  # runs once: OOM shows here
                return batch, prepared
            log(f"    B={batch}: compiled footprint {peak / 2**30:.2f} GiB > limit")
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            log(f"    B={batch}: out of memory")
        prepared = None
        gc.collect()
    return None, None


def measure(case: Case, batch: int, prepared: shipped.Prepared, peak_tflops: float,
            seconds: float, log: Callable) -> dict:
    secs, _ = prepared.run(1)  # second warm-up call
    calls = int(np.clip(seconds / max(secs, 1e-4), 3, 200))
    secs, cpu = prepared.run(calls)
    step_s = secs / calls
    fp = prepared.footprint
    flops = lpt_step_flops(case.model, case.kind, batch)
    row = dict(case=case.name, kind=case.kind, remat=case.remat, batch=batch,
               images_per_step=case.images_per_step(batch), step_s=step_s,
               cpu_s_per_step=cpu / calls,
               images_per_s=case.images_per_step(batch) / step_s, calls=calls,
               analytic_tflop=flops / 1e12, xla_tflop=fp["xla_flops"] / 1e12,
               model_tflops=flops / step_s / 1e12,
               xla_tflops=fp["xla_flops"] / step_s / 1e12,
               mfu=flops / step_s / 1e12 / peak_tflops if peak_tflops else float("nan"),
               peak_gib=fp.get("peak", float("nan")) / 2**30,
               temp_gib=fp.get("temp", float("nan")) / 2**30, finite=prepared.finite(),
               compile_s=prepared.compile_s)
    dev_peak = device_peak_bytes()
    row["device_peak_so_far_gib"] = dev_peak / 2**30 if dev_peak else float("nan")
    log(f"  {case.name} B={batch}: {step_s * 1e3:.1f} ms/step, {row['images_per_s']:.1f} img/s, "
        f"{row['model_tflops']:.1f} model TFLOP/s (MFU {100 * row['mfu']:.1f} %), "
        f"XLA {row['xla_tflops']:.1f} TFLOP/s, peak {row['peak_gib']:.2f} GiB, "
        f"finite={row['finite']}")
    return row


def _jaxlib_version() -> str:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return ""


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = ["| case | remat | B | images/step | ms/step | images/s | vs release way | "
             "analytic GFLOP/step | XLA GFLOP/step | model TFLOP/s | MFU | peak GiB | "
             "compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['remat']} | - | - | - | - | - | - | - | - | - | "
                         f"- | skipped: {r['skipped']} |")
            continue
        ratio = f"{r['vs_reference']:.2f}x" if "vs_reference" in r else ""
        lines.append(
            f"| {r['case']} | {r['remat']} | {r['batch']} | {r['images_per_step']} | "
            f"{1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | {ratio} | "
            f"{1e3 * r['analytic_tflop']:.1f} | {1e3 * r['xla_tflop']:.1f} | "
            f"{r['model_tflops']:.2f} | {100 * r['mfu']:.1f} % | {r['peak_gib']:.2f} | "
            f"{r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny ViT at 32 px, small batches, a notional memory limit (smoke run)")
    p.add_argument("--cases", default="p1,p2,p2ref,inf,infref,p1remat,p2remat",
                   help="subset (and order) of the cases to run")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop starting new cases after this many seconds (whole script)")
    p.add_argument("--seconds-per-case", type=float, default=4.0)
    p.add_argument("--mem-limit-gib", type=float, default=0.0,
                   help="memory limit for the batch search (0: the device's bytes_limit)")
    p.add_argument("--margin", type=float, default=0.9,
                   help="fraction of the limit the probe's prediction may use")
    p.add_argument("--out", default="", help="write the rows and machine info as JSON here")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    dev = jax.devices()[0]
    if args.quick:
        variant, image_size = "tiny", 32
        vit = dict(patch_size=8, width=64, depth=4, mlp_dim=256, num_heads=2)
        matmul_sizes, train_batches, infer_batches, probe = (256, 512), (64, 32, 16, 8), \
            (128, 64, 32), 4
        limit_gib = args.mem_limit_gib or 0.03  # small, so that the search has to step down
    else:
        variant, image_size, vit = "B/16", 224, None
        matmul_sizes, train_batches, infer_batches, probe = (4096, 8192, 16384), \
            TRAIN_BATCHES, INFER_BATCHES, 16
        limit_gib = args.mem_limit_gib
    info = dict(device=f"{dev.platform}: {dev.device_kind}", devices=jax.device_count(),
                jax=jax.__version__, jaxlib=_jaxlib_version(),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"),
                model=f"ViT-{variant} {vit or ''} at {image_size} px",
                step="lpt_jax.steps.make_train_step (shipped), TrainStep.jit(mesh); "
                     "inference lpt_jax.inference.make_predict_fn",
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    limit = device_limit_bytes(limit_gib)
    info["memory_limit_gib"] = limit / 2**30 if limit else None
    log(json.dumps(info))

    log("1. bf16 matmul rate")
    mm = matmul_tflops(matmul_sizes)
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in dev.device_kind), None)
    info.update(matmul_bf16_tflops=mm["tflops"], matmul_n=mm["n"], datasheet_bf16_tflops=sheet)
    log(f"  measured {mm['tflops']:.1f} TFLOP/s (n={mm['n']}); data sheet: {sheet}")

    def config_for_batch(remat):
        return lambda batch: shipped.bench_config(
            variant, image_size=image_size, batch=batch, dtype="bfloat16", remat=remat, vit=vit)

    mesh = shipped.make_mesh()
    models = {r: lpt_from_config(config_for_batch(r)(1).model, NUM_CLASSES)
              for r in (False, True)}
    _, params = shipped.build(config_for_batch(False)(1))  # fp32; the same for every case
    params = jax.device_put(params, parallel.replicated(mesh))
    p1, trunk, ref = shipped.PHASE1, shipped.SHARED_TRUNK, shipped.RELEASE_WAY

    def case(name, kind, phase, train, remat):
        return Case(name, kind, phase, train, config_for_batch(remat), models[remat], params,
                    mesh, remat)

    # Order = priority: what the targets name first; each later case may be cut by the budget.
    # The release-way cases run at their shared-trunk partner's batch (no probe compile).
    cases = {
        "p1": (case("phase-1 train step", "phase1_train", p1, True, False), None),
        "p2": (case("phase-2 train step, shared trunk", "phase2_train", trunk, True, False),
               None),
        "p2ref": (case("phase-2 train step, release way", "phase2_ref_train", ref, True, False),
                  "phase-2 train step, shared trunk"),
        "inf": (case("phase-2 inference, shared trunk", "phase2_infer", trunk, False, False),
                None),
        "infref": (case("phase-2 inference, release way", "phase2_ref_infer", ref, False, False),
                   "phase-2 inference, shared trunk"),
        "p1remat": (case("phase-1 train step", "phase1_train", p1, True, True), None),
        "p2remat": (case("phase-2 train step, shared trunk", "phase2_train", trunk, True, True),
                    None),
    }
    plan = [cases[k.strip()] for k in args.cases.split(",") if k.strip()]
    rows, done = [], {}
    log("2-3. batch search and timing")
    for c, same_batch_as in plan:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            rows.append(dict(case=c.name, remat=c.remat, skipped=f"time budget ({elapsed:.0f} s)"))
            log(f"  {c.name} (remat={c.remat}): skipped, {elapsed:.0f} s spent")
            continue
        log(f"  {c.name} (remat={c.remat}), {elapsed:.0f} s spent")
        start_at = done[same_batch_as]["batch"] if same_batch_as in done else None
        batches = train_batches if c.train else infer_batches
        prepared = None
        try:
            batch, prepared = largest_fitting(c, batches, limit, probe, args.margin, log,
                                              start_at)
            if batch is None:
                rows.append(dict(case=c.name, remat=c.remat, skipped="no batch fits"))
                continue
            row = measure(c, batch, prepared, mm["tflops"], args.seconds_per_case, log)
        except Exception as err:  # noqa: BLE001 - report and go on to the next case
            log(f"  {c.name}: FAILED {type(err).__name__}: {str(err)[:500]}")
            rows.append(dict(case=c.name, remat=c.remat, skipped=f"error {type(err).__name__}"))
            continue
        finally:
            prepared = None
            gc.collect()
        if same_batch_as in done and done[same_batch_as]["batch"] == batch:
            base = done[same_batch_as]
            base["vs_reference"] = row["images_per_s"] and base["images_per_s"] / row[
                "images_per_s"]
        if not c.remat:
            done[c.name] = row
        rows.append(row)

    info["total_s"] = time.perf_counter() - t_start
    text = "\n".join([
        f"LPT on {info['device']}, {info['model']}, bf16 activations / fp32 params, "
        f"{info['date']}; jax {info['jax']}. Timed: the shipped train step "
        "(`lpt_jax.steps.make_train_step`, `TrainStep.jit`) and `inference.make_predict_fn`.",
        f"MFU = analytic model FLOP/s / measured bf16 matmul rate {mm['tflops']:.1f} TFLOP/s "
        f"(data sheet {sheet}). Train steps: dual pair, images/step = 2B. 'vs release way': "
        "shared-trunk images/s / release-way images/s at the same B.",
        "", table(rows), "", f"total {info['total_s']:.0f} s"])
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(info=info, rows=rows, table=text), indent=1,
                                             default=str))
        log(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
