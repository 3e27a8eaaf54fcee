"""Case `gpu`: LPT on one GPU (H100/H200), bf16: the largest batch, images/s, FLOP/s and MFU of
the shipped steps and inference at ViT-B/16 and L/16, and the variants README.md lists.

Run by benchmarks/device_run.sh on the lent machine (no TensorFlow). 1. the bf16 matmul rate
(the MFU denominator; the data-sheet peak beside it); 2. per case the largest batch that fits:
a probe compile's bytes per image (`memory_analysis()`), then batches from the largest
predicted down; variants run at their base case's batch; 3. timing, calls back to back with
the state donated. Stops cleanly at --budget-s; the results are rewritten after every case.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import harness
import shipped
from compute import SIZES, Models, Spec
from harness import arg, case, fmt, log

# Dense bf16 data-sheet peaks (TFLOP/s), matched as substrings of device_kind, longest first.
DATASHEET = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
             "GH200": 989.0, "H200": 989.0, "H100": 989.0, "A100": 312.0}
TRAIN_BATCHES = (1024, 768, 512, 384, 320, 256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)
INFER_BATCHES = (4096, 3072, 2048, 1536, 1024, 768, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
DEFAULT_CASES = ("p1,p2,p2ref,p1+cudnn,p1+einsum,p1+xla,p1+fp32frozen,numerics,L-p1,inf,infref,"
                 "L-p2,L-p2ref,p1+fp32,p1+fp32+notf32,p1+remat,p2+remat,L-inf,L-infref,"
                 "L-p1+cudnn")
MFU_TARGET, TRUNK_TARGET = 0.45, 1.2  # issue 15: phase-1 B/16 MFU; phase-2 trunk / release way
RELEASE_OF = {"p2ref": "p2", "infref": "inf"}  # runs at its shared-trunk partner's batch


def base_of(spec: Spec) -> Optional[Spec]:
    """The spec whose batch this one reuses (None: it searches its own)."""
    if spec.step in RELEASE_OF:
        return dataclasses.replace(spec, step=RELEASE_OF[spec.step], key="")
    if spec.attention or spec.frozen or spec.notf32:
        return dataclasses.replace(spec, attention=None, frozen=None, notf32=False, key="")
    return None


def is_oom(err: BaseException) -> bool:
    return any(s in str(err) for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                       "OOM", "Failed to allocate"))


def first_line(err: BaseException, limit: int = 240) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:limit]}"


def memory_stat(name: str) -> Optional[float]:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats[name]) if name in stats else None


def matmul_tflops(sizes, repeats: int = 20) -> dict:
    """Best measured TFLOP/s of a jitted bf16 (n, n) @ (n, n) over `sizes`."""
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
            log(f"  bf16 matmul {n}x{n}: {rate:.1f} TFLOP/s")
            if rate > best["tflops"]:
                best = dict(tflops=rate, n=n)
        except Exception as err:  # noqa: BLE001 - a size too large for the card is skipped
            if not is_oom(err):
                raise
            log(f"  bf16 matmul {n}x{n}: out of memory")
    return best


def dtype_summary(tree) -> str:
    """'bfloat16 x148, float32 x2': the leaves' dtypes, by count."""
    counts = collections.Counter(str(x.dtype) for x in jax.tree.leaves(tree))
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def largest_fitting(models: Models, spec: Spec, candidates, limit, probe: int, margin: float,
                    start_at: Optional[int] = None):
    """(batch, prepared) of the largest candidate that compiles within the limit and runs once;
    a probe's bytes per image skip the hopeless ones; `start_at` (a base case's batch): no probe."""
    candidates = [b for b in candidates if start_at is None or b <= start_at]
    if limit is not None and len(candidates) > 1 and start_at is None:
        fp = models.prepare(spec, probe).footprint
        fixed = shipped.tree_bytes(models.params(spec.size))
        per_image = max(fp["peak"] - fixed, 0.0) / probe
        fitting = [b for b in candidates if fixed + per_image * b <= margin * limit]
        log(f"    probe B={probe}: {fp['peak'] / 2**30:.2f} GiB -> {per_image / 2**20:.1f} "
            f"MiB/image; trying from B={fitting[0] if fitting else '-'}")
        candidates = fitting or candidates[-1:]
    for batch in candidates:
        try:
            prepared = models.prepare(spec, batch)
            peak = prepared.footprint.get("peak", 0)
            if limit is None or peak <= limit:
                prepared.run(1)  # runs once: an out-of-memory shows here
                return batch, prepared
            log(f"    B={batch}: compiled footprint {peak / 2**30:.2f} GiB > limit")
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            log(f"    B={batch}: out of memory")
        prepared = None
        gc.collect()
    return None, None


def measure(models: Models, spec: Spec, batch: int, p, mm: float, sheet, seconds: float) -> dict:
    secs, _ = p.run(1)  # second warm-up call
    calls = int(np.clip(seconds / max(secs, 1e-4), 3, 200))
    secs, cpu = p.run(calls)
    step_s = secs / calls
    row = dict(models.describe(spec, p, batch), size=spec.size, step=spec.step,
               attention=spec.attention or models.default_attention(spec.size),
               frozen=dtype_summary(p.received()),
               frozen_mib=shipped.tree_bytes(p.received()) / 2**20, step_s=step_s,
               cpu_s_per_step=cpu / calls, images_per_s=p.images / step_s, calls=calls,
               finite=p.finite(), device_peak_so_far_gib=(memory_stat("peak_bytes_in_use")
                                                          or float("nan")) / 2**30)
    flops = row["analytic_gflop"] * 1e9
    row.update(model_tflops=flops / step_s / 1e12, xla_tflops=row["xla_gflop"] / step_s / 1e3)
    row["mfu"] = row["model_tflops"] / mm if mm else float("nan")
    row["mfu_sheet"] = row["model_tflops"] / sheet if sheet else float("nan")
    log(f"  {row['case']} B={batch}: {row['images_per_s']:.1f} img/s, MFU {pct(row['mfu'])}, "
        f"peak {row['peak_mib'] / 1024:.2f} GiB, frozen {row['frozen']}, finite={row['finite']}")
    return row


def numerics(models: Models, size: str, batch: int, tolerance: float) -> dict:
    """The bf16 phase-1 step and phase-1 / phase-2 inference vs the same in float32 without
    TF32, same params and synthetic batch."""
    res: dict = {}
    for dtype, mods in (("bf16", "+bf16"), ("fp32", "+fp32+notf32")):
        res[dtype] = {}
        for step in ("p1", "inf1", "inf"):
            p = models.prepare(Spec.parse(f"{size}-{step}{mods}"), batch)
            p.call()
            res[dtype].update({f"{step}_{k}": v for k, v in p.outputs().items()})
            del p
        gc.collect()
    lo, hi = res["bf16"], res["fp32"]

    def rel(k):  # max |bf16 - fp32| / max |fp32|
        return float(np.max(np.abs(lo[k] - hi[k])) / max(float(np.max(np.abs(hi[k]))), 1e-30))
    out = dict(size=size, model=SIZES[size][0], batch=batch, tolerance=tolerance,
               loss_bf16=float(lo["p1_loss"]), loss_fp32=float(hi["p1_loss"]),
               loss_rel=rel("p1_loss"), grad_norm_rel=rel("p1_grad_norm"))
    for k in ("inf1_logits", "inf_logits"):
        out[f"{k}_rel"] = rel(k)
        out[f"{k}_argmax_agree"] = float(np.mean(lo[k].argmax(-1) == hi[k].argmax(-1)))
    out["within_tolerance"] = all(out[k] <= tolerance for k in (
        "loss_rel", "inf1_logits_rel", "inf_logits_rel"))
    log(f"  numerics {out['model']}: loss rel {out['loss_rel']:.2e}, logits rel "
        f"{out['inf_logits_rel']:.2e}: {'ok' if out['within_tolerance'] else 'EXCEEDED'}")
    return out


def pct(v) -> str:
    return fmt(100 * v, ".1f") + " %" if v == v else ""


def report(info: dict, rows: list, nums: list) -> str:
    header = ["case", "attention", "frozen tree", "B", "images/step", "ms/step", "images/s",
              "ratio", "analytic GFLOP/step", "XLA GFLOP/step", "model TFLOP/s", "MFU (measured)",
              "MFU (sheet)", "peak GiB", "compile s"]
    cells = []
    for r in rows:
        if "skipped" in r:  # a shorter row: markdown leaves the rest empty
            cells.append([r["case"], r.get("attention", ""), f"skipped: {r['skipped']}"])
            continue
        ratio = "; ".join(f"{r[k]:.2f}x {w}" for k, w in (("vs_reference", "release way"),
                                                           ("vs_base", "base")) if k in r)
        cells.append([f"`{r['key']}` {r['case']}", r["attention"],
                      f"{r['frozen']} ({r['frozen_mib']:.1f} MiB)", r["batch"], r["images"],
                      fmt(1e3 * r["step_s"], ".1f"), fmt(r["images_per_s"], ".1f"), ratio,
                      fmt(r["analytic_gflop"], ".1f"), fmt(r["xla_gflop"], ".1f"),
                      fmt(r["model_tflops"]), pct(r["mfu"]), pct(r["mfu_sheet"]),
                      fmt(r["peak_mib"] / 1024), fmt(r["compile_s"], ".0f")])
    parts = [f"bf16 unless marked. MFU = analytic model FLOP/s / the measured bf16 matmul rate "
             f"{info['matmul_bf16_tflops']:.1f} TFLOP/s (n={info['matmul_n']}), and / the data "
             f"sheet's {info['datasheet_bf16_tflops']}. B: searched for base cases, theirs for "
             "variants; train steps take 2B images. Ratios at the same B: shared trunk / release "
             f"way, this row / its base. Default attention {info['default_attention']}.",
             "", harness.table(header, cells), ""]
    if nums:
        parts += ["Numerics, bf16 vs float32 without TF32 (same params and batch), rel = "
                  "max|bf16 - fp32| / max|fp32|:", "", harness.table(
                      ["model", "B", "loss bf16", "loss fp32", "loss rel", "grad-norm rel",
                       "phase-1 logits rel", "phase-2 logits rel", "argmax agree (p1 / p2)",
                       "within tolerance"],
                      [[n.get("model", n["size"]), n["batch"], "skipped: " + n["skipped"]]
                       if "skipped" in n else
                       [n["model"], n["batch"], f"{n['loss_bf16']:.5f}", f"{n['loss_fp32']:.5f}",
                        f"{n['loss_rel']:.2e}", f"{n['grad_norm_rel']:.2e}",
                        f"{n['inf1_logits_rel']:.2e}", f"{n['inf_logits_rel']:.2e}",
                        f"{n['inf1_logits_argmax_agree']:.2f} / {n['inf_logits_argmax_agree']:.2f}",
                        f"{'yes' if n['within_tolerance'] else 'NO'} ({n['tolerance']:g})"]
                       for n in nums]), ""]
    for r in rows:
        if r.get("key", "").split("-")[-1] == "p1" and r.get("size") != "microL" and "mfu" in r:
            met = "met" if r["mfu"] >= MFU_TARGET else "not met"
            parts.append(f"- phase-1 step MFU {100 * r['mfu']:.1f} % of the measured rate; "
                         f"target >= {100 * MFU_TARGET:.0f} %: {met}")
        if r.get("step") == "p2" and "vs_reference" in r:
            parts.append(f"- phase-2 shared trunk / release way ({r['case']}, B={r['batch']}): "
                         f"{r['vs_reference']:.2f}x; target >= {TRUNK_TARGET}x: "
                         f"{'met' if r['vs_reference'] >= TRUNK_TARGET else 'not met'}")
    parts.append(f"\ntotal {info.get('total_s', 0):.0f} s"
                 + (" (cut short)" if info.get("interrupted") else ""))
    return "\n".join(parts)


@case("gpu", lambda a: "gpu_quick" if a.quick else "gpu_h100",
      "one GPU: largest batch, img/s, MFU of the shipped steps at B/16 and L/16, variants",
      arg("--quick", action="store_true", help="tiny ViTs at 32 px, small batches (smoke run)"),
      arg("--cases", default=DEFAULT_CASES, help="specs (and 'numerics'), in priority order"),
      arg("--budget-s", type=float, default=0.0, help="no case starts unless its estimated "
          "cost fits before this many seconds (default 400, --quick 3600)"),
      arg("--seconds-per-case", type=float, default=0.0, help="default 4, --quick 1"),
      arg("--mem-limit-gib", type=float, default=0.0, help="0: the device's bytes_limit"),
      arg("--margin", type=float, default=0.9, help="share of the limit the probe may predict"),
      arg("--train-batch", type=int, default=0, help="start here, no probe (0: search)"),
      arg("--infer-batch", type=int, default=0, help="start here, no probe (0: search)"),
      arg("--numerics-batch", type=int, default=8),
      arg("--tolerance", type=float, default=2e-2, help="max relative difference bf16 vs fp32"))
def gpu(args, rec):
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # before jax's GPU client
    t_start, q = time.perf_counter(), args.quick
    matmul_sizes, train_batches, infer_batches, probe = (
        ((256, 512), (64, 32, 16, 8), (128, 64, 32), 4) if q else
        ((4096, 8192, 16384), TRAIN_BATCHES, INFER_BATCHES, 16))
    budget = args.budget_s or (3600.0 if q else 400.0)
    seconds = args.seconds_per_case or (1.0 if q else 4.0)
    nbatch = min(args.numerics_batch, 4) if q else args.numerics_batch
    limit_gib = args.mem_limit_gib or (0.03 if q else 0.0)  # quick: the search must step down
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    if q:  # the tiny models instead of B/16 and L/16
        keys = [f"microL-{k[2:]}" if k.startswith("L-") else f"micro-{k}" for k in keys]
    items = [("numerics", k.rpartition("-")[0] or "B") if k.endswith("numerics")
             else Spec.parse(k, "B") for k in keys]  # specs, and ('numerics', size)
    dev = jax.devices()[0]
    limit = limit_gib * 2**30 if limit_gib else memory_stat("bytes_limit")
    info = dict(device=f"{dev.platform}: {dev.device_kind}", jax=jax.__version__,
                cases=args.cases, budget_s=budget, memory_limit_gib=limit and limit / 2**30,
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    log("1. bf16 matmul rate")
    mm = matmul_tflops(matmul_sizes)
    sheet = next((v for k, v in sorted(DATASHEET.items(), key=lambda kv: -len(kv[0]))
                  if k in dev.device_kind), None)
    models = Models(shipped.make_mesh(), "bfloat16")
    info.update(matmul_bf16_tflops=mm["tflops"], matmul_n=mm["n"], datasheet_bf16_tflops=sheet,
                default_attention=models.default_attention("micro" if q else "B"))
    rows, nums, done, cost = [], [], {}, {}
    guess = {"search": 75.0, "fixed": 35.0, "numerics": 60.0}

    def estimate(size, what):  # the last such case's cost, ViT-L ~3x ViT-B, or a guess
        x = {"L": 3.0, "microL": 3.0}
        known = [c * x.get(size, 1) / x.get(s, 1) for (s, w), c in cost.items() if w == what]
        return cost.get((size, what)) or (known or [guess[what] * x.get(size, 1)])[-1]

    def save():
        rec.write(report(info, rows, nums), dict(info=info, rows=rows, numerics=nums))
    log("2-3. batch search and timing")
    try:
        for item in items:
            t_case = time.perf_counter()
            if isinstance(item, tuple):
                size, what, label = item[1], "numerics", f"{item[1]}-numerics"
            else:
                base = base_of(item)
                base_row = done.get(base) if base else None
                given = args.train_batch if item.train else args.infer_batch
                size, label = item.size, item.key
                what = "fixed" if base_row or given else "search"
            est = estimate(size, what)
            if t_case - t_start + est > budget:
                msg = f"time budget ({t_case - t_start:.0f} s spent, ~{est:.0f} s needed)"
                log(f"  {label}: skipped, {msg}")
                (nums if what == "numerics" else rows).append(dict(
                    case=label, size=size, batch=nbatch, skipped=msg))
                continue
            log(f"  {label}, {t_case - t_start:.0f} s spent (estimate {est:.0f} s)")
            try:
                if what == "numerics":
                    nums.append(numerics(models, size, nbatch, args.tolerance))
                    continue
                default = models.default_attention(size)
                if item.attention and base_row and default.endswith(f"({item.attention})"):
                    rows.append(dict(case=label, attention=item.attention,
                                     skipped=f"same program as the default row ({default})"))
                    continue
                start_at = base_row["batch"] if base_row else (given or None)
                batches = train_batches if item.train else infer_batches
                if start_at and start_at not in batches:
                    batches = tuple(sorted({start_at, *batches}, reverse=True))
                batch, p = largest_fitting(models, item, batches, limit, probe, args.margin,
                                           start_at)
                if batch is None:
                    rows.append(dict(case=label, skipped="no batch fits"))
                    continue
                row = measure(models, item, batch, p, mm["tflops"], sheet, seconds)
                row["batch_from"] = "base case" if base_row else "given" if given else "search"
                if base_row and base_row["batch"] == batch:
                    if item.step in RELEASE_OF:
                        base_row["vs_reference"] = base_row["images_per_s"] / row["images_per_s"]
                    else:
                        row["vs_base"] = row["images_per_s"] / base_row["images_per_s"]
                done[dataclasses.replace(item, key="")] = row
                rows.append(row)
            except Exception as err:  # noqa: BLE001 - a row with the error, then the next case
                log(f"  {label}: FAILED {first_line(err, 500)}")
                (nums if what == "numerics" else rows).append(dict(
                    case=label, size=size, batch=nbatch, skipped=first_line(err)))
            finally:
                p = None
                gc.collect()
                cost[(size, what)] = time.perf_counter() - t_case
                save()
    except KeyboardInterrupt:  # device_run.sh's timeout: keep what was measured
        info["interrupted"] = True
        log("interrupted: writing what was measured")
    info["total_s"] = time.perf_counter() - t_start
    save()
