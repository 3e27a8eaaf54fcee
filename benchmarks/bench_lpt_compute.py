"""Compute of LPT's forward / train steps: the shared trunk and trainable-only gradients.

    .venv/bin/python benchmarks/bench_lpt_compute.py [--sizes tiny,B/16] [--batch 8] [--repeats 3]

For each ViT size (224 px, random weights, 365 classes, spec constants: P=10, M=20, K=L/2,
top-2) it compiles every variant once (`jax.jit(f).lower(...).compile()`: FLOPs from
`cost_analysis()`, temp bytes from `memory_analysis()`) and times the compiled functions on the
same inputs (median of at least --repeats calls after --warmup, `block_until_ready`; the
variants of one comparison are called in turn, so that load changes hit them alike).
Comparisons:

  phase-2 inference   `LPT.phase2` (exact shared trunk, 2L-K blocks) vs `LPT.phase2_reference`
                      (the release's query pass + main pass, 2L blocks; an optimization
                      barrier keeps XLA from merging the passes' identical blocks 0..K-1), and
                      the same reference with that merge allowed (`distinct_passes=False`);
                      B images.
  phase-2 train step  value_and_grad of the trainable subtree (pool, keys, head) + SGD update,
                      with the same three forward computations. The reference differentiates
                      the same trainable subtree: that is what the PyTorch release does
                      (backbone requires_grad=False), so all backprop from block K only and
                      the difference is the recomputed trunk. --phase2-all-grads adds a row
                      that differentiates all parameters (global norm over all of them).
  phase-1 train step  value_and_grad of the trainable subtree (shared prompt, head) vs of all
                      parameters, the frozen ones masked after the fact; each variant computes
                      the global gradient norm of the gradients it made (as clipping or logging
                      would: without a reader XLA would delete the unused backbone gradients).

Train steps follow LPT_SPEC §3-5 on the dual pair (class-balanced + instance-balanced batch of
B images each, 2B images per step): loss A-GCL_cb - 0.5 S_cb + eta (A-GCL_ib - 0.5 S_ib)
from `lpt_jax.losses` (falls back to a softmax CE of 20 * cosine when that module is absent),
head dropout 0.1, SGD momentum 0.9 with coupled weight decay 0.01, as
benchmarks/bench_torch_reference.py does in PyTorch.

Writes benchmarks/results/lpt_compute.md and .json (--out to change). Never touches the
network. Timings on shared machines vary: compare rows of one run, as ratios.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lpt_jax import tree  # noqa: E402
from lpt_jax.models.lpt import LPT, TRAINABLE  # noqa: E402
from lpt_jax.models.vit import ViT, decode_variant  # noqa: E402

try:
    from lpt_jax import losses
except ImportError:  # keep the benchmark runnable without the losses module
    losses = None

ALIASES = {"tiny": "Ti/16"}
REFERENCE = "two full passes (release)"
XLA_MERGED = "two full passes, XLA may merge the trunk"
TRUNK = "shared trunk (LPT.phase2)"
NUM_CLASSES = 365  # Places-LT
RESULTS = Path(__file__).resolve().parent / "results" / "lpt_compute.md"
EXPECTED = {"phase-2 inference": 1.25, "phase-2 train step": 1.15}


# ----------------------------------------------------------------------------- setup


def build_model(variant: str, image_size: int) -> LPT:
    vit = ViT(image_size=(image_size, image_size), layernorm_epsilon=1e-5,
              **decode_variant(variant))
    return LPT(backbone=vit, num_classes=NUM_CLASSES, shared_depth=vit.depth // 2)


def random_params(model: LPT, image_size: int, seed: int = 0) -> dict:
    """Every parameter drawn in NumPy from the eval_shape tree (no init compile at B/16)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # LayerNorm scales
            return np.ones(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(np.float32)

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes)["params"])


def places_like_counts(num_classes: int, n_max: int = 4980, n_min: int = 5) -> np.ndarray:
    """Exponentially decaying class counts from n_max to n_min (Places-LT's extremes)."""
    c = np.arange(num_classes) / (num_classes - 1)
    return np.round(n_max * (n_min / n_max) ** c).astype(np.int64)


def branch_losses() -> tuple[Callable, Callable, str]:
    """(class-balanced loss, instance-balanced loss, description), each f(logits, labels, rng)."""
    if losses is not None:
        counts = places_like_counts(NUM_CLASSES)
        gammas = losses.agcl_branch_defaults()
        return (losses.make_branch_loss("agcl", counts, **gammas["cb"]),
                losses.make_branch_loss("agcl", counts, **gammas["ib"]),
                "A-GCL (lpt_jax.losses, s=20, m=0.1, eps=0.1; cb gammas 0/4, ib 0.5/8)")

    def xent(logits, labels, rng):
        del rng
        logp = jax.nn.log_softmax(20.0 * logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    return xent, xent, "softmax CE of 20 * cosine (lpt_jax.losses absent)"


def optimizer() -> optax.GradientTransformation:
    # Coupled L2 (decay added to the gradient before momentum), spec §5; lr of B=8.
    return optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.02 * 8 / 256, momentum=0.9))


# ----------------------------------------------------------------------------- step functions


def forward_fn(model: LPT, method, **kw) -> Callable:
    """(params, images, rng) -> (logits, match) in training mode."""
    def forward(params, images, rng):
        out = model.apply({"params": params}, images, train=True, method=method,
                          rngs={"dropout": rng}, **kw)
        if isinstance(out, dict):
            return out["logits"], out["match"]
        return out, jnp.zeros((), jnp.float32)  # phase 1: no pool, S = 0
    return forward


def global_norm(tree_):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree_)))


def train_step_fn(forward: Callable, patterns, loss_cb, loss_ib, opt, all_params: bool):
    """One SGD step on the dual pair; gradients of the trainable subtree or of all params."""
    def objective(params, batch, rng):
        r = jax.random.split(rng, 4)
        z_cb, s_cb = forward(params, batch["cb_images"], r[0])
        z_ib, s_ib = forward(params, batch["ib_images"], r[1])
        l_cb = loss_cb(z_cb, batch["cb_labels"], r[2])
        l_ib = loss_ib(z_ib, batch["ib_labels"], r[3])
        return l_cb - 0.5 * s_cb + 0.5 * (l_ib - 0.5 * s_ib)  # eta of epoch 0 is 0.5

    def step(trainable, frozen, opt_state, batch, rng):
        if all_params:  # the whole tree, frozen leaves dropped after the fact
            loss, grads = jax.value_and_grad(objective)(tree.merge(trainable, frozen), batch, rng)
            grad_norm = global_norm(grads)
            grads, _ = tree.split(grads, patterns)
        else:
            loss, grads = jax.value_and_grad(
                lambda t: objective(tree.merge(t, frozen), batch, rng))(trainable)
            grad_norm = global_norm(grads)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grad_norm
    return step


def inference_fn(model: LPT, method, **kw) -> Callable:
    def infer(trainable, frozen, images):
        out = model.apply({"params": tree.merge(trainable, frozen)}, images, method=method, **kw)
        return out["logits"]
    return infer


# ----------------------------------------------------------------------------- measuring


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _temp_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    return float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem else float("nan")


def compile_variant(fn: Callable, args: tuple) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return dict(compiled=compiled, args=args, compile_s=time.perf_counter() - t0,
                gflops=_flops(compiled) / 1e9, temp_mib=_temp_bytes(compiled) / 2**20)


def time_interleaved(variants: list[dict], warmup: int, repeats: int, min_seconds: float):
    """Times the compiled variants round-robin, so that a change of background load hits all
    of them alike; at least `repeats` rounds and (for fast programs) `min_seconds` in all."""
    for v in variants:
        for _ in range(warmup):
            jax.block_until_ready(v["compiled"](*v["args"]))
        v["times"] = []
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 200):
        for v in variants:
            t0 = time.perf_counter()
            jax.block_until_ready(v["compiled"](*v["args"]))
            v["times"].append(time.perf_counter() - t0)
        rounds += 1
    for v in variants:
        v["seconds"] = statistics.median(v["times"])
        v["images_per_s"] = v["images"] / v["seconds"]


def bench_size(variant: str, image_size: int, batch: int, warmup: int, repeats: int,
               min_seconds: float, phase2_all_grads: bool, log: Callable) -> list[dict]:
    model = build_model(variant, image_size)
    params = random_params(model, image_size)
    loss_cb, loss_ib, _ = branch_losses()
    opt = optimizer()
    keys = jax.random.split(jax.random.key(1), 5)
    shape = (batch, image_size, image_size, 3)
    batch_data = dict(
        cb_images=jax.random.uniform(keys[0], shape, minval=-1, maxval=1),
        ib_images=jax.random.uniform(keys[1], shape, minval=-1, maxval=1),
        cb_labels=jax.random.randint(keys[2], (batch,), 0, NUM_CLASSES),
        ib_labels=jax.random.randint(keys[3], (batch,), 0, NUM_CLASSES))
    rng = keys[4]
    rows = []

    def compare(comparison: str, cases: list[tuple], images: int):
        """cases: (variant name, fn, args); the first is the baseline."""
        measured = []
        for k, (name, fn, args) in enumerate(cases):
            log(f"  {variant} | {comparison} | {name}: compiling ...")
            v = compile_variant(fn, args)
            v.update(size=variant, comparison=comparison, variant=name, baseline=k == 0,
                     images=images)
            log(f"    {v['gflops']:.1f} GFLOP  temp {v['temp_mib']:.0f} MiB  "
                f"compile {v['compile_s']:.1f} s")
            measured.append(v)
        time_interleaved(measured, warmup, repeats, min_seconds)
        for v in measured:
            del v["compiled"], v["args"]
            log(f"  {variant} | {comparison} | {v['variant']}: {v['seconds']:.3f} s "
                f"({len(v['times'])} calls), {v['images_per_s']:.2f} img/s")
        rows.extend(measured)

    # Phase-2 inference.
    p2_trainable, p2_frozen = tree.split(params, TRAINABLE[2])
    images = batch_data["ib_images"]
    reference = functools.partial(LPT.phase2_reference, distinct_passes=True)
    merged = functools.partial(LPT.phase2_reference, distinct_passes=False)
    p2_args = (p2_trainable, p2_frozen, images)
    compare("phase-2 inference",
            [(name, inference_fn(model, method), p2_args)
             for name, method in ((REFERENCE, reference), (XLA_MERGED, merged),
                                  (TRUNK, LPT.phase2))], batch)

    # Phase-2 train step: gradients of the trainable subtree (pool, keys, head).
    cases = [(REFERENCE, reference, False), (XLA_MERGED, merged, False),
             (TRUNK, LPT.phase2, False)]
    if phase2_all_grads:
        cases.append((REFERENCE + ", grads of all params", reference, True))
    p2_args = (p2_trainable, p2_frozen, opt.init(p2_trainable), batch_data, rng)
    compare("phase-2 train step",
            [(name, train_step_fn(forward_fn(model, method), TRAINABLE[2], loss_cb, loss_ib,
                                  opt, all_params), p2_args)
             for name, method, all_params in cases], 2 * batch)

    # Phase-1 train step.
    p1_trainable, p1_frozen = tree.split(params, TRAINABLE[1])
    p1_args = (p1_trainable, p1_frozen, opt.init(p1_trainable), batch_data, rng)
    compare("phase-1 train step",
            [(name, train_step_fn(forward_fn(model, LPT.phase1), TRAINABLE[1], loss_cb,
                                  loss_ib, opt, all_params), p1_args)
             for name, all_params in (("grads of all params, masked after", True),
                                      ("grads of trainable subtree only", False))], 2 * batch)
    return rows


# ----------------------------------------------------------------------------- report


def with_ratios(rows: list[dict]) -> list[dict]:
    """speedup = baseline seconds / seconds; flop_ratio = baseline FLOPs / FLOPs."""
    base = {(r["size"], r["comparison"]): r for r in rows if r["baseline"]}
    for r in rows:
        b = base[(r["size"], r["comparison"])]
        r["speedup"] = b["seconds"] / r["seconds"]
        r["flop_ratio"] = b["gflops"] / r["gflops"]
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = jax.devices()[0]
    import flax
    return dict(cpu=cpu_model(), cores=cores, device=f"{dev.platform}: {dev.device_kind}",
                jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(),
                matmul_precision=str(jax.config.jax_default_matmul_precision or "default"))


def table(rows: list[dict]) -> str:
    lines = ["| size | comparison | variant | median s | img/s | speedup | GFLOP | FLOP ratio "
             "| temp MiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "baseline" if r["baseline"] else f"{r['speedup']:.2f}x"
        flop_ratio = "" if r["baseline"] else f"{r['flop_ratio']:.2f}x"
        lines.append(
            f"| {r['size']} | {r['comparison']} | {r['variant']} | {r['seconds']:.3f} | "
            f"{r['images_per_s']:.2f} | {speedup} | {r['gflops']:.1f} | {flop_ratio} | "
            f"{r['temp_mib']:.0f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        want = EXPECTED.get(r["comparison"])
        if want and r["variant"] == TRUNK:
            ok = "meets" if r["speedup"] >= want else "BELOW"
            out.append(f"- {r['size']} {r['comparison']}: {r['speedup']:.2f}x time, "
                       f"{r['flop_ratio']:.2f}x FLOPs ({ok} the expected >= {want}x)")
    return out


def report(rows: list[dict], info: dict, args, loss_desc: str, load: tuple) -> str:
    return "\n".join([
        "# LPT compute: shared trunk and trainable-only gradients",
        "",
        f"Measured {info['date']} by `benchmarks/bench_lpt_compute.py --sizes {args.sizes} "
        f"--batch {args.batch} --repeats {args.repeats} --warmup {args.warmup} "
        f"--min-seconds {args.min_seconds}"
        f"{' --phase2-all-grads' if args.phase2_all_grads else ''}` on {info['cpu']}, "
        f"{info['cores']} cores available, device {info['device']}; jax {info['jax']}, "
        f"flax {info['flax']}, Python {info['python']}, fp32, matmul precision "
        f"{info['matmul_precision']}.",
        "",
        f"ViTs at {args.image_size} px with random weights (LayerNorm eps 1e-5, exact GELU), "
        f"{NUM_CLASSES} classes, P=10, M=20, K=L/2, top-2. Inference: B={args.batch} images. "
        f"Train steps: the dual pair (2B={2 * args.batch} images: class-balanced + "
        f"instance-balanced batch), loss {loss_desc}, minus 0.5 S per branch, eta 0.5, head "
        "dropout 0.1, SGD momentum 0.9 + coupled weight decay 0.01, global grad norm of the "
        "gradients computed. Median of the timed calls of one compiled function "
        "(`jax.jit(f).lower(...).compile()`), after warm-up, the variants of a comparison called "
        "in turn (round-robin) so that load changes hit them alike; GFLOP from `cost_analysis()`, "
        "temp MiB from `memory_analysis()`. speedup = baseline time / time; FLOP ratio = "
        "baseline FLOPs / FLOPs.",
        "",
        table(rows),
        "",
        "Expected (issue 3): phase-2 inference >= 1.25x (18 vs 24 blocks), phase-2 train step "
        ">= 1.15x.",
        *verdicts(rows),
        "",
        "Baselines: phase-2 'two full passes (release)' is `LPT.phase2_reference` (the release's "
        "query pass + main pass, an optimization barrier keeping the passes distinct), "
        "differentiated w.r.t. the same trainable subtree, as the PyTorch release does "
        "(backbone requires_grad=False): all phase-2 variants backprop from block K only, the "
        "trunk's forward is what differs. 'XLA may merge the trunk' is the same program without "
        "the barrier: XLA's common-subexpression elimination can then compute the identical "
        "blocks 0..K-1 of both passes once (compare its GFLOP with the shared trunk's). "
        "Phase-1 'grads of all params' differentiates the "
        "whole tree and drops the frozen gradients after their global norm is taken (as a clip "
        "or log over all leaves would; without any reader XLA deletes them).",
        "",
        f"1-minute load average before / after the run: {load[0]:.1f} / {load[1]:.1f} "
        "(other jobs share these cores). Timings on shared machines vary by up to 2x between "
        "runs; compare rows of one run.",
        "",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,B/16",
                        help="comma-separated ViT variants ('tiny' = Ti/16), e.g. tiny,B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="keep timing fast programs until this much time has passed")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--phase2-all-grads", action="store_true",
                        help="add a phase-2 row differentiating all parameters")
    parser.add_argument("--out", default=str(RESULTS), help="markdown path ('' = no file); "
                        "a .json with the raw numbers is written beside it")
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    info = machine()
    loss_desc = branch_losses()[2]
    log(f"{info}\nloss: {loss_desc}")
    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes.split(","):
        variant = ALIASES.get(size.strip(), size.strip())
        rows += bench_size(variant, args.image_size, args.batch, args.warmup, args.repeats,
                           args.min_seconds, args.phase2_all_grads, log)
    rows = with_ratios(rows)
    text = report(rows, info, args, loss_desc, (load_before, os.getloadavg()[0]))
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(
            dict(machine=info, args=vars(args), loss=loss_desc, rows=rows), indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
