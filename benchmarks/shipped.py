"""The shipped train step and predict function, set up for benchmarks (no data, no checkpoint).

Every benchmark that times a train step or an inference builds it here, from the library:
the step is `lpt_jax.steps.make_train_step(...)` jitted with `TrainStep.jit(mesh)` (what
`lpt_jax.trainer.run_phase` runs), the inference is `lpt_jax.inference.make_predict_fn` (what
evaluation and prediction run). Variants are *phases*, not code: the release's two-pass
phase 2 is `PHASES[2]` with `forward_method=LPT.phase2_reference`, the "all gradients"
phase 1 is `PHASES[1]` training every parameter (`trainable=('.*',)`, set in the config too,
since the step reads the patterns from `config.phase1.trainable`). Nothing here computes a
loss, a gradient or an update itself.

    config = bench_config("B/16", batch=8)
    model, params = build(config)
    prepared = prepare_step(model, PHASES[2], config, params, batch=8)
    seconds = prepared.call()          # one step, state threaded through (donated)

Imports only jax, flax, optax, numpy, ml_collections and absl (through lpt_jax), so the GPU
script runs in a bare JAX environment.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import base_config
from lpt_jax import parallel
from lpt_jax.method import steps
from lpt_jax.method.lpt_model import LPT, lpt_from_config
from lpt_jax.method.phases import PHASES, Phase
from lpt_jax.run import context, inference

NUM_CLASSES = 365        # Places-LT
STEPS_PER_EPOCH = 1000   # the schedule's clock only: every timed step is in epoch 0

# The variants, as phases of the shipped step.
SHARED_TRUNK = PHASES[2]                                    # LPT.phase2: 2L-K blocks
RELEASE_WAY = dataclasses.replace(PHASES[2], forward_method=LPT.phase2_reference)  # 2L blocks
XLA_MERGED = dataclasses.replace(  # the release way without the barrier: XLA may share blocks
    PHASES[2], forward_method=functools.partial(LPT.phase2_reference, distinct_passes=False))
PHASE1 = PHASES[1]
ALL_PARAMS = (".*",)
PHASE1_ALL_GRADS = dataclasses.replace(PHASES[1], trainable=ALL_PARAMS)


def bench_config(variant: str = "B/16", *, image_size: int = 224, batch: int = 8,
                 dtype: str = "float32", remat: bool = False, vit: Optional[dict] = None,
                 shared_depth: Optional[int] = None):
    """configs.common.base_config() with the ViT and the batch of the benchmark.

    `vit`: explicit ViT fields (width, depth, mlp_dim, num_heads, patch_size) instead of
    `variant`; K (shared_depth) defaults to depth // 2, the spec's value (6 for B/16).
    """
    c = base_config()
    c.model.vit.image_size = image_size
    c.model.vit.dtype = dtype
    c.model.vit.remat = remat
    if vit:
        c.model.vit.variant = ""
        for k, v in vit.items():
            c.model.vit[k] = v
    else:
        c.model.vit.variant = variant
    depth = lpt_from_config(c.model, NUM_CLASSES).backbone.depth
    c.model.lpt.shared_depth = depth // 2 if shared_depth is None else shared_depth
    c.data.image_size = image_size
    for phase in ("phase1", "phase2"):
        c[phase].batch_size = batch
    c.eval.batch_size = batch
    return c


def config_for(phase: Phase, config):
    """The config under which `steps.make_train_step` trains what `phase` says: a phase whose
    `trainable` differs from its config section's (the all-gradients baseline) gets it there."""
    if tuple(phase.trainable) == tuple(PHASES[phase.number].trainable):
        return config
    c = config.copy_and_resolve_references()
    c[phase.name].trainable = tuple(phase.trainable)
    return c


def build(config, seed: int = 0) -> tuple[LPT, dict]:
    """(model, params): `context.init_params` (prompts, pool, keys, head as the trainer makes
    them), the backbone materialised with random values of its shapes (drawn in NumPy: no
    init compile). Host arrays, as the trainer's params are before `device_put`."""
    model = lpt_from_config(config.model, NUM_CLASSES)
    params = context.init_params(model, config)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # LayerNorm scales
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)

    params["backbone"] = jax.tree_util.tree_map_with_path(draw, params["backbone"])
    return model, jax.tree.map(np.asarray, params)


def with_remat(config, remat: bool = True):
    c = config.copy_and_resolve_references()
    c.model.vit.remat = remat
    return c


def places_like_counts(num_classes: int = NUM_CLASSES, n_max: int = 4980,
                       n_min: int = 5) -> np.ndarray:
    """Exponentially decaying class counts from n_max to n_min (Places-LT's extremes)."""
    c = np.arange(num_classes) / (num_classes - 1)
    return np.round(n_max * (n_min / n_max) ** c).astype(np.int64)


def make_mesh():
    return parallel.make_mesh(jax.devices()[:1])


def synthetic_batch(batch: int, image_size: int, mesh, seed: int = 1) -> dict:
    """The trainer's batch layout ({'cb': {image, label}, 'ib': {...}}: images in [-1, 1],
    int32 labels) with the trainer's sharding (`parallel.batch_sharding`, what
    `parallel.global_batch` makes); drawn on the device, so large batches cost no transfer."""
    shape = (batch, image_size, image_size, 3)

    def make(key):
        k = jax.random.split(key, 4)
        return {b: {"image": jax.random.uniform(k[2 * i], shape, jnp.float32, -1, 1),
                    "label": jax.random.randint(k[2 * i + 1], (batch,), 0, NUM_CLASSES,
                                                jnp.int32)}
                for i, b in enumerate(("cb", "ib"))}
    return jax.jit(make, out_shardings=parallel.batch_sharding(mesh))(jax.random.key(seed))


def train_step(model: LPT, phase: Phase, config, *, batch: int) -> steps.TrainStep:
    """The shipped step of `phase` (config adjusted by `config_for`)."""
    return steps.make_train_step(model, phase, config_for(phase, config),
                                 class_counts=places_like_counts(model.num_classes),
                                 steps_per_epoch=STEPS_PER_EPOCH, batch_size=batch)


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def footprint(compiled) -> dict:
    """Bytes the compiled program needs at once: arguments + outputs + temporaries, minus
    donated (aliased) buffers; and XLA's FLOP count."""
    mem = compiled.memory_analysis()
    out = {}
    if mem is not None:
        get = lambda n: float(getattr(mem, n, 0) or 0)  # noqa: E731
        out = dict(temp=get("temp_size_in_bytes"), args=get("argument_size_in_bytes"),
                   outputs=get("output_size_in_bytes"), alias=get("alias_size_in_bytes"))
        out["peak"] = out["temp"] + out["args"] + out["outputs"] - out["alias"]
    out["xla_flops"] = flops(compiled)
    return out


@dataclasses.dataclass
class Prepared:
    """A compiled shipped function with its arguments; `call()` runs it once and threads the
    train state through (it is donated, as in the trainer)."""
    name: str
    train: bool
    compiled: Callable
    args: list
    images: int                 # images per call (train: both batches of the dual pair)
    compile_s: float
    footprint: dict
    last: object = None

    def call(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one call, until its outputs exist."""
        w, c = time.perf_counter(), time.process_time()
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        w, c = time.perf_counter() - w, time.process_time() - c
        if self.train:
            self.args[0], self.last = out  # (state, metrics)
        else:
            self.last = out
        return w, c

    def run(self, calls: int) -> tuple[float, float]:
        """(wall, CPU seconds) of `calls` calls dispatched back to back (the train state
        threaded through) and waited for once at the end, as a training loop runs."""
        w, c = time.perf_counter(), time.process_time()
        out = None
        for _ in range(calls):
            out = self.compiled(*self.args)
            if self.train:
                self.args[0] = out[0]
        jax.block_until_ready(out)
        self.last = out[1] if self.train else out
        return time.perf_counter() - w, time.process_time() - c

    def finite(self) -> bool:
        if self.last is None:
            return False
        value = self.last["loss"] if self.train else self.last[0]
        return bool(np.all(np.isfinite(np.asarray(value, np.float32))))

    def with_batch(self, batch: dict) -> None:
        self.args[2] = batch


def prepare_step(model: LPT, phase: Phase, config, params: dict, *, batch: int, mesh,
                 data: Optional[dict] = None, name: str = "") -> Prepared:
    """The shipped step of `phase`, compiled by `TrainStep.jit(mesh)` for the state, frozen
    tree and batch the trainer would pass (fresh state: donating it leaves `params` intact)."""
    ts = train_step(model, phase, config, batch=batch)
    state, frozen = ts.init(params)
    state = jax.tree.map(jnp.array, state)  # copies: the state is donated
    state, frozen = jax.device_put((state, frozen), parallel.replicated(mesh))
    if data is None:
        data = synthetic_batch(batch, config.model.vit.image_size, mesh)
    t0 = time.perf_counter()
    compiled = ts.jit(mesh).lower(state, frozen, data).compile()
    return Prepared(name or phase.name, True, compiled, [state, frozen, data], 2 * batch,
                    time.perf_counter() - t0, footprint(compiled))


def prepare_predict(model: LPT, phase: Phase, params: dict, *, batch: int, image_size: int,
                    mesh, name: str = "") -> Prepared:
    """`inference.make_predict_fn(model, phase, mesh)`, compiled for B images."""
    predict = inference.make_predict_fn(model, phase, mesh)
    device_params = inference.place_params(model, params, mesh)  # as evaluation places them
    images = synthetic_batch(batch, image_size, mesh)["ib"]["image"]
    t0 = time.perf_counter()
    compiled = predict.lower(device_params, images).compile()
    return Prepared(name or f"{phase.name} inference", False, compiled, [device_params, images],
                    batch, time.perf_counter() - t0, footprint(compiled))


# ------------------------------------------------------------------------------- machine


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()
