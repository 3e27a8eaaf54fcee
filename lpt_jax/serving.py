"""One frozen backbone serving many long-tailed tasks: mixed-task batches over several exports.

    predictor = MultiTaskPredictor.from_exports("vit_b16.npz", {
        "birds": "runs/birds/phase2/export.npz",    # phase 2, 200 classes
        "cars": "runs/cars/phase1/export.npz"})      # phase 1, 49 classes
    rows = predictor.predict(images, ["birds", "cars", "birds"], top_k=5)
    # [{"task": "birds", "top_k": [{"label": 17, "name": ..., "probability": ..., "score": ...},
    #   ...]}, ...]

Loading checks every export before anything runs: its own verification (`lpt_jax.exports`),
that it was trained on this backbone file (the fingerprint in its meta), and that it can share
a batch with the others: the same backbone config, prompt length, K (`shared_depth`), prompt
position and image size, because those shape the token sequence every example of a batch goes
through. Pool size, top-k, phase and classes may differ. Each failure is one `ExportError`.

A batch is one jitted call. Every row takes its task's shared prompt; blocks 0..K-1 and the
shared-prompt blocks K..L-1 run for all rows (the phase-1 feature, and phase 2's query); the
rows of phase-2 tasks then match their task's keys, average their task's selected group
prompts and run blocks K..L-1 again, as `LPT.phase2` does; each row's feature meets its task's
cosine head. Results are the single-task ones: top-k labels by cosine, probabilities the
softmax of the cosines times the task's loss scale (`loss.cb.scale`), as
`lpt_jax.inference.predict_files`.

Shapes come in few buckets, so a service compiles few programs: a batch is padded to a
multiple of an eighth of `batch_size` rows, its phase-2 rows to a multiple of an eighth of
that; padding rows take the phase-1 path. Only phase-2 rows pay for the second pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpt_jax import backbones as models
from lpt_jax import tree
from lpt_jax.errors import ConfigError, ExportError, RequestError
from lpt_jax.method.lpt import (
    LPT,
    PromptedBackbone,
    average_selected,
    backbone_in_compute_dtype,
    l2_normalize,
    lpt_from_config,
    select_per_example,
)
from lpt_jax.run import exports
from lpt_jax.weights.npz import file_fingerprint

# Config fields that must agree between tasks served together (they shape the token sequence).
STACKED_FIELDS = ("model.backbone", "model.lpt.prompt_length", "model.lpt.shared_depth",
                  "model.lpt.prompt_position", "data.image_size")
# Backbone fields that cannot change what a forward computes (beyond float rounding).
_RUN_ONLY_FIELDS = frozenset({"remat", "attention"})


@dataclasses.dataclass(frozen=True)
class Task:
    """One served export."""
    name: str
    path: str
    phase: int
    class_names: tuple[str, ...]
    scale: float        # softmax scale of the cosines (its run's loss.cb.scale)
    pool_size: int      # 0 in phase 1
    top_k: int          # group prompts averaged per example; 0 in phase 1
    data: Any           # its run's config.data: how its images are preprocessed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class Scores:
    """Raw results of a mixed batch, one row per example, padded to the largest task."""
    tasks: list[str]            # each row's task
    logits: np.ndarray          # (n, C_max) cosines; -inf past the row's task's classes
    probabilities: np.ndarray   # (n, C_max) float64 softmax(scale * cosines); 0 past them
    indices: np.ndarray         # (n, k_max) pool prompts picked (phase 2); -1 where none


def _field(config, dotted: str, task: str, path: str):
    try:
        return tree.lookup(config, dotted)
    except KeyError:
        raise ExportError(f"{path} (task {task!r}): the config in its meta has no "
                          f"{dotted}; export it again with this lpt_jax") from None


def _check_backbone(task: str, path: str, recorded, backbone_path: str, ours: dict) -> None:
    if not isinstance(recorded, Mapping) or not recorded.get("sha256_head_tail"):
        raise ExportError(f"{path} (task {task!r}) records no backbone identity, so nothing "
                          f"shows it was trained on {backbone_path}; export it again with "
                          "this lpt_jax")
    if (recorded.get("sha256_head_tail"), recorded.get("size")) != (
            ours["sha256_head_tail"], ours["size"]):
        raise ExportError(
            f"{path} (task {task!r}) was trained on another backbone ({recorded.get('path')}, "
            f"{recorded.get('size')} bytes, fingerprint {str(recorded['sha256_head_tail'])[:12]}) "
            f"than {backbone_path} ({ours['size']} bytes, fingerprint "
            f"{ours['sha256_head_tail'][:12]}): prompts only work on the backbone they were "
            "trained with")


def _read_task(name: str, path: str, backbone_path: str, identity: dict):
    """(Task, its run's config) from an export's meta, the backbone identity checked."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"task name {name!r} of {path}: expected a non-empty string")
    _, meta = exports.read(path)
    _check_backbone(name, path, meta.get("backbone"), backbone_path, identity)
    if not isinstance(meta.get("config"), dict):
        raise ExportError(f"{path} (task {name!r}): its meta holds no run config; export it "
                          "again with this lpt_jax")
    config = ml_collections.ConfigDict(meta["config"])
    class_names = meta.get("class_names")
    if not isinstance(class_names, list) or not class_names:
        raise ExportError(f"{path} (task {name!r}): its meta lists no class names; export it "
                          "again with this lpt_jax")
    if meta.get("num_classes", len(class_names)) != len(class_names):
        raise ExportError(f"{path} (task {name!r}): its meta says {meta['num_classes']} "
                          f"classes but names {len(class_names)}")
    if tuple(_field(config, "backbone.dont_load", name, path)):
        raise ExportError(
            f"{path} (task {name!r}) was trained with backbone.dont_load="
            f"{tuple(config.backbone.dont_load)}: those backbone weights kept a random init "
            "that neither the backbone file nor the export holds, so it cannot be served")
    phase = meta["phase"]

    def pool(field):  # what phase 2 picks from; phase 1 picks nothing
        return int(_field(config, f"model.lpt.{field}", name, path)) if phase == 2 else 0
    task = Task(name=name, path=path, phase=phase,
                class_names=tuple(str(c) for c in class_names),
                scale=float(_field(config, "loss.cb.scale", name, path)),
                pool_size=pool("pool_size"), top_k=pool("top_k"),
                data=_field(config, "data", name, path))
    return task, config


def _backbone_section(config, task: Task) -> dict:
    name = _field(config, "model.backbone", task.name, task.path)
    section = _field(config, f"model.{name}", task.name, task.path)
    return {k: v for k, v in section.to_dict().items() if k not in _RUN_ONLY_FIELDS}


def _check_stackable(first: tuple[Task, Any], other: tuple[Task, Any]) -> None:
    """One line if `other` cannot share a batch with `first`."""
    (a, ca), (b, cb) = first, other

    def compare(field, va, vb):
        if va != vb:
            raise ExportError(
                f"{b.path} (task {b.name!r}) cannot share a batch with task {a.name!r}: its "
                f"{field} is {vb!r}, task {a.name!r}'s is {va!r} (these shape the tokens every "
                "example of a batch goes through); serve it with a predictor of its own")
    for field in STACKED_FIELDS:
        compare(field, _field(ca, field, a.name, a.path), _field(cb, field, b.name, b.path))
    sa, sb = _backbone_section(ca, a), _backbone_section(cb, b)
    for key in sorted(set(sa) | set(sb)):
        compare(f"model.{ca.model.backbone}.{key}", sa.get(key), sb.get(key))


def _bucket(n: int, cap: int) -> int:
    """n rounded up to a multiple of cap/8 (at most cap): few distinct shapes to compile."""
    step = max(1, -(-cap // 8))
    return min(cap, -(-n // step) * step)


def _forward(model: PromptedBackbone, max_classes: int, params, stack, images, task,
             main_rows):
    """One mixed batch -> (cosines (B, max_classes), -inf past each row's classes; picked
    pool indices (B, k_max), -1 where none). `main_rows`: the rows of phase-2 tasks, padded
    with B (its length is static: one program per bucket)."""
    shared = jnp.take(stack["shared"], task, axis=0)                  # (B, L, P, D)
    x = model.apply(params, images, shared, method=PromptedBackbone.trunk)
    feature = model.apply(params, x, shared, method=PromptedBackbone.query)
    indices = jnp.full((images.shape[0], stack["weights"].shape[1]), -1, jnp.int32)
    if main_rows.shape[0]:
        def rows(a):
            return jnp.take(a, main_rows, axis=0, mode="clip")
        t = rows(task)
        weights = stack["weights"][t]
        idx, _ = select_per_example(rows(feature), stack["keys"][t], stack["valid"][t],
                                    weights.shape[1])
        group = average_selected(stack["pools"], t, idx, weights)
        main = model.apply(params, rows(x), rows(shared), group, method=PromptedBackbone.main)
        feature = feature.at[main_rows].set(main, mode="drop")
        indices = indices.at[main_rows].set(jnp.where(weights > 0, idx, -1), mode="drop")
    cosines = l2_normalize(feature.astype(jnp.float32)) @ stack["heads"]   # (B, sum of C)
    columns = jnp.arange(max_classes)
    inside = columns[None] < stack["num_classes"][task][:, None]
    picked = jnp.take_along_axis(
        cosines, jnp.minimum(stack["offsets"][task][:, None] + columns, cosines.shape[1] - 1),
        axis=1)
    return jnp.where(inside, picked, -jnp.inf), indices


def _stack(tasks: Sequence[Task], trained: Sequence[Mapping], shared_depth: int) -> dict:
    """The tasks' prompts, pools, keys and heads as arrays with a leading task axis (pools and
    keys padded to the largest pool; heads' unit columns concatenated)."""
    shared = np.stack([np.asarray(t["shared_prompt"], np.float32) for t in trained])
    _, depth, length, width = shared.shape
    pool_depth = depth - shared_depth
    m = max([t.pool_size for t in tasks] + [1])
    k = max([t.top_k for t in tasks] + [1])
    pools = np.zeros((len(tasks), m, pool_depth, length, width), np.float32)
    keys = np.zeros((len(tasks), m, width), np.float32)
    valid = np.zeros((len(tasks), m), bool)
    weights = np.zeros((len(tasks), k), np.float32)
    for i, (task, params) in enumerate(zip(tasks, trained)):
        if task.phase == 2:
            pools[i, :task.pool_size] = params["pool_prompts"]
            keys[i, :task.pool_size] = params["pool_keys"]
            valid[i, :task.pool_size] = True
            weights[i, :task.top_k] = 1.0 / task.top_k
    heads = [np.asarray(l2_normalize(jnp.asarray(t["head"]["kernel"], jnp.float32), axis=0))
             for t in trained]  # as CosineHead normalises its kernel
    sizes = np.array([t.num_classes for t in tasks], np.int32)
    return dict(shared=shared, pools=pools, keys=keys, valid=valid, weights=weights,
                heads=np.concatenate(heads, axis=1), num_classes=sizes,
                offsets=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32))


class MultiTaskPredictor:
    """Several exports on one frozen backbone; see the module docstring. Build it with
    `from_exports`; `predict`, `scores` and `predict_files` answer mixed-task requests."""

    def __init__(self, model: PromptedBackbone, backbone_params, tasks: Sequence[Task],
                 stack: Mapping, batch_size: int):
        self.model = model
        self.tasks = {t.name: t for t in tasks}
        self.batch_size = batch_size
        self._order = list(self.tasks)
        self._phase2 = np.array([t.phase == 2 for t in tasks])
        self.image_shape = tuple(model.backbone.image_size) + (3,)
        self._params = jax.device_put({"params": backbone_in_compute_dtype(
            {"backbone": backbone_params}, model)})
        self._stack = jax.device_put(dict(stack))
        self._forward = jax.jit(functools.partial(
            _forward, model, max(t.num_classes for t in tasks)))

    @classmethod
    def from_exports(cls, backbone_path: str, exports_by_task: Mapping[str, str], *,
                     batch_size: int = 64) -> "MultiTaskPredictor":
        """Loads the backbone once and every export on it, each checked (module docstring).
        `exports_by_task`: {task name: export.npz path}."""
        if not exports_by_task:
            raise ConfigError("no export to serve: name at least one")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
        identity = file_fingerprint(backbone_path)
        read = [_read_task(n, p, backbone_path, identity) for n, p in exports_by_task.items()]
        for other in read[1:]:
            _check_stackable(read[0], other)
        config = read[0][1]
        family = models.get_backbone(config.model.backbone)
        backbone = family.from_config(config.model[config.model.backbone])
        size = backbone.image_size
        dummy = jax.ShapeDtypeStruct((1,) + tuple((size, size) if isinstance(size, int)
                                                  else size) + (3,), jnp.float32)
        shapes: dict[LPT, dict] = {}
        trained = []
        for task, task_config in read:
            lpt = lpt_from_config(task_config.model, task.num_classes, backbone=backbone)
            if lpt not in shapes:  # tracing the model's init: once per distinct shape
                shapes[lpt] = jax.eval_shape(lpt.init, jax.random.key(0), dummy)["params"]
            params, _ = exports.apply(shapes[lpt], task.path)  # keys, shapes, finite values
            trained.append(params)
        subtree = config.backbone.get("subtree", "")  # a tower of a two-tower file (SigLIP)
        backbone_params = family.load_params(
            backbone_path, shapes[next(iter(shapes))]["backbone"],
            dont_load=(), ignore=tuple(config.backbone.ignore), model=backbone,
            **({"subtree": subtree} if subtree else {}))
        shared_depth = int(config.model.lpt.shared_depth)
        model = PromptedBackbone(backbone, shared_depth=shared_depth,
                                 prompt_position=config.model.lpt.prompt_position)
        tasks = [t for t, _ in read]
        return cls(model, backbone_params, tasks, _stack(tasks, trained, shared_depth),
                   batch_size)

    # ---- requests --------------------------------------------------------------------------
    def task_index(self, name: str) -> int:
        try:
            return self._order.index(name)
        except ValueError:
            raise RequestError(f"unknown task {name!r}; this predictor serves "
                               f"{', '.join(map(repr, self._order))}") from None

    def scores(self, images, tasks: Sequence[str]) -> Scores:
        """Cosines, probabilities and picked pool prompts of images (n, H, W, 3) in [-1, 1],
        preprocessed as each task's run did (`load_images`); `tasks[i]` is image i's task."""
        images = np.asarray(images, np.float32)
        tasks = list(tasks)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise RequestError(f"images of shape {images.shape}: expected (n, "
                               f"{', '.join(map(str, self.image_shape))})")
        if len(tasks) != len(images):
            raise RequestError(f"{len(images)} images but {len(tasks)} task names")
        ids = np.array([self.task_index(t) for t in tasks], np.int32)
        if not tasks:
            raise RequestError("no images to predict")
        chunks = [self._call(images[i:i + self.batch_size], ids[i:i + self.batch_size])
                  for i in range(0, len(images), self.batch_size)]
        logits = np.concatenate([c[0] for c in chunks])
        scale = np.array([self.tasks[t].scale for t in tasks], np.float64)[:, None]
        z = logits.astype(np.float64)  # as single-task predict: float64, max subtracted
        probs = np.exp(scale * (z - z.max(-1, keepdims=True)))
        probs /= probs.sum(-1, keepdims=True)
        return Scores(tasks, logits, probs, np.concatenate([c[1] for c in chunks]))

    def _call(self, images: np.ndarray, ids: np.ndarray):
        n = len(images)
        rows = _bucket(n, self.batch_size)
        main = np.flatnonzero(self._phase2[ids])
        main_rows = np.full(_bucket(len(main), rows), rows, np.int32)
        main_rows[:len(main)] = main
        padded = np.zeros((rows,) + images.shape[1:], np.float32)
        padded[:n] = images
        task = np.zeros(rows, np.int32)  # padding rows: task 0, never a second pass
        task[:n] = ids
        logits, indices = self._forward(self._params, self._stack, padded, task, main_rows)
        return np.asarray(logits)[:n], np.asarray(indices)[:n]

    def predict(self, images, tasks: Sequence[str], top_k: int = 5,
                digits: Optional[int] = None) -> list[dict]:
        """One dict per image: task, and its task's top-k classes (at most all of them) with
        label, name, probability and score (the cosine), as single-task predict gives them;
        `digits` rounds the floats."""
        if not isinstance(top_k, int) or top_k < 1:
            raise RequestError(f"top_k={top_k!r}: expected a positive integer")
        s = self.scores(images, tasks)
        out = []
        for task, lg, pr in zip(s.tasks, s.logits, s.probabilities):
            info = self.tasks[task]
            order = np.argsort(-lg)[:min(top_k, info.num_classes)]
            r = (lambda v: round(float(v), digits)) if digits is not None else float
            out.append({"task": task, "top_k": [
                {"label": int(c), "name": info.class_names[c], "probability": r(pr[c]),
                 "score": r(lg[c])} for c in order]})
        return out

    def load_images(self, files: Sequence[str], task: str) -> np.ndarray:
        """Image files preprocessed as `task`'s run evaluates them (imports TensorFlow)."""
        from lpt_jax import data  # the image decoders: TensorFlow, only when files are read
        self.task_index(task)
        return data.load_image_files(list(files), self.tasks[task].data)

    def predict_files(self, requests: Iterable[tuple[str, str]], top_k: int = 5,
                      digits: Optional[int] = 5) -> Iterator[dict]:
        """(task, image file) pairs -> one dict per pair, in order: task, file and top-k as in
        `predict` (rounded as single-task predict rounds them). Every task name is checked
        here, before any image is read."""
        requests = list(requests)
        for task, _ in requests:
            self.task_index(task)
        return self._predict_files(requests, top_k, digits)

    def _predict_files(self, requests, top_k, digits):
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            images = np.zeros((len(chunk),) + self.image_shape, np.float32)
            for task in dict.fromkeys(t for t, _ in chunk):
                where = [i for i, (t, _) in enumerate(chunk) if t == task]
                images[where] = self.load_images([chunk[i][1] for i in where], task)
            rows = self.predict(images, [t for t, _ in chunk], top_k, digits)
            for (_, file), row in zip(chunk, rows):
                yield {"task": row["task"], "file": file, "top_k": row["top_k"]}


# What the command line's --config still sets when every other setting comes from the exports.
CLI_SETTINGS = ("backbone.checkpoint", "predict.batch_size", "predict.top_k")


def predict_requests(config, exports_by_task: Mapping[str, str],
                     requests: Sequence[tuple[str, str]]) -> Iterator[dict]:
    """The command line's multi-export predict: the backbone of `config.backbone.checkpoint`,
    `config.predict.batch_size` and `.top_k`; every other setting comes from each export.
    Requests and exports are all checked when this returns, before the first row."""
    known = list(exports_by_task)
    for task, file in requests:
        if task not in exports_by_task:
            raise RequestError(f"{file} asks for task {task!r}, which no --export names; "
                               f"the tasks are {', '.join(map(repr, known))}")
    predictor = MultiTaskPredictor.from_exports(
        config.backbone.checkpoint, exports_by_task, batch_size=int(config.predict.batch_size))
    return predictor.predict_files(requests, top_k=int(config.predict.top_k))
