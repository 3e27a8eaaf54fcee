"""THE adapter: every lpt_jax import and call of the benchmarks is here; after a library change
this is the one file to update.

It builds the code that ships, never a copy: the train step `steps.make_train_step(...)` jitted
by `TrainStep.jit(mesh)` (what `run.trainer` runs), `inference.make_predict_fn`,
`serving.MultiTaskPredictor`, the backbone loader, the release converter, the data stream.
Variants are *phases* of the same factory (the release's two-pass phase 2: `METHOD.phase(2)` with
`forward_method=LPT.phase2_reference`). Models: configs/common.py's base config, random
backbone weights; synthetic batches. The step part needs no TensorFlow (the GPU machine has
none); data, convert and serving import on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import base_config, use_siglip
from lpt_jax import parallel
from lpt_jax.backbones import layers
from lpt_jax.backbones import vit as vit_module
from lpt_jax.method import steps
from lpt_jax.method.lpt import METHOD
from lpt_jax.method.lpt_model import LPT, lpt_from_config
from lpt_jax.method.phases import Phase
from lpt_jax.run import context, inference

NUM_CLASSES = 365        # Places-LT
STEPS_PER_EPOCH = 1000   # the schedule's clock only: every timed step is in epoch 0

# The variants, as phases of the shipped step.
PHASE1 = METHOD.phase(1)
SHARED_TRUNK = METHOD.phase(2)                                  # LPT.phase2: 2L-K blocks
RELEASE_WAY = dataclasses.replace(SHARED_TRUNK, forward_method=LPT.phase2_reference)  # 2L blocks
XLA_MERGED = dataclasses.replace(  # the release way without the barrier: XLA may share blocks
    SHARED_TRUNK, forward_method=functools.partial(LPT.phase2_reference, distinct_passes=False))
ALL_PARAMS = (".*",)
PHASE1_ALL_GRADS = dataclasses.replace(PHASE1, trainable=ALL_PARAMS)
RELEASE_ALL_GRADS = dataclasses.replace(RELEASE_WAY, trainable=ALL_PARAMS)


def bench_config(variant: str = "B/16", *, image_size: int = 224, batch: int = 8,
                 dtype: str = "float32", remat: bool = False, vit: Optional[dict] = None,
                 shared_depth: Optional[int] = None, attention: Optional[str] = None,
                 siglip: str = ""):
    """configs.common.base_config() with the ViT and the batch of the benchmark. `vit`:
    explicit ViT fields instead of `variant`; `siglip`: a SigLIP tower by its config name
    (`configs.common.use_siglip`: MAP pooling, tanh GELU, ...); K defaults to depth // 2."""
    c = base_config()
    if siglip:
        use_siglip(c, siglip)
    c.model.vit.update(dict(image_size=image_size, dtype=dtype, remat=remat,
                            variant="" if vit else variant, **(vit or {})),
                       **({} if attention is None else {"attention": attention}))
    depth = model(c).backbone.depth
    c.model.lpt.shared_depth = depth // 2 if shared_depth is None else shared_depth
    c.data.image_size = image_size
    c.phase1.batch_size = c.phase2.batch_size = c.eval.batch_size = batch
    return c


def config_for(phase: Phase, config):
    """The config under which `steps.make_train_step` trains what `phase` says."""
    if tuple(phase.trainable) == tuple(METHOD.phase(phase.number).trainable):
        return config
    c = config.copy_and_resolve_references()
    c[phase.name].trainable = tuple(phase.trainable)
    return c


def model(config) -> LPT:
    return lpt_from_config(config.model, NUM_CLASSES)


def build(config, seed: int = 0) -> tuple[LPT, dict]:
    """(model, host params): `context.init_params`, the backbone drawn by `random_like`."""
    lpt = model(config)
    params = context.init_params(lpt, config)
    params["backbone"] = random_like(params["backbone"], seed)
    return lpt, jax.tree.map(np.asarray, params)


def random_like(shapes, seed: int):
    """NumPy values of the shapes: LayerNorm scales 1, biases 0, the rest N(0, 0.02^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def model_dims(model: LPT) -> dict:
    """What the analytic FLOP count needs of the model."""
    v = model.backbone
    (gh, gw), patch = v.grid, v.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return dict(n=gh * gw, d=v.width, m=v.mlp_dim or 4 * v.width, depth=v.depth,
                patch_in=ph * pw * 3, prefix=v.num_prefix_tokens, k=model.shared_depth,
                p=model.prompt_length, classes=model.num_classes, pool=v.pool_type,
                keys_only_prompts=hasattr(vit_module.ViT, "encode_features"))


def attention(model: LPT) -> str:
    """The ViT's attention setting and what it runs as on this backend."""
    name = model.backbone.attention
    resolved = layers.attention_implementation(name)
    return name if resolved == name else f"{name} ({resolved})"


def make_mesh():
    return parallel.make_mesh(jax.devices()[:1])


def replicate(tree, mesh):
    return jax.device_put(tree, parallel.replicated(mesh))


def synthetic_batch(batch: int, image_size: int, mesh, seed: int = 1) -> dict:
    """The trainer's dual batch ({'cb': {image, label}, 'ib': ...}) and sharding, on device."""
    shape = (batch, image_size, image_size, 3)

    def make(key):
        k = jax.random.split(key, 4)
        return {b: {"image": jax.random.uniform(k[2 * i], shape, jnp.float32, -1, 1),
                    "label": jax.random.randint(k[2 * i + 1], (batch,), 0, NUM_CLASSES,
                                                jnp.int32)}
                for i, b in enumerate(("cb", "ib"))}
    return jax.jit(make, out_shardings=parallel.batch_sharding(mesh))(jax.random.key(seed))


def train_step(model: LPT, phase: Phase, config, *, batch: int) -> steps.TrainStep:
    c = np.arange(model.num_classes) / (model.num_classes - 1)  # Places-LT-like: 4980 ... 5
    counts = np.round(4980 * (5 / 4980) ** c).astype(np.int64)
    return steps.make_train_step(model, phase, config_for(phase, config), class_counts=counts,
                                 steps_per_epoch=STEPS_PER_EPOCH, batch_size=batch)


def footprint(compiled) -> dict:
    """Bytes the compiled program needs at once (arguments + outputs + temporaries - donated)
    from `memory_analysis()`, and XLA's FLOP count from `cost_analysis()`."""
    mem, out = compiled.memory_analysis(), {}
    if mem is not None:
        get = lambda n: float(getattr(mem, n, 0) or 0)  # noqa: E731
        out = dict(temp=get("temp_size_in_bytes"), args=get("argument_size_in_bytes"),
                   outputs=get("output_size_in_bytes"), alias=get("alias_size_in_bytes"))
        out["peak"] = out["temp"] + out["args"] + out["outputs"] - out["alias"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device
    out["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return out


@dataclasses.dataclass
class Prepared:
    """A compiled shipped function with its arguments (the train state threaded through)."""
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
        return self.run(1)

    def run(self, calls: int) -> tuple[float, float]:
        """(wall, CPU seconds) of `calls` calls dispatched back to back (the train state
        threaded through), waited for once at the end, as a training loop runs them."""
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

    def outputs(self) -> dict:
        """The last call's loss and grad norm (train) or logits (inference), as NumPy."""
        if self.train:
            return {k: np.asarray(self.last[k], np.float32) for k in ("loss", "grad_norm")}
        return {"logits": np.asarray(self.last[0], np.float32)}

    def received(self):
        """The frozen weights the program got (train: the frozen tree; inference: backbone)."""
        return self.args[1] if self.train else self.args[0]["backbone"]


def prepare_step(model: LPT, phase: Phase, config, params: dict, *, batch: int, mesh,
                 data: Optional[dict] = None, name: str = "",
                 frozen_dtype: Optional[str] = None) -> Prepared:
    """The shipped step of `phase` compiled by `TrainStep.jit(mesh)` for what the trainer passes
    (fresh state); `frozen_dtype`: `TrainStep.init`'s frozen tree cast to it (the step takes it)."""
    ts = train_step(model, phase, config, batch=batch)
    state, frozen = ts.init(params)
    if frozen_dtype:
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    state = jax.tree.map(jnp.array, state)  # copies: the state is donated
    state, frozen = replicate((state, frozen), mesh)
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


# ----------------------------------------------------------------------------- compiled memory


def step_config(method: str, phase: int, *, batch: int, variant: str = "B/16",
                image_size: int = 224, microbatches: int = 1, remat: bool = False,
                dtype: str = "float32"):
    """configs.common.base_config(method) with the ViT, the phase's batch per stream and
    train.microbatches of a compiled-memory row (the method's own defaults otherwise)."""
    c = base_config(method)
    c.model.vit.update(dict(variant=variant, image_size=image_size, remat=remat, dtype=dtype))
    c.data.image_size = image_size
    c[f"phase{phase}"].batch_size = batch
    c.train.microbatches = microbatches
    return c


def compile_step_abstract(config, phase: int, num_classes: int) -> dict:
    """The trainer's step of `phase` (`steps.make_train_step(...).jit(mesh)` on one device)
    lowered and compiled, not run, for abstract inputs of the real shapes: the method's
    params (`model.init` under `jax.eval_shape`: no weights), `TrainStep.init`'s state and
    frozen tree, and the batch of every stream the method reads (float32 images, int32
    labels). Returns `footprint` (bytes from `memory_analysis()`), the streams and seconds."""
    from lpt_jax import backbones
    from lpt_jax.method import registry
    method = registry.of(config)
    family = backbones.get(config.model.backbone)
    model = method.build(config.model, num_classes,
                         family.from_config(config.model[config.model.backbone]))
    size = config.model[config.model.backbone].image_size
    batch = config[f"phase{phase}"].batch_size
    c = np.arange(num_classes) / (num_classes - 1)  # long-tailed: 4980 ... 5
    ts = steps.make_train_step(model, method.phase(phase), config,
                               class_counts=np.round(4980 * (5 / 4980) ** c).astype(np.int64),
                               steps_per_epoch=STEPS_PER_EPOCH, batch_size=batch)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    params = jax.eval_shape(model.init, rngs,
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
    state, frozen = jax.eval_shape(ts.init, params)
    streams = tuple(method.streams(config))
    data = {s: {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)} for s in streams}
    t0 = time.perf_counter()
    compiled = ts.jit(make_mesh()).lower(state, frozen, data).compile()
    return dict(footprint=footprint(compiled), streams=streams,
                compile_s=time.perf_counter() - t0,
                frozen_bytes=abstract_bytes(frozen), state_bytes=abstract_bytes(state),
                batch_bytes=abstract_bytes(data))


def abstract_bytes(tree) -> int:
    """Bytes of a tree of abstract arrays (shape x item size)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- backbone loader

AUGREG_NAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def abstract(module) -> dict:
    """Names, shapes and dtypes of a ViT's or an LPT's params at 224 px (nothing computed)."""
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def vit_abstract(variant: str = "B/16", num_classes: Optional[int] = None) -> dict:
    """A plain ViT's (LayerNorm eps 1e-5, a `num_classes` head or none)."""
    return abstract(vit_module.ViT(num_classes=num_classes, image_size=(224, 224),
                                   layernorm_epsilon=1e-5, **vit_module.decode_variant(variant)))


def write_vit_checkpoint(path: str, layout: str, num_classes: int = 21843) -> None:
    """A random ViT-B/16 checkpoint with a `num_classes` head, uncompressed: 'big_vision',
    'big_vision_scan' (blocks stacked; both by `vit_weights.save_big_vision_npz`) or 'augreg'
    (vit_jax names, the position table with the CLS row first)."""
    from lpt_jax.backbones import vit_weights
    from lpt_jax.tree import flatten
    params = random_like(vit_abstract("B/16", num_classes), 0)
    if layout != "augreg":
        return vit_weights.save_big_vision_npz(path, params, scan=layout == "big_vision_scan")
    flat = {"/".join(AUGREG_NAMES.get(p, p) for p in k.split("/")): v
            for k, v in flatten(params).items()}
    pos = flat.pop("pos_embedding")
    flat["Transformer/posembed_input/pos_embedding"] = np.concatenate([pos[:, :1], pos], 1)
    np.savez(path, **flat)


def load_backbone(path: str, abstract: dict, ignore=("head/.*",)) -> dict:
    """The eval / training loader: `vit_weights.load_params`."""
    from lpt_jax.backbones import vit_weights
    return vit_weights.load_params(path, abstract, ignore=list(ignore))


def mark_loader_stages(mark: Callable[[str], None]) -> None:
    """Calls mark(stage) after each stage of `load_backbone` (read_arrays, to_big_vision_layout)."""
    from lpt_jax.backbones import vit_weights
    def wrap(name, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            mark(name)
            return out
        return wrapped
    for name in ("read_arrays", "to_big_vision_layout"):
        setattr(vit_weights, name, wrap(name, getattr(vit_weights, name)))


# ----------------------------------------------------------------------------- serving, exports


def write_tasks(folder: str, phase2: int, phase1: int, batch: int) -> dict:
    """Paths of a random ViT-B/16 backbone .npz and random exports (trainer's meta, 365 classes)."""
    from lpt_jax.backbones import vit_weights
    from lpt_jax.run import exports
    from lpt_jax.weights import npz
    config = bench_config("B/16", batch=batch)
    shapes = abstract(model(config))
    path = f"{folder}/backbone.npz"
    vit_weights.save_big_vision_npz(path, random_like(shapes["backbone"], 0))
    config.backbone.checkpoint = path
    meta = {"step": 1, "config": json.loads(config.to_json_best_effort()),
            "backbone": npz.file_fingerprint(path), "num_classes": NUM_CLASSES,
            "class_names": [f"class_{c}" for c in range(NUM_CLASSES)]}
    prompts = {k: v for k, v in shapes.items() if k != "backbone"}
    out = {"backbone": path, "phase2": [], "phase1": []}
    for number, count in ((2, phase2), (1, phase1)):
        for i in range(count):
            p = f"{folder}/p{number}_{i}.npz"
            trained = exports.exported_subtree(random_like(prompts, 100 * number + i),
                                               METHOD.phase(number))
            exports.write(p, trained, {**meta, "phase": number})
            out[f"phase{number}"].append(p)
    return out


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def multitask(backbone: str, exports_by_task: dict, batch: int):
    """`serving.MultiTaskPredictor.from_exports`: (scores(images, tasks), bytes held on device)."""
    from lpt_jax import serving
    predictor = serving.MultiTaskPredictor.from_exports(backbone, exports_by_task,
                                                        batch_size=batch)
    held = (tree_bytes(predictor._params) + tree_bytes(predictor._stacks)
            + tree_bytes(predictor._heads))
    return (lambda images, tasks: np.asarray(predictor.scores(images, tasks).probabilities),
            held)


def single_task(backbone: str, export: str, *, batch: int, backbone_params=None):
    """One model as the single-task path holds it (backbone loaded unless given, `exports.apply`)
    on the device: {predict (`make_predict_fn`) -> logits, held (bytes), backbone (params)}."""
    from lpt_jax.run import exports
    config = bench_config("B/16", batch=batch)
    lpt = model(config)
    shapes = abstract(lpt)
    params, meta = exports.apply(shapes, export)
    if backbone_params is None:
        backbone_params = vit_module.load_params(backbone, shapes["backbone"],
                                                 ignore=config.backbone.ignore, model=lpt.backbone)
    params["backbone"] = backbone_params
    params = jax.device_put(jax.tree.map(  # what the export leaves out (phase 1: the pool)
        lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        params))
    predict = inference.make_predict_fn(lpt, METHOD.phase(meta["phase"]), make_mesh())
    return dict(predict=lambda images: np.asarray(predict(params, jnp.asarray(images))[0]),
                held=tree_bytes(params), backbone=params["backbone"])


# ----------------------------------------------------------------------------- convert
# num_heads: for a release whose width is no standard ViT's (None: from the width).


def convert_release(path: str, out_dir: str, num_heads: Optional[int] = None,
                    class_names: str = "places_lt") -> None:
    """`lpt_jax.convert.convert_release` (`python -m lpt_jax.convert release`)."""
    from lpt_jax import convert
    convert.convert_release(path, out_dir, overwrite=True, num_heads=num_heads,
                            class_names=class_names)


def load_release(path: str, num_heads: Optional[int] = None):
    from lpt_jax import convert
    return convert.load_release(path, num_heads=num_heads)


def trace_release(path: str, num_heads: Optional[int] = None) -> None:
    """JAX's one-time tracing of the release's model (jax.eval_shape of its init)."""
    from lpt_jax import convert
    from lpt_jax.convert.fit import abstract_params
    abstract_params(convert.release.build_model(convert.read_release(path, num_heads)))


def converted_backbone_loader(workdir: str) -> Callable[[], dict]:
    """() -> the converted DIR/backbone.npz loaded as eval loads it (abstract tree built now)."""
    import ml_collections

    from lpt_jax.backbones import vit_weights
    from lpt_jax.convert.fit import abstract_params
    from lpt_jax.run import exports
    _, meta = exports.read(f"{workdir}/export.npz")
    shapes = abstract_params(lpt_from_config(ml_collections.ConfigDict(meta["config"]["model"]),
                                             meta["num_classes"]))["backbone"]
    return lambda: vit_weights.load_params(f"{workdir}/backbone.npz", shapes)


# ----------------------------------------------------------------------------- data (TensorFlow)


def cifar_tree(tarball: str, out_dir: str, n_max: int, n_min: int) -> None:
    """A long-tailed image folder of CIFAR-10 JPEGs (`lpt_jax.data.testing`)."""
    from lpt_jax.data import testing
    testing.cifar10_tree(tarball, out_dir, testing.long_tail_counts(10, n_max, n_min))


def _data_config(root: str, **fields):
    from lpt_jax import data
    cfg = data.default_config()
    cfg.name, cfg.root = "image_folder", str(root)
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def prepare_folder(root: str, out_dir: str) -> None:
    """The prepared (in-RAM) format of an image folder (`lpt_jax.data.prepare`)."""
    from lpt_jax.data import prepare
    prepare.prepare(_data_config(root), out_dir)


def train_stream(root: str, batch: int, **fields):
    """`data.make_train_stream` (dual sampling) over a folder; `fields`: data config overrides."""
    from lpt_jax import data
    cfg = _data_config(root, **fields)
    return data.make_train_stream(data.get_source(cfg), cfg, global_batch_size=batch, seed=0)
