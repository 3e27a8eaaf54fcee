"""Cases over the shipped train steps and inference (`compute`, `profile`, `vs_pytorch`), and
what the GPU case shares: specs, the model cache, the analytic FLOP count.

A spec names one shipped function, `[SIZE-]STEP[+MOD...]` (README.md lists the names), e.g.
`p2ref` (the release's two-pass phase-2 step), `L-inf+cudnn`, `p1+fp32+notf32`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import glob
import gzip
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import jax

import harness
import shipped
from harness import arg, case, child, fmt, log

STEPS = {  # key: (FLOP formula, the phase in shipped.py, train step?, label)
    "p1": ("p1", "PHASE1", True, "phase-1 train step"),
    "p1all": (None, "PHASE1_ALL_GRADS", True, "phase-1 train step, all params trained"),
    "p2": ("p2", "SHARED_TRUNK", True, "phase-2 train step, shared trunk"),
    "p2ref": ("p2ref", "RELEASE_WAY", True, "phase-2 train step, release way"),
    "p2merged": ("p2ref", "XLA_MERGED", True, "phase-2 train step, release way, XLA may merge"),
    "p2refall": (None, "RELEASE_ALL_GRADS", True, "phase-2 train step, release way, all params"),
    "inf1": ("inf1", "PHASE1", False, "phase-1 inference"),
    "inf": ("inf", "SHARED_TRUNK", False, "phase-2 inference, shared trunk"),
    "infref": ("infref", "RELEASE_WAY", False, "phase-2 inference, release way"),
    "infmerged": ("infref", "XLA_MERGED", False, "phase-2 inference, release way, XLA may merge"),
}
MODS = {"remat": ("remat", True), "notf32": ("notf32", True), "fp32frozen": ("frozen", "float32"),
        "bf16": ("dtype", "bfloat16"), "fp32": ("dtype", "float32"),
        **{a: ("attention", a) for a in ("einsum", "xla", "cudnn")}}
SIZES = {  # name: (variant, image size, explicit ViT fields | a SigLIP config name | None)
    "Ti": ("Ti/16", 224, None), "B": ("B/16", 224, None), "L": ("L/16", 224, None),
    "So400m": ("So400m/14", 224, "siglip_so400m"),
    "micro": ("micro", 32, dict(patch_size=8, width=64, depth=4, mlp_dim=256, num_heads=2)),
    "microL": ("microL", 32, dict(patch_size=8, width=96, depth=6, mlp_dim=384, num_heads=3)),
}


def size_key(name: str) -> str:
    key = {"tiny": "Ti"}.get(name, name.split("/")[0])
    if key not in SIZES:
        raise ValueError(f"unknown size {name!r}: one of {list(SIZES)}")
    return key


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str
    size: str
    step: str
    remat: bool = False
    attention: Optional[str] = None
    frozen: Optional[str] = None
    dtype: Optional[str] = None
    notf32: bool = False

    @classmethod
    def parse(cls, key: str, size: str = "B") -> "Spec":
        key = key.strip()
        head, _, rest = key.partition("-")
        size, body = (head, rest) if rest and head in SIZES else (size_key(size), key)
        step, *mods = body.split("+")
        if step not in STEPS or any(m not in MODS for m in mods) or (
                "fp32frozen" in mods and not STEPS[step][2]):
            raise ValueError(f"bad spec {key!r}: [SIZE-]STEP[+MOD...], SIZE of {list(SIZES)}, "
                             f"STEP of {list(STEPS)}, MOD of {list(MODS)} (see compute.py)")
        return cls(key, size, step, **dict(MODS[m] for m in mods))

    @property
    def train(self) -> bool:
        return STEPS[self.step][2]

    def label(self) -> str:
        mods = [m for m in ("remat" if self.remat else "", self.attention and
                            f"attention={self.attention}", self.dtype, self.frozen and
                            "frozen tree float32", "no TF32" if self.notf32 else "") if m]
        return f"{SIZES[self.size][0]} {STEPS[self.step][3]}" + "".join(f", {m}" for m in mods)


class Models:
    """Configs, models and float32 params (random backbone, on the device, one set per size)
    for specs; `prepare` compiles a spec's shipped function (benchmarks/shipped.py)."""

    def __init__(self, mesh, dtype: str = "float32"):
        self.mesh, self.dtype, self._models, self._params = mesh, dtype, {}, {}

    def config(self, spec: Spec, batch: int, dtype: Optional[str] = None):
        variant, image_size, vit = SIZES[spec.size]
        siglip = vit if isinstance(vit, str) else ""
        return shipped.bench_config(variant, image_size=image_size, batch=batch,
                                    dtype=dtype or spec.dtype or self.dtype, remat=spec.remat,
                                    vit=None if siglip else vit, attention=spec.attention,
                                    siglip=siglip)

    def model(self, spec: Spec):
        key = (spec.size, spec.dtype or self.dtype, spec.remat, spec.attention)
        if key not in self._models:
            self._models[key] = shipped.model(self.config(spec, 1))
        return self._models[key]

    def params(self, size: str):
        if size not in self._params:
            _, params = shipped.build(self.config(Spec("", size, "p1"), 1, "float32"))
            self._params[size] = shipped.replicate(params, self.mesh)
        return self._params[size]

    def default_attention(self, size: str) -> str:
        return shipped.attention(self.model(Spec("", size, "p1")))

    def prepare(self, spec: Spec, batch: int) -> shipped.Prepared:
        phase = getattr(shipped, STEPS[spec.step][1])
        model, params = self.model(spec), self.params(spec.size)
        precision = (jax.default_matmul_precision("float32") if spec.notf32
                     else contextlib.nullcontext())
        with precision:  # read when tracing: the compiled program keeps it
            if spec.train:
                return shipped.prepare_step(model, phase, self.config(spec, batch), params,
                                            batch=batch, mesh=self.mesh, name=spec.key,
                                            frozen_dtype=spec.frozen)
            return shipped.prepare_predict(model, phase, params, batch=batch, mesh=self.mesh,
                                           image_size=SIZES[spec.size][1], name=spec.key)

    def describe(self, spec: Spec, p: shipped.Prepared, batch: int) -> dict:
        """The compiled program's figures: images, XLA and analytic FLOPs, bytes."""
        fp, nan = p.footprint, float("nan")
        flops = step_flops(shipped.model_dims(self.model(spec)), STEPS[spec.step][0], batch)
        return dict(key=spec.key, case=spec.label(), batch=batch, images=p.images,
                    compile_s=p.compile_s, xla_gflop=fp["xla_flops"] / 1e9,
                    analytic_gflop=flops / 1e9 if flops else nan,
                    peak_mib=fp.get("peak", nan) / 2**20, temp_mib=fp.get("temp", nan) / 2**20)


# ----------------------------------------------------------------------------- FLOP count


def _blocks(dims: dict, count: int, p: int, *, batched: bool, last: bool,
            backward: bool = False) -> float:
    """Matmul FLOPs (2 per multiply-add) of `count` blocks with p prompt tokens giving keys and
    values only (projected per image if `batched`, else once per call, not counted); `last`:
    the block before class-token pooling computes one row. q, out: 4qd^2; k, v: 4rd^2; MLP
    4qdm; attention 4qsd, twice that backward (frozen block: input gradients only)."""
    if count <= 0:
        return 0.0
    d, m, n = dims["d"], dims["m"], dims["prefix"] + dims["n"]

    def f(q, s, r):
        attention = (8.0 if backward else 4.0) * q * s * d
        return 4.0 * q * d * d + 4.0 * r * d * d + 4.0 * q * d * m + attention
    if not dims["keys_only_prompts"]:  # an older ViT ran prompts through the whole block
        return count * f(n + p, n + p, n + p)
    r = n + p if batched else n
    return (count - 1) * f(n, n + p, r) + f(1, n + p, r) if last else count * f(n, n + p, r)


def step_flops(dims: dict, kind: Optional[str], batch: int) -> Optional[float]:
    """Analytic model FLOPs of one call (matmuls only; remat's recomputation not counted, the
    MFU convention); None for a variant with no formula (all-parameter training)."""
    if kind is None:
        return None
    depth, k, p = dims["depth"], dims["k"], dims["p"]
    last = dims["prefix"] == 1 and dims["pool"] == "tok"

    def shared(count, last=last, backward=False):
        return _blocks(dims, count, p, batched=False, last=last, backward=backward)

    def grouped(count, backward=False):
        return _blocks(dims, count, 2 * p, batched=True, last=last, backward=backward)
    embed = 2.0 * dims["n"] * dims["patch_in"] * dims["d"]
    head = 2.0 * dims["d"] * dims["classes"]
    fwd_p1 = embed + shared(depth) + head
    fwd_p2 = embed + shared(k, last=False) + shared(depth - k) + grouped(depth - k) + head
    fwd_ref = embed + shared(depth) + shared(k, last=False) + grouped(depth - k) + head
    bwd_p2 = grouped(depth - k, backward=True) + 2 * head
    return {"p1": 2 * batch * (fwd_p1 + shared(depth, backward=True) + 2 * head),
            "p2": 2 * batch * (fwd_p2 + bwd_p2), "p2ref": 2 * batch * (fwd_ref + bwd_p2),
            "inf1": batch * fwd_p1, "inf": batch * fwd_p2, "infref": batch * fwd_ref}[kind]


# ----------------------------------------------------------------------------- compute


@case("compute", lambda a: "siglip_compute" if size_key(a.size) == "So400m" else "lpt_compute",
      "the shipped steps and inference, variants in turn in one process: rates, ratios, FLOPs",
      arg("--size", default="B/16", help=f"default size of the specs: {list(SIZES)}"),
      arg("--batch", type=int, default=8, help="images per stream"),
      arg("--groups", default="infref,inf;p2ref,p2;p1all,p1",
          help="';'-separated comparisons of ','-separated specs; the first is the baseline"),
      arg("--dtype", default="float32"), arg("--rounds", type=int, default=3,
                                             help="timed rounds (0: compile only)"),
      arg("--warmup", type=int, default=1), arg("--min-seconds", type=float, default=3.0))
def compute(args, rec):
    models, rows = Models(shipped.make_mesh(), args.dtype), []
    for group in args.groups.split(";"):
        specs = [Spec.parse(k, args.size) for k in group.split(",") if k.strip()]
        prepared = []
        for s in specs:
            log(f"  {s.label()}: compiling ...")
            prepared.append(models.prepare(s, args.batch))
        if args.rounds:
            harness.round_robin(prepared, args.rounds, warmup=args.warmup,
                                min_seconds=args.min_seconds)
        group = []
        for s, p in zip(specs, prepared, strict=True):
            r = dict(models.describe(s, p, args.batch), group=specs[0].key)
            base = (group or [r])[0]
            r["flop_ratio"] = base["xla_gflop"] / r["xla_gflop"]
            if args.rounds:
                r.update(harness.rates(p.images, p.times, p.cpu), times=p.times, cpu=p.cpu,
                         finite=p.finite())
                r.update(x_wall=base.get("seconds", r["seconds"]) / r["seconds"],
                         x_cpu=base.get("cpu_seconds", r["cpu_seconds"]) / r["cpu_seconds"])
            group.append(r)
        rows += group
        del prepared
        gc.collect()
    text = (f"Batch {args.batch} per stream, {args.dtype}, 365 classes, K=L/2. A group's variants "
            "called in turn; medians of wall and process-CPU seconds; x = the group's first / "
            "this row; GFLOP: XLA's cost_analysis(), analytic: the model's matmuls.\n\n")
    text += harness.table(
        ["baseline", "variant", "img/s", "img/CPU-s", "x wall", "x CPU-s", "XLA GFLOP",
         "FLOP ratio", "analytic GFLOP", "peak MiB", "temp MiB", "compile s", "calls"],
        [[r["group"], f"`{r['key']}` {r['case']}", fmt(r.get("images_per_s")),
          fmt(r.get("images_per_cpu_s")), fmt(r.get("x_wall")), fmt(r.get("x_cpu")),
          fmt(r["xla_gflop"], ".4g"), fmt(r["flop_ratio"]), fmt(r["analytic_gflop"], ".4g"),
          fmt(r["peak_mib"], ".0f"), fmt(r["temp_mib"], ".0f"), fmt(r["compile_s"], ".1f"),
          r.get("calls", 0)] for r in rows])
    rec.write(text, dict(args=vars(args), rows=rows))


# ----------------------------------------------------------------------------- profile


def _op_sources(hlo_text: str) -> dict:
    """HLO instruction name -> a short source name (last 3 parts, block numbers dropped)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo_text):
        out[m.group(1)] = "/".join(re.sub(r"encoderblock_\d+", "block", m.group(2))
                                   .split("/")[-3:])
    return out


def _op_times(trace_dir: str, calls: int) -> dict:
    """Summed duration (ms per call) of each XLA op in the trace, by instruction name."""
    path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    times = collections.defaultdict(float)
    for e in events:
        if (e.get("ph") == "X" and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
                and not e["name"].startswith(("ThunkExecutor", "end:", "Slinky"))):
            times[e["name"]] += e["dur"] / 1e3 / calls
    return times


@case("profile", "profile",
      "where a shipped function's time goes on the CPU (jax.profiler's ops by layer)",
      arg("--spec", default="p2"), arg("--size", default="B/16"),
      arg("--batch", type=int, default=8), arg("--calls", type=int, default=2),
      arg("--top", type=int, default=25))
def profile(args, rec):
    spec = Spec.parse(args.spec, args.size)
    p = Models(shipped.make_mesh()).prepare(spec, args.batch)
    p.call()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        wall = sum(p.call()[0] for _ in range(args.calls)) / args.calls
        jax.profiler.stop_trace()
        times = _op_times(trace_dir, args.calls)
    sources = _op_sources(p.compiled.as_text())
    by_source = collections.defaultdict(float)
    for op, ms in times.items():
        kind = "matmul" if op.startswith(("ynn_fusion", "dot")) else "other"
        by_source[(sources.get(op, op), kind)] += ms
    total = sum(by_source.values()) or float("nan")
    matmul = sum(ms for (_, kind), ms in by_source.items() if kind == "matmul")
    top = sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]
    text = (f"{spec.label()}, batch {args.batch}: {wall * 1e3:.0f} ms wall per call, "
            f"{total:.0f} ms of summed op time (the XLA threads overlap); XLA "
            f"{p.footprint['xla_flops'] / 1e9:.0f} GFLOP; matmul kernels (YNNPACK / XLA dot): "
            f"{100 * matmul / total:.1f} % of op time.\n\n")
    text += harness.table(["ms/call", "share", "kernel", "source"],
                          [[f"{ms:.1f}", f"{100 * ms / total:.1f} %", kind, f"`{src}`"]
                           for (src, kind), ms in top])
    rec.write(text, dict(args=vars(args), wall_s=wall, by_source=[
        dict(source=s, kind=k, ms=ms) for (s, k), ms in top]))


# ----------------------------------------------------------------------------- vs PyTorch

TORCH_SCRIPT = harness.HERE / "bench_torch_reference.py"
PAIRS = {"phase1_step": "phase1_train_step",  # ours -> the release's (bench_torch_reference.py)
         "phase2_step": "phase2_train_step_reference",
         "phase2_inference": "phase2_inference_reference"}


@child("ours_cases")
def ours_cases(p: dict) -> dict:
    """Our three cases in this (fresh) process, with only the adapter API that older
    checkouts' shipped.py has too (bench_config, build, make_mesh, prepare_step/_predict)."""
    mesh, out = shipped.make_mesh(), {}
    variant, image_size, vit = SIZES[p["size"]]
    for dtype in ["float32"] + (["bfloat16"] if p["bf16"] else []):
        suffix = "" if dtype == "float32" else "_bf16"
        config = shipped.bench_config(variant, image_size=image_size, batch=p["batch"],
                                      dtype=dtype, vit=vit if isinstance(vit, dict) else None)
        model, params = shipped.build(config)
        for name, phase in (("phase1_step", shipped.PHASE1), ("phase2_step", shipped.SHARED_TRUNK),
                            ("phase2_inference", shipped.SHARED_TRUNK)):
            if name.endswith("step"):
                c = shipped.prepare_step(model, phase, config, params, batch=p["batch"], mesh=mesh)
            else:
                c = shipped.prepare_predict(model, phase, params, batch=p["batch"], mesh=mesh,
                                            image_size=image_size)
            c.call()  # warm-up
            calls = [c.call() for _ in range(p["repeats"])]
            if not c.finite():
                raise SystemExit(f"{name}{suffix}: non-finite outputs")
            wall, cpu = [w for w, _ in calls], [x for _, x in calls]
            out[name + suffix] = dict(harness.rates(c.images, wall, cpu), wall_s=wall, cpu_s=cpu,
                                      xla_gflop=c.footprint["xla_flops"] / 1e9)
    return dict(cases=out, jax=jax.__version__)


@case("vs_pytorch", "vs_pytorch",
      "ours vs the PyTorch release (bench_torch_reference.py), fresh processes taking turns",
      arg("--rounds", type=int, default=2), arg("--repeats", type=int, default=3),
      arg("--batch", type=int, default=8),
      arg("--size", default="B/16", help="B/16, or micro for a smoke run"),
      arg("--torch-python", default=os.environ.get("LPT_TORCH_PYTHON",
                                                   "/work/oracle_venv/bin/python"),
          help="python of the torch venv (requirements-torch.txt); '' = no torch side"),
      arg("--baseline-repo", default="", help="another checkout with benchmarks/shipped.py"),
      arg("--bf16", action="store_true", help="also our steps with model.vit.dtype=bfloat16"))
def vs_pytorch(args, rec):
    size = size_key(args.size)
    payload = dict(batch=args.batch, repeats=args.repeats, bf16=args.bf16, size=size)
    sides = {}
    if args.torch_python:
        if not Path(args.torch_python).exists():
            raise SystemExit(f"--torch-python {args.torch_python} does not exist ('' to skip)")
        tp = dict(batch=args.batch, repeats=args.repeats, cases=list(PAIRS.values()),
                  smoke=size.startswith("micro"))
        sides["release"] = lambda r: harness.fresh("torch_cases", tp, python=args.torch_python,
                                                   script=TORCH_SCRIPT)
    sides["ours"] = lambda r: harness.fresh("ours_cases", payload)
    if args.baseline_repo:
        base = str(Path(args.baseline_repo).resolve())
        if not Path(base, "benchmarks/shipped.py").exists():
            raise SystemExit(f"--baseline-repo {base} has no benchmarks/shipped.py")
        sides["baseline"] = lambda r: harness.fresh("ours_cases", payload,
                                                    env={"LPT_BENCH_REPO": base})
    runs = harness.alternate(sides, args.rounds)

    def best(side, c):  # the round with the most images per CPU-second
        return max((r["cases"][c] for r in runs.get(side, []) if c in r["cases"]),
                   key=lambda x: x["images_per_cpu_s"], default=None)

    def ratio(a, z, k):
        return f"{a[k] / z[k]:.2f}x" if a and z else ""
    rows = []
    for ours in runs["ours"][0]["cases"]:
        o, t, b = best("ours", ours), best("release", PAIRS.get(ours, "")), best("baseline", ours)
        rows.append([ours, fmt(o["images_per_cpu_s"], ".3f"), fmt(t and t["images_per_cpu_s"],
                     ".3f"), f"**{ratio(o, t, 'images_per_cpu_s')}**" if t else "",
                     fmt(o["images_per_s"]), fmt(t and t["images_per_s"]),
                     ratio(o, t, "images_per_s"), fmt(o["xla_gflop"], ".4g"),
                     fmt(b and b["images_per_cpu_s"], ".3f"), ratio(o, b, "images_per_cpu_s")])
    base_commit = harness.commit(Path(args.baseline_repo)) if args.baseline_repo else ""
    text = (f"{SIZES[size][0]}, fp32 unless marked, batch B = {args.batch} (train steps: 2B "
            f"images). Sides in fresh processes taking turns, {args.rounds} rounds of "
            f"{args.repeats} calls; per case the best round. Release: "
            f"`{', '.join(PAIRS.values())}` of bench_torch_reference.py"
            + (f"; baseline: `{args.baseline_repo}` ({base_commit})" if base_commit else "")
            + (f"; torch {runs['release'][0]['torch']}, timm {runs['release'][0]['timm']}"
               if "release" in runs else "; no torch side in this run") + ".\n\n")
    text += harness.table(["case", "ours img/CPU-s", "release img/CPU-s", "ratio per CPU-s",
                           "ours img/s", "release img/s", "ratio wall", "ours XLA GFLOP",
                           "baseline img/CPU-s", "ours / baseline"], rows)
    rec.write(text, dict(args=vars(args), baseline_commit=base_commit, **runs))
