"""LPT on one GPU (H100/H200): images/s and bf16 MFU of the shipped steps, ViT-B/16 and ViT-L/16.

    python benchmarks/gpu_h100.py [--out $OUT/gpu_h100.json]   # < 8 min on one H100/H200
    python benchmarks/gpu_h100.py --quick                       # tiny models, any device (smoke)

Times the library's code, not a copy: every train step is `lpt_jax.steps.make_train_step(...)`
compiled by `TrainStep.jit(mesh)` (what `lpt_jax.trainer.run_phase` runs), every inference
`lpt_jax.inference.make_predict_fn`; both are set up by benchmarks/shipped.py from
configs/common.py's base config with `model.vit.dtype='bfloat16'` (bf16 activations; the
frozen backbone as `TrainStep.init` returns it, in the compute dtype, and for inference as
shipped.prepare_predict places it, like eval / predict / serving; the trainable subtree
float32) and, for the remat cases, `model.vit.remat=True`. The release's way of phase 2 is
the same factory given `dataclasses.replace(PHASES[2], forward_method=LPT.phase2_reference)`.
Needs jax (with CUDA), flax, optax, numpy and ml-collections (lpt_jax imports no TF on this
path): synthetic on-device batches, no data pipeline, no checkpoint (random weights: speed
does not depend on them). Run it from a checkout (the repository root is put on sys.path).

What it does, in this order, stopping cleanly when --budget-s is spent:
 1. The card's bf16 matmul rate: the best TFLOP/s of a jitted bf16 `jnp.dot` of square
    matrices (the MFU denominator; MFU against the data-sheet peak is reported beside it).
 2. For each case the largest batch that fits: a probe compile at a small batch gives bytes
    per image (`memory_analysis()`), then the descending list of batches is tried from the
    largest predicted to fit; a candidate whose compiled footprint exceeds the device limit,
    or that fails with out-of-memory, moves to the next one. Variants of a case (another
    attention, the frozen tree in float32, the release way) run at their base case's batch.
 3. Times the compiled step (warm-up, then enough calls for ~--seconds-per-case dispatched back
    to back, state threaded through and donated as in the trainer) and reports images/s,
    analytic model FLOP/s, MFU against step 1 and against the data sheet, the XLA
    `cost_analysis()` FLOPs and the compiled peak bytes (`memory_analysis()`).

Cases (--cases, in priority order; a key is `[L-]<step>[+modifier...]`):
  step      p1 phase-1 train step | p2 phase-2 train step on the shared trunk (`PHASES[2]`) |
            p2ref the release's way (two full passes) | inf / infref phase-2 inference both
            ways | numerics (below)
  L-        ViT-L/16 at 224 px instead of ViT-B/16
  +remat    `model.vit.remat=True` (own batch search: remat buys batch)
  +einsum / +xla / +cudnn   `config.model.vit.attention` (explicit heads-major softmax,
            `jax.nn.dot_product_attention` XLA, and its cuDNN implementation); the default
            row uses the config's default ('auto'). A compile failure (cuDNN absent or
            refusing the shape) becomes a row with the error's first line.
  +fp32frozen   the frozen tree `TrainStep.init` returns, cast back to float32 before
            compiling (the step accepts either): what keeping an fp32 copy costs.
  numerics  at batch --numerics-batch: the bf16 step vs the same step in float32 (fp32 model,
            fp32 frozen tree, matmul precision 'highest'), same params and batch: relative
            difference of the loss and grad norm after one step, and of the logits of phase-1
            and phase-2 (shared trunk) inference, against --tolerance (2e-2 for bf16).
Train steps see the dual pair (class-balanced + instance-balanced batch of B images each):
images/s count both (2B per step); the shipped step's loss (A-GCL both branches), SGD momentum
+ coupled decay on the trainable subtree, non-finite guard and metrics are all in the timed
program. Results (JSON and a markdown table beside it, same stem) are rewritten after every
case, so a run cut short by a timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from lpt_jax import parallel  # noqa: E402
from lpt_jax.backbones.vit import ViT  # noqa: E402
from lpt_jax.method.lpt_model import LPT, lpt_from_config  # noqa: E402
from lpt_jax.method.phases import Phase  # noqa: E402

import host  # noqa: E402
import shipped  # noqa: E402

NUM_CLASSES = shipped.NUM_CLASSES  # Places-LT
# Dense bf16 data-sheet peaks (TFLOP/s), matched as substrings of `device_kind` (longest key
# first): 'NVIDIA H200' -> H200, 'NVIDIA H100 80GB HBM3' -> the SXM part.
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0,
                         "H100 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100": 989.0,
                         "A100": 312.0}
TRAIN_BATCHES = (1024, 768, 512, 384, 320, 256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)
INFER_BATCHES = (4096, 3072, 2048, 1536, 1024, 768, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
ATTENTIONS = ("einsum", "xla", "cudnn")
DEFAULT_CASES = ("p1,p2,p2ref,p1+cudnn,p1+einsum,p1+xla,p1+fp32frozen,numerics,L-p1,inf,infref,"
                 "L-p2,L-p2ref,p1+remat,p2+remat,L-inf,L-infref,L-p1+cudnn")
MFU_TARGET, TRUNK_TARGET = 0.45, 1.2  # issue 15: phase-1 B/16 MFU; phase-2 trunk / release way

# (variant, image size, explicit ViT fields) per size; --quick swaps in tiny models.
SIZES = {"B": ("B/16", 224, None), "L": ("L/16", 224, None)}
QUICK_SIZES = {"B": ("tiny", 32, dict(patch_size=8, width=64, depth=4, mlp_dim=256, num_heads=2)),
               "L": ("tiny-L", 32, dict(patch_size=8, width=96, depth=6, mlp_dim=384,
                                        num_heads=3))}
STEPS = {  # key: (kind for the FLOP count, phase, train step?, name)
    "p1": ("phase1_train", shipped.PHASE1, True, "phase-1 train step"),
    "p2": ("phase2_train", shipped.SHARED_TRUNK, True, "phase-2 train step, shared trunk"),
    "p2ref": ("phase2_ref_train", shipped.RELEASE_WAY, True, "phase-2 train step, release way"),
    "inf": ("phase2_infer", shipped.SHARED_TRUNK, False, "phase-2 inference, shared trunk"),
    "infref": ("phase2_ref_infer", shipped.RELEASE_WAY, False, "phase-2 inference, release way"),
}
RELEASE_OF = {"p2ref": "p2", "infref": "inf"}  # runs at its shared-trunk partner's batch


# ----------------------------------------------------------------------------- FLOP count


@functools.lru_cache(maxsize=None)
def _dims(vit: ViT) -> dict:
    gh, gw = vit.grid
    ph, pw = vit.patch_size
    return dict(n=gh * gw, d=vit.width, m=vit.mlp_dim or 4 * vit.width, depth=vit.depth,
                patch_in=ph * pw * 3, prefix=vit.num_prefix_tokens)


# The model computes no outputs for prompt tokens (they give keys and values only) and, before
# class-token pooling, only the class token's row in the last block (`ViT.encode_features`);
# an lpt_jax without `encode_features` ran every block on tokens + prompts.
KEYS_ONLY_PROMPTS = hasattr(ViT, "encode_features")


def block_flops(q: int, s: int, r: int, d: int, m: int) -> float:
    """Forward matmul FLOPs of one pre-norm block (2 per multiply-add) with q query rows, s
    keys and r rows projected to keys and values: q and out projections 4 q d^2, k and v
    projections 4 r d^2, MLP 4 q d m, scores + weighted sum 4 q s d."""
    return 4.0 * q * d * d + 4.0 * r * d * d + 4.0 * q * d * m + 4.0 * q * s * d


def block_backward_flops(q: int, s: int, r: int, d: int, m: int) -> float:
    """Backward of a frozen block w.r.t. its inputs only (no weight gradients): every linear
    layer once more (dX = dY W^T), attention twice more (dP, dV, dQ, dK)."""
    return 4.0 * q * d * d + 4.0 * r * d * d + 4.0 * q * d * m + 8.0 * q * s * d


def _blocks(n: int, p: int, d: int, m: int, count: int, *, batched: bool, last: bool,
            backward: bool = False) -> float:
    """`count` blocks on n tokens with p prompt tokens (keys and values only; `batched`:
    projected per image, else once per call, not counted); `last`: the final block before
    class-token pooling, one query row."""
    if count <= 0:
        return 0.0
    f = block_backward_flops if backward else block_flops
    if not KEYS_ONLY_PROMPTS:  # prompts ran through the whole block as tokens
        return count * f(n + p, n + p, n + p, d, m)
    r = n + p if batched else n
    full = f(n, n + p, r, d, m)
    if last:
        return (count - 1) * full + f(1, n + p, r, d, m)
    return count * full


def lpt_step_flops(model: LPT, kind: str, batch: int) -> float:
    """Analytic matmul FLOPs of one step (elementwise ops, norms, softmax and loss ignored).

    kind: 'phase1_train' | 'phase2_train' | 'phase2_ref_train' (the dual pair: 2*batch images)
    or 'phase2_infer' | 'phase2_ref_infer' (batch images). Model FLOPs: remat's recomputation
    is not counted (MFU convention); only what the model computes (see KEYS_ONLY_PROMPTS).
    """
    v = _dims(model.backbone)
    d, m, depth, k, p = v["d"], v["m"], v["depth"], model.shared_depth, model.prompt_length
    n = v["prefix"] + v["n"]
    last = v["prefix"] == 1  # class-token pooling: the last block computes one row
    embed = 2.0 * v["n"] * v["patch_in"] * d
    head = 2.0 * d * model.num_classes
    shared = functools.partial(_blocks, n, p, d, m, batched=False)   # the shared prompt
    grouped = functools.partial(_blocks, n, 2 * p, d, m, batched=True)  # shared + group
    trunk = shared(k, last=False)
    query = shared(depth - k, last=last)
    main = grouped(depth - k, last=last) + head
    fwd_p1 = embed + shared(depth, last=last) + head
    fwd_p2 = embed + trunk + query + main
    fwd_p2_ref = embed + shared(depth, last=last) + trunk + main  # full query pass + main pass
    if kind == "phase1_train":  # backward through every block (prompts from block 0), head dW
        return 2 * batch * (fwd_p1 + shared(depth, last=last, backward=True) + 2 * head)
    if kind in ("phase2_train", "phase2_ref_train"):  # backward from block K on, main path
        bwd = grouped(depth - k, last=last, backward=True) + 2 * head
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


def first_line(err: BaseException, limit: int = 240) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:limit]}"


def device_limit_bytes(override_gib: float) -> Optional[float]:
    if override_gib:
        return override_gib * 2**30
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def device_peak_bytes() -> Optional[float]:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


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


def attention_field() -> bool:
    """Whether this lpt_jax's ViT has the `attention` field (config.model.vit.attention)."""
    return "attention" in {f.name for f in dataclasses.fields(ViT)}


def resolved_attention(name: str) -> str:
    """What `name` runs as on this backend (lpt_jax.backbones.vit.attention_implementation)."""
    try:
        from lpt_jax.backbones.vit import attention_implementation
    except ImportError:
        return name
    return attention_implementation(name)


def cast_floating(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def dtype_summary(tree) -> str:
    """'bfloat16 x150' or 'bfloat16 x148, float32 x2': the leaves' dtypes, by count."""
    counts: dict = {}
    for x in jax.tree.leaves(tree):
        counts[str(x.dtype)] = counts.get(str(x.dtype), 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def prepare_step_frozen_as(model: LPT, phase: Phase, config, params: dict, *, batch: int,
                           mesh, dtype, name: str) -> shipped.Prepared:
    """`shipped.prepare_step`, but the frozen tree `TrainStep.init` returns is cast to `dtype`
    before compiling (the step is the shipped one; only its argument differs)."""
    ts = shipped.train_step(model, phase, config, batch=batch)
    state, frozen = ts.init(params)
    frozen = cast_floating(frozen, dtype)
    state = jax.tree.map(jnp.array, state)  # copies: the state is donated
    state, frozen = jax.device_put((state, frozen), parallel.replicated(mesh))
    data = shipped.synthetic_batch(batch, config.model.vit.image_size, mesh)
    t0 = time.perf_counter()
    compiled = ts.jit(mesh).lower(state, frozen, data).compile()
    return shipped.Prepared(name, True, compiled, [state, frozen, data], 2 * batch,
                            time.perf_counter() - t0, shipped.footprint(compiled))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One case key, parsed: `[L-]<step>[+remat][+einsum|+xla|+cudnn][+fp32frozen]`."""
    key: str
    size: str                  # 'B' | 'L'
    step: str                  # a STEPS key or 'numerics'
    remat: bool = False
    attention: Optional[str] = None
    frozen: Optional[str] = None  # None: as TrainStep.init returns it; 'float32': cast back

    @classmethod
    def parse(cls, key: str) -> "Spec":
        key = key.strip()
        size, rest = ("L", key[2:]) if key.startswith("L-") else ("B", key)
        step, *mods = rest.split("+")
        if step not in STEPS and step != "numerics":
            raise ValueError(f"unknown case {key!r}: step must be one of "
                             f"{sorted(STEPS) + ['numerics']}")
        remat, attention, frozen = False, None, None
        for mod in mods:
            if mod == "remat":
                remat = True
            elif mod in ATTENTIONS:
                attention = mod
            elif mod == "fp32frozen":
                frozen = "float32"
            else:
                raise ValueError(f"unknown modifier {mod!r} in case {key!r}")
        if frozen and not STEPS.get(step, (0, 0, False))[2]:
            raise ValueError(f"{key!r}: +fp32frozen applies to train steps only")
        return cls(key, size, step, remat, attention, frozen)

    @property
    def base(self) -> Optional["Spec"]:
        """The spec whose batch this one reuses (None: search its own)."""
        if self.step in RELEASE_OF:
            return dataclasses.replace(self, step=RELEASE_OF[self.step], key="")
        if self.attention or self.frozen:
            return dataclasses.replace(self, attention=None, frozen=None, key="")
        return None

    def ident(self) -> tuple:
        return (self.size, self.step, self.remat, self.attention, self.frozen)


class Bench:
    """Models, params and configs per size; builds each case's compiled function."""

    def __init__(self, sizes: dict, mesh, log: Callable):
        self.sizes, self.mesh, self.log = sizes, mesh, log
        self._params: dict = {}
        self._models: dict = {}

    def config(self, size: str, batch: int, *, dtype: str = "bfloat16", remat: bool = False,
               attention: Optional[str] = None):
        variant, image_size, vit = self.sizes[size]
        c = shipped.bench_config(variant if vit is None else "", image_size=image_size,
                                 batch=batch, dtype=dtype, remat=remat, vit=vit)
        if attention is not None:
            if not attention_field():
                raise RuntimeError("this lpt_jax's ViT has no 'attention' field "
                                   "(config.model.vit.attention); row skipped")
            c.model.vit.attention = attention
        return c

    def model(self, size: str, *, dtype: str = "bfloat16", remat: bool = False,
              attention: Optional[str] = None) -> LPT:
        key = (size, dtype, remat, attention)
        if key not in self._models:
            cfg = self.config(size, 1, dtype=dtype, remat=remat, attention=attention)
            self._models[key] = lpt_from_config(cfg.model, NUM_CLASSES)
        return self._models[key]

    def params(self, size: str) -> dict:
        """float32 params (random backbone), on the device, replicated; the same for every
        case of a size."""
        if size not in self._params:
            _, p = shipped.build(self.config(size, 1, dtype="float32"))
            self._params[size] = jax.device_put(p, parallel.replicated(self.mesh))
        return self._params[size]

    def default_attention(self, size: str) -> str:
        """The default rows' attention: the ViT's field and what it resolves to here."""
        name = getattr(self.model(size).backbone, "attention", None)
        if name is None:
            return "n/a (no field)"
        resolved = resolved_attention(name)
        return name if resolved == name else f"{name} ({resolved})"


class Case:
    """One spec of the shipped code: compiles its function and arguments for a batch size."""

    def __init__(self, spec: Spec, bench: Bench):
        self.spec, self.bench = spec, bench
        self.kind, self.phase, self.train, step_name = STEPS[spec.step]
        variant = bench.sizes[spec.size][0]
        mods = "".join(f", {m}" for m in (
            "remat" if spec.remat else "", spec.attention and f"attention={spec.attention}",
            spec.frozen and "frozen tree float32") if m)
        self.name = f"{variant} {step_name}{mods}"
        self.model = bench.model(spec.size, remat=spec.remat, attention=spec.attention)
        self.params = bench.params(spec.size)
        self.image_size = bench.sizes[spec.size][1]
        self.attention = spec.attention or bench.default_attention(spec.size)

    def images_per_step(self, batch: int) -> int:
        return 2 * batch if self.train else batch

    def compile(self, batch: int) -> shipped.Prepared:
        s, b = self.spec, self.bench
        if self.train:
            cfg = b.config(s.size, batch, remat=s.remat, attention=s.attention)
            if s.frozen:
                return prepare_step_frozen_as(self.model, self.phase, cfg, self.params,
                                              batch=batch, mesh=b.mesh, dtype=s.frozen,
                                              name=self.name)
            return shipped.prepare_step(self.model, self.phase, cfg, self.params, batch=batch,
                                        mesh=b.mesh, name=self.name)
        return shipped.prepare_predict(self.model, self.phase, self.params,
                                       batch=batch, image_size=self.image_size, mesh=b.mesh,
                                       name=self.name)


def largest_fitting(case: Case, candidates, limit: Optional[float], probe: int,
                    margin: float, log: Callable, start_at: Optional[int] = None):
    """(batch, prepared) of the largest candidate that compiles within the memory limit and
    runs once; the probe's bytes per image skip candidates that cannot fit. With `start_at`
    (a base case's batch) no probe: that batch first, smaller ones if it does not fit."""
    candidates = [b for b in candidates if start_at is None or b <= start_at]
    if limit is not None and len(candidates) > 1 and start_at is None:
        prepared = case.compile(probe)
        fp = prepared.footprint
        fixed = tree_bytes(case.params)
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
            sheet_tflops: Optional[float], seconds: float, log: Callable) -> dict:
    secs, _ = prepared.run(1)  # second warm-up call
    calls = int(np.clip(seconds / max(secs, 1e-4), 3, 200))
    secs, cpu = prepared.run(calls)
    step_s = secs / calls
    fp = prepared.footprint
    flops = lpt_step_flops(case.model, case.kind, batch)
    model_tflops = flops / step_s / 1e12
    # train: the frozen tree the step received; inference: the backbone predict received
    frozen = prepared.args[1] if case.train else prepared.args[0]["backbone"]
    row = dict(case=case.name, key=case.spec.key, size=case.spec.size, kind=case.kind,
               remat=case.spec.remat, attention=case.attention,
               frozen=dtype_summary(frozen), frozen_gib=tree_bytes(frozen) / 2**30,
               batch=batch, images_per_step=case.images_per_step(batch), step_s=step_s,
               cpu_s_per_step=cpu / calls, images_per_s=case.images_per_step(batch) / step_s,
               calls=calls, analytic_tflop=flops / 1e12, xla_tflop=fp["xla_flops"] / 1e12,
               model_tflops=model_tflops, xla_tflops=fp["xla_flops"] / step_s / 1e12,
               mfu=model_tflops / peak_tflops if peak_tflops else float("nan"),
               mfu_sheet=model_tflops / sheet_tflops if sheet_tflops else float("nan"),
               peak_gib=fp.get("peak", float("nan")) / 2**30,
               temp_gib=fp.get("temp", float("nan")) / 2**30,
               args_gib=fp.get("args", float("nan")) / 2**30, finite=prepared.finite(),
               compile_s=prepared.compile_s)
    dev_peak = device_peak_bytes()
    row["device_peak_so_far_gib"] = dev_peak / 2**30 if dev_peak else float("nan")
    log(f"  {case.name} B={batch}: {step_s * 1e3:.1f} ms/step, {row['images_per_s']:.1f} img/s, "
        f"{model_tflops:.1f} model TFLOP/s (MFU {100 * row['mfu']:.1f} % measured, "
        f"{100 * row['mfu_sheet']:.1f} % sheet), XLA {row['xla_tflops']:.1f} TFLOP/s, "
        f"peak {row['peak_gib']:.2f} GiB, frozen {row['frozen']}, finite={row['finite']}")
    return row


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| (b the float32 reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def numerics(bench: Bench, size: str, batch: int, tolerance: float, log: Callable) -> dict:
    """The bf16 shipped step and inference vs the same in float32 (fp32 model, fp32 frozen
    tree, matmul precision 'highest': no TF32), same params and synthetic batch."""
    params, mesh = bench.params(size), bench.mesh
    out = dict(size=size, model=bench.sizes[size][0], batch=batch, tolerance=tolerance,
               attention=bench.default_attention(size))
    setups = {"bfloat16": (bench.model(size), bench.config(size, batch)),
              "float32": (bench.model(size, dtype="float32"),
                          bench.config(size, batch, dtype="float32"))}
    res: dict = {}
    for dtype, (model, cfg) in setups.items():
        with jax.default_matmul_precision("highest" if dtype == "float32" else None):
            step = shipped.prepare_step(model, shipped.PHASE1, cfg, params, batch=batch,
                                        mesh=mesh)
            step.call()
            res[dtype] = dict(loss=float(step.last["loss"]),
                              grad_norm=float(step.last["grad_norm"]),
                              frozen=dtype_summary(step.args[1]))
            step = None
            for name, phase in (("p1_logits", shipped.PHASE1),
                                ("p2_logits", shipped.SHARED_TRUNK)):
                pred = shipped.prepare_predict(model, phase, params, batch=batch,
                                               image_size=bench.sizes[size][1], mesh=mesh)
                pred.call()
                res[dtype][name] = np.asarray(pred.last[0], np.float32)
                pred = None
        gc.collect()
    lo, hi = res["bfloat16"], res["float32"]
    out.update(loss_bf16=lo["loss"], loss_fp32=hi["loss"],
               loss_rel=abs(lo["loss"] - hi["loss"]) / max(abs(hi["loss"]), 1e-30),
               grad_norm_rel=abs(lo["grad_norm"] - hi["grad_norm"]) / max(hi["grad_norm"],
                                                                            1e-30),
               frozen_bf16=lo["frozen"], frozen_fp32=hi["frozen"])
    for name in ("p1_logits", "p2_logits"):
        out[f"{name}_rel"] = rel_diff(lo[name], hi[name])
        out[f"{name}_argmax_agree"] = float(np.mean(np.argmax(lo[name], -1)
                                                    == np.argmax(hi[name], -1)))
    out["within_tolerance"] = all(out[k] <= tolerance for k in (
        "loss_rel", "p1_logits_rel", "p2_logits_rel"))
    log(f"  numerics {out['model']} B={batch}: loss {lo['loss']:.5f} (bf16) vs "
        f"{hi['loss']:.5f} (fp32), rel {out['loss_rel']:.2e}; grad norm rel "
        f"{out['grad_norm_rel']:.2e}; logits rel "
        f"p1 {out['p1_logits_rel']:.2e}, p2 {out['p2_logits_rel']:.2e} (argmax agree "
        f"{out['p1_logits_argmax_agree']:.2f} / {out['p2_logits_argmax_agree']:.2f}); "
        f"tolerance {tolerance:g}: {'ok' if out['within_tolerance'] else 'EXCEEDED'}")
    return out


def _jaxlib_version() -> str:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return ""


# ----------------------------------------------------------------------------- report


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def table(rows: list[dict]) -> str:
    lines = ["| case | attention | frozen tree | B | images/step | ms/step | images/s | ratio | "
             "analytic GFLOP/step | XLA GFLOP/step | model TFLOP/s | MFU (measured) | "
             "MFU (sheet) | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {_cell(r['case'])} | {r.get('attention', '')} | | - | - | - | - | "
                         f"- | - | - | - | - | - | - | skipped: {_cell(r['skipped'])} |")
            continue
        frozen = r["frozen"]
        if r.get("frozen_gib") is not None:
            frozen += f" ({r['frozen_gib'] * 1024:.1f} MiB)"
        ratio = []
        if "vs_reference" in r:
            ratio.append(f"{r['vs_reference']:.2f}x release way")
        if "vs_base" in r:
            ratio.append(f"{r['vs_base']:.2f}x default")
        lines.append(
            f"| {_cell(r['case'])} | {r['attention']} | {frozen} | {r['batch']} | "
            f"{r['images_per_step']} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{'; '.join(ratio)} | {1e3 * r['analytic_tflop']:.1f} | "
            f"{1e3 * r['xla_tflop']:.1f} | {r['model_tflops']:.2f} | {100 * r['mfu']:.1f} % | "
            f"{100 * r['mfu_sheet']:.1f} % | {r['peak_gib']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def numerics_table(results: list[dict]) -> str:
    if not results:
        return ""
    lines = ["| model | B | loss bf16 | loss fp32 | loss rel | grad-norm rel | phase-1 logits "
             "rel | phase-2 logits rel | argmax agree (p1 / p2) | tolerance | within |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in results:
        if "skipped" in n:
            lines.append(f"| {n.get('model', n['size'])} | {n['batch']} | "
                         f"skipped: {_cell(n['skipped'])} | | | | | | | | |")
            continue
        lines.append(
            f"| {n['model']} | {n['batch']} | {n['loss_bf16']:.5f} | {n['loss_fp32']:.5f} | "
            f"{n['loss_rel']:.2e} | {n['grad_norm_rel']:.2e} | {n['p1_logits_rel']:.2e} | "
            f"{n['p2_logits_rel']:.2e} | {n['p1_logits_argmax_agree']:.2f} / "
            f"{n['p2_logits_argmax_agree']:.2f} | {n['tolerance']:g} | "
            f"{'yes' if n['within_tolerance'] else 'NO'} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("key") == "p1" and "mfu" in r:
            out.append(f"phase-1 step {r['case'].split()[0]} MFU {100 * r['mfu']:.1f} % of the "
                       f"measured rate ({100 * r['mfu_sheet']:.1f} % of the data sheet); target "
                       f">= {100 * MFU_TARGET:.0f} %: "
                       f"{'met' if r['mfu'] >= MFU_TARGET else 'not met'} (measured rate)")
        if r.get("key") == "p2" and "vs_reference" in r:
            out.append(f"phase-2 shared trunk / release way ({r['case'].split()[0]}, "
                       f"B={r['batch']}): "
                       f"{r['vs_reference']:.2f}x; target >= {TRUNK_TARGET}x: "
                       f"{'met' if r['vs_reference'] >= TRUNK_TARGET else 'not met'}")
    return out


def report(info: dict, rows: list[dict], nums: list[dict]) -> str:
    mm, sheet = info.get("matmul_bf16_tflops", 0.0), info.get("datasheet_bf16_tflops")
    parts = [
        f"LPT on {info['device']}, bf16 activations (`model.vit.dtype='bfloat16'`), "
        f"{info['date']}; jax {info['jax']}, host {info['host']['cpu']} "
        f"({info['host']['cores']} cores). Timed: the shipped train step "
        "(`lpt_jax.steps.make_train_step`, `TrainStep.jit`) and `inference.make_predict_fn`.",
        f"MFU = analytic model FLOP/s / measured bf16 matmul rate {mm:.1f} TFLOP/s (n="
        f"{info.get('matmul_n')}), and / data-sheet peak {sheet} TFLOP/s. Train steps: dual "
        "pair, images/step = 2B. B = the largest batch that fits (searched) for base cases; "
        "variants run at their base case's batch. 'x release way': shared-trunk images/s / "
        "release-way images/s at the same B; 'x default': this row / the default-attention, "
        "frozen-as-shipped row at the same B. 'frozen tree': dtypes (and size) of the frozen "
        "leaves the step received; inference: of the backbone predict received. Default "
        f"attention: {info.get('default_attention')}.",
        "", table(rows), ""]
    if nums:
        parts += ["Numerics, bf16 step vs float32 step (fp32 model and frozen tree, matmul "
                  "precision 'highest'), same params and batch; rel = max|bf16 - fp32| / "
                  "max|fp32|:", "", numerics_table(nums), ""]
    parts += [f"- {t}" for t in targets(rows)]
    parts += ["", f"total {info.get('total_s', 0):.0f} s" + (
        " (cut short)" if info.get("interrupted") else "")]
    return "\n".join(parts)


def write(out: str, info: dict, rows: list[dict], nums: list[dict]) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = report(info, rows, nums)
    path.write_text(json.dumps(dict(info=info, rows=rows, numerics=nums, table=text), indent=1,
                               default=str))
    path.with_suffix(".md").write_text(f"# LPT on one GPU (H100/H200)\n\n{text}\n")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny ViTs at 32 px, small batches, a notional memory limit (smoke run)")
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help="subset (and order = priority) of the cases to run")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="no case starts unless its estimated cost fits before this many seconds "
                        "(whole script; default 400, --quick 3600)")
    p.add_argument("--seconds-per-case", type=float, default=0.0,
                   help="timed seconds per case (default 4, --quick 1)")
    p.add_argument("--mem-limit-gib", type=float, default=0.0,
                   help="memory limit for the batch search (0: the device's bytes_limit)")
    p.add_argument("--margin", type=float, default=0.9,
                   help="fraction of the limit the probe's prediction may use")
    p.add_argument("--train-batch", type=int, default=0,
                   help="train steps: start at this batch per stream, no probe (0: search)")
    p.add_argument("--infer-batch", type=int, default=0,
                   help="inference: start at this batch, no probe (0: search)")
    p.add_argument("--numerics-batch", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=2e-2,
                   help="max relative difference bf16 vs fp32 (loss, logits)")
    default_out = os.path.join(os.environ["OUT"], "gpu_h100.json") if os.environ.get("OUT") \
        else ""
    p.add_argument("--out", default=default_out,
                   help="write the rows and machine info as JSON here, and a markdown table "
                        "beside it (.md); default $OUT/gpu_h100.json when OUT is set")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    specs = [Spec.parse(k) for k in args.cases.split(",") if k.strip()]

    dev = jax.devices()[0]
    if args.quick:
        sizes = QUICK_SIZES
        matmul_sizes, train_batches, infer_batches, probe = (256, 512), (64, 32, 16, 8), \
            (128, 64, 32), 4
        limit_gib = args.mem_limit_gib or 0.03  # small, so that the search has to step down
        budget = args.budget_s or 3600.0
        seconds = args.seconds_per_case or 1.0
        numerics_batch = min(args.numerics_batch, 4)
    else:
        sizes = SIZES
        matmul_sizes, train_batches, infer_batches, probe = (4096, 8192, 16384), \
            TRAIN_BATCHES, INFER_BATCHES, 16
        limit_gib = args.mem_limit_gib
        budget = args.budget_s or 400.0
        seconds = args.seconds_per_case or 4.0
        numerics_batch = args.numerics_batch
    info = dict(device=f"{dev.platform}: {dev.device_kind}", devices=jax.device_count(),
                jax=jax.__version__, jaxlib=_jaxlib_version(),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"),
                models={k: f"ViT-{v[0]} {v[2] or ''} at {v[1]} px" for k, v in sizes.items()},
                step="lpt_jax.steps.make_train_step (shipped), TrainStep.jit(mesh); "
                     "inference lpt_jax.inference.make_predict_fn",
                cases=[s.key for s in specs], budget_s=budget,
                attention_field=attention_field(), host=host.describe(),
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    limit = device_limit_bytes(limit_gib)
    info["memory_limit_gib"] = limit / 2**30 if limit else None
    log(json.dumps(info))
    if not info["attention_field"]:
        log("NOTE: lpt_jax.backbones.vit.ViT has no 'attention' field: the +einsum/+xla/+cudnn "
            "rows are skipped")

    log("1. bf16 matmul rate")
    mm = matmul_tflops(matmul_sizes)
    sheet = next((v for k, v in sorted(DATASHEET_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                  if k in dev.device_kind), None)
    info.update(matmul_bf16_tflops=mm["tflops"], matmul_n=mm["n"], datasheet_bf16_tflops=sheet)
    log(f"  measured {mm['tflops']:.1f} TFLOP/s (n={mm['n']}); data sheet: {sheet}")

    bench = Bench(sizes, shipped.make_mesh(), log)
    info["default_attention"] = bench.default_attention("B")
    rows: list[dict] = []
    nums: list[dict] = []
    done: dict = {}          # Spec.ident() -> row of a measured case
    cost: dict = {}          # (size, 'search' | 'fixed' | 'numerics') -> seconds last taken
    guess = {"search": 75.0, "fixed": 35.0, "numerics": 60.0}  # before any case of its kind ran

    def estimate(size: str, what: str) -> float:
        if (size, what) in cost:
            return cost[(size, what)]
        other = "B" if size == "L" else "L"
        if (other, what) in cost:  # ViT-L ~3x ViT-B in compile and run time, and back
            return cost[(other, what)] * (3.0 if size == "L" else 1 / 3.0)
        return guess[what] * (3.0 if size == "L" and not args.quick else 1.0)

    log("2-3. batch search and timing")
    try:
        for spec in specs:
            elapsed = time.perf_counter() - t_start
            base = spec.base
            base_row = done.get(base.ident()) if base else None
            label = spec.key
            default = bench.default_attention(spec.size)
            if spec.attention and base_row and default.endswith(f"({spec.attention})"):
                log(f"  {label}: the default row's program ({default}): not run again")
                rows.append(dict(case=label, key=spec.key, remat=spec.remat,
                                 attention=spec.attention,
                                 skipped=f"same program as the default row ({default})"))
                continue
            given = spec.step in STEPS and (args.train_batch if STEPS[spec.step][2]
                                            else args.infer_batch)
            what = "numerics" if spec.step == "numerics" else (
                "fixed" if base_row or given else "search")
            est = estimate(spec.size, what)
            if elapsed + est > budget:
                msg = f"time budget ({elapsed:.0f} s spent, ~{est:.0f} s needed, {budget:.0f} s)"
                log(f"  {label}: skipped, {msg}")
                if spec.step == "numerics":
                    nums.append(dict(size=spec.size, model=sizes[spec.size][0],
                                     batch=numerics_batch, skipped=msg))
                else:
                    rows.append(dict(case=label, key=spec.key, remat=spec.remat,
                                     attention=spec.attention or "", skipped=msg))
                continue
            log(f"  {label}, {elapsed:.0f} s spent (estimate {est:.0f} s)")
            t_case = time.perf_counter()
            if spec.step == "numerics":
                try:
                    nums.append(numerics(bench, spec.size, numerics_batch, args.tolerance, log))
                except Exception as err:  # noqa: BLE001 - report and go on
                    log(f"  numerics: FAILED {first_line(err, 500)}")
                    nums.append(dict(size=spec.size, model=sizes[spec.size][0],
                                     batch=numerics_batch, skipped=first_line(err)))
                cost[(spec.size, what)] = time.perf_counter() - t_case
                gc.collect()
                write(args.out, info, rows, nums)
                continue
            prepared, name = None, label
            try:
                if spec.attention and not attention_field():
                    raise RuntimeError("lpt_jax.backbones.vit.ViT has no 'attention' field yet")
                c = Case(spec, bench)
                name = c.name
                batches = train_batches if c.train else infer_batches
                start_at = base_row["batch"] if base_row else (
                    (args.train_batch if c.train else args.infer_batch) or None)
                if start_at and start_at not in batches:
                    batches = tuple(sorted({start_at, *batches}, reverse=True))
                batch, prepared = largest_fitting(c, batches, limit, probe, args.margin, log,
                                                  start_at)
                if batch is None:
                    rows.append(dict(case=name, key=spec.key, remat=spec.remat,
                                     attention=c.attention, skipped="no batch fits"))
                    continue
                row = measure(c, batch, prepared, mm["tflops"], sheet, seconds, log)
                row["batch_from"] = "base case" if base_row else (
                    "given" if start_at else "search")
            except Exception as err:  # noqa: BLE001 - report as a row, go on to the next case
                log(f"  {name}: FAILED {first_line(err, 500)}")
                rows.append(dict(case=name, key=spec.key, remat=spec.remat,
                                 attention=spec.attention or "", skipped=first_line(err)))
                continue
            finally:
                prepared = None
                gc.collect()
                cost[(spec.size, what)] = time.perf_counter() - t_case
                write(args.out, info, rows, nums)
            if base_row and base_row["batch"] == batch:
                if spec.step in RELEASE_OF:
                    base_row["vs_reference"] = base_row["images_per_s"] / row["images_per_s"]
                else:
                    row["vs_base"] = row["images_per_s"] / base_row["images_per_s"]
            done[spec.ident()] = row
            rows.append(row)
            write(args.out, info, rows, nums)
    except KeyboardInterrupt:  # the device script's timeout: keep what was measured
        info["interrupted"] = True
        log("interrupted: writing what was measured")

    info["total_s"] = time.perf_counter() - t_start
    text = report(info, rows, nums)
    print("\n" + text, flush=True)
    write(args.out, info, rows, nums)
    if args.out:
        log(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
