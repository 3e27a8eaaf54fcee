"""One frozen backbone serving many long-tailed tasks: mixed-task batches over several exports.

    predictor = MultiTaskPredictor.from_exports("vit_b16.npz", {
        "birds": "runs/birds/phase2/export.npz",    # phase 2, 200 classes
        "cars": "runs/cars/phase1/export.npz"})      # phase 1, 49 classes
    rows = predictor.predict(images, ["birds", "cars", "birds"], top_k=5)
    # [{"task": "birds", "top_k": [{"label": 17, "name": ..., "probability": ..., "score": ...},
    #   ...]}, ...]

Loading checks every export before anything runs: its own verification (`lpt_jax.run.exports`),
that it was trained on this backbone file (the fingerprint in its meta), and that it can share
a batch with the others: the config fields declared BATCHED (lpt_jax.config.fields: the
method, the backbone and its settings, LPT's prompt length, K and prompt position, the image
size) must agree, because they shape the tokens every example of a batch goes through. Pool
size, top-k, phase and classes may differ. Each failure is one `ExportError`.

A batch is one jitted call. Its rows are grouped by their task's phase; each phase runs its own
per-example forward on its rows (`Phase.serve`, e.g. LPT phase 2: every row with its task's
shared prompt, keys and pool, as `LPT.phase2` computes it) with its tasks' trained arrays
stacked (`Phase.stack`); each row's feature then meets its task's cosine head. Results are the
single-task ones: top-k labels by cosine, probabilities the softmax of the cosines times the
task's scale (the method's `probability_scale`, LPT's `loss.cb.scale`), as
`lpt_jax.run.inference.predict_files` gives them.

Shapes come in few buckets, so a service compiles few programs: a batch is padded to a
multiple of an eighth of `batch_size` rows, each phase's rows to a multiple of an eighth of
that; padding rows compute nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpt_jax import backbones, tree
from lpt_jax.config import schema
from lpt_jax.config.fields import BATCHED, INCIDENTAL, SERVING
from lpt_jax.errors import ConfigError, ExportError, RequestError
from lpt_jax.method.lpt_model import l2_normalize
from lpt_jax.run import exports
from lpt_jax.weights.npz import file_fingerprint


@dataclasses.dataclass(frozen=True)
class Task:
    """One served export."""
    name: str
    path: str
    method: Any         # lpt_jax.method.registry.Method
    phase: Any          # lpt_jax.method.phases.Phase
    class_names: tuple[str, ...]
    scale: float        # softmax scale of the cosines (the method's probability_scale)
    config: Any         # its run's config (ConfigDict): how its images are preprocessed, ...

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


def _read_task(name: str, path: str, backbone_path: str, identity: dict) -> Task:
    """A Task from an export's meta, the backbone identity checked."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"task name {name!r} of {path}: expected a non-empty string")
    _, meta = exports.read(path)
    exports.check_backbone(path, meta.get("backbone"), backbone_path, identity, task=name)
    method, phase = exports.phase_of(path, meta)
    if not isinstance(meta.get("config"), dict):
        raise ExportError(f"{path} (task {name!r}): its meta holds no run config; export it "
                          "again with this lpt_jax", path=path)
    config = ml_collections.ConfigDict(meta["config"])
    if "method" not in config.get("model", {}):  # written before methods were named
        config.model.method = method.name
    class_names = meta.get("class_names")
    if not isinstance(class_names, list) or not class_names:
        raise ExportError(f"{path} (task {name!r}): its meta lists no class names; export it "
                          "again with this lpt_jax", path=path)
    if meta.get("num_classes", len(class_names)) != len(class_names):
        raise ExportError(f"{path} (task {name!r}): its meta says {meta['num_classes']} "
                          f"classes but names {len(class_names)}", path=path)
    try:
        dont_load, scale = tuple(config.backbone.dont_load), method.probability_scale(config)
        schema.of(config)
    except (AttributeError, KeyError, ConfigError) as e:
        raise ExportError(f"{path} (task {name!r}): the config in its meta is incomplete "
                          f"({e}); export it again with this lpt_jax", path=path) from None
    if dont_load:
        raise ExportError(
            f"{path} (task {name!r}) was trained with backbone.dont_load={dont_load}: those "
            "backbone weights kept a random init that neither the backbone file nor the export "
            "holds, so it cannot be served", path=path)
    if phase.stack is None or phase.serve is None:
        raise ExportError(f"{path} (task {name!r}): {method.name} {phase.name} declares no "
                          "per-example forward, so it cannot be served in mixed batches; use "
                          "single-task predict", path=path)
    return Task(name=name, path=path, method=method, phase=phase,
                class_names=tuple(str(c) for c in class_names), scale=float(scale),
                config=config)


def _check_stackable(a: Task, b: Task) -> None:
    """One line if `b` cannot share a batch with `a`: a field declared BATCHED (and not
    INCIDENTAL) differs."""
    for field in schema.fields(a.config, BATCHED, unless=INCIDENTAL):
        va, vb = (tree.lookup(t.config, field, None) for t in (a, b))
        if va != vb:
            raise ExportError(
                f"{b.path} (task {b.name!r}) cannot share a batch with task {a.name!r}: its "
                f"{field} is {vb!r}, task {a.name!r}'s is {va!r} (these shape the tokens every "
                "example of a batch goes through); serve it with a predictor of its own",
                path=b.path, field=field)


def _bucket(n: int, cap: int) -> int:
    """n rounded up to a multiple of cap/8 (at most cap): few distinct shapes to compile."""
    step = max(1, -(-cap // 8))
    return min(cap, -(-n // step) * step)


def _forward(model, serves, max_classes: int, params, stacks, heads, images, task, local,
             groups):
    """One mixed batch -> (cosines (B, max_classes), -inf past each row's classes; picked
    pool indices (B, k_max), -1 where none). `groups[g]`: the rows of phase group g, padded
    with B (each length static: one program per combination of buckets)."""
    width = heads["kernel"].shape[0]
    features = jnp.zeros((images.shape[0], width), jnp.float32)
    picks = []
    for serve, stack, rows in zip(serves, stacks, groups):
        if not rows.shape[0]:
            continue
        rows_of = functools.partial(jnp.take, indices=rows, axis=0, mode="clip")
        feature, picked = serve(model, params, stack, rows_of(images), rows_of(local))
        features = features.at[rows].set(feature.astype(jnp.float32), mode="drop")
        picks.append((rows, picked))
    k = max([p.shape[1] for _, p in picks] + [0])
    indices = jnp.full((images.shape[0], k), -1, jnp.int32)
    for rows, picked in picks:
        if picked.shape[1]:
            indices = indices.at[rows, :picked.shape[1]].set(picked, mode="drop")
    cosines = jnp.matmul(l2_normalize(features), heads["kernel"],         # (B, sum of C)
                         precision=jax.lax.Precision.HIGHEST)  # as CosineHead
    columns = jnp.arange(max_classes)
    inside = columns[None] < heads["num_classes"][task][:, None]
    picked_columns = jnp.take_along_axis(
        cosines, jnp.minimum(heads["offsets"][task][:, None] + columns, cosines.shape[1] - 1),
        axis=1)
    return jnp.where(inside, picked_columns, -jnp.inf), indices


def _heads(trained: Sequence[Mapping], tasks: Sequence[Task]) -> dict:
    """Every task's cosine head as unit columns side by side, with its offset and size."""
    kernels = [np.asarray(l2_normalize(jnp.asarray(t["head"]["kernel"], jnp.float32), axis=0))
               for t in trained]  # as CosineHead normalises its kernel
    sizes = np.array([t.num_classes for t in tasks], np.int32)
    return dict(kernel=np.concatenate(kernels, axis=1), num_classes=sizes,
                offsets=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32))


class MultiTaskPredictor:
    """Several exports on one frozen backbone; see the module docstring. Build it with
    `from_exports`; `predict`, `scores` and `predict_files` answer mixed-task requests."""

    def __init__(self, model, backbone_params, tasks: Sequence[Task],
                 trained: Sequence[Mapping], batch_size: int):
        self.model = model
        self.tasks = {t.name: t for t in tasks}
        self.batch_size = batch_size
        self._order = list(self.tasks)
        self.image_shape = tuple(model.backbone.image_size) + (3,)
        phases = sorted({t.phase.number: t.phase for t in tasks}.items())
        self._phases = [p for _, p in phases]
        group_of = {number: g for g, (number, _) in enumerate(phases)}
        self._group = np.array([group_of[t.phase.number] for t in tasks], np.int32)
        self._local = np.zeros(len(tasks), np.int32)  # each task's index in its group's stack
        stacks = []
        for g, phase in enumerate(self._phases):
            members = [i for i, t in enumerate(tasks) if self._group[i] == g]
            self._local[members] = np.arange(len(members))
            stacks.append(phase.stack([trained[i] for i in members],
                                      [tasks[i].config for i in members]))
        self._params = jax.device_put({"params": backbones.stored_in_compute_dtype(
            {"backbone": backbone_params}, model.backbone)})
        self._stacks = jax.device_put(stacks)
        self._heads = jax.device_put(_heads(trained, tasks))
        self._forward = jax.jit(functools.partial(
            _forward, model, tuple(p.serve for p in self._phases),
            max(t.num_classes for t in tasks)))

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
        tasks = [_read_task(n, p, backbone_path, identity) for n, p in exports_by_task.items()]
        for other in tasks[1:]:
            _check_stackable(tasks[0], other)
        config, method = tasks[0].config, tasks[0].method
        family = backbones.get(config.model.backbone)
        backbone = family.from_config(config.model[config.model.backbone])
        size = backbone.image_size
        dummy = jax.ShapeDtypeStruct((1,) + tuple((size, size) if isinstance(size, int)
                                                  else size) + (3,), jnp.float32)
        shapes: dict = {}
        trained = []
        for task in tasks:
            model = method.build(task.config.model, task.num_classes, backbone)
            if model not in shapes:  # tracing the model's init: once per distinct shape
                shapes[model] = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
            params, _ = exports.apply(shapes[model], task.path)  # keys, shapes, finite values
            trained.append(params)
        backbone_params = family.load_params(
            backbone_path, shapes[next(iter(shapes))]["backbone"], dont_load=(),
            ignore=tuple(config.backbone.ignore), model=backbone,
            subtree=config.backbone.subtree)
        backbones.check_finite(backbone_params, backbone_path)
        return cls(method.serving_model(config.model, backbone), backbone_params, tasks, trained,
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
        images = np.asarray(images)
        tasks = list(tasks)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise RequestError(f"images of shape {images.shape}: expected (n, "
                               f"{', '.join(map(str, self.image_shape))})")
        if not np.issubdtype(images.dtype, np.floating):
            raise RequestError(f"images of dtype {images.dtype}: expected floats in [-1, 1], "
                               "preprocessed as each task's run did (load_images)")
        images = images.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1))
        if bad.size:
            raise RequestError(f"image {int(bad[0])} holds non-finite values ({bad.size} such "
                               "images)")
        if images.size and np.abs(images).max() > 1 + 1e-3:
            raise RequestError(f"image values reach {np.abs(images).max():.4g}: expected [-1, "
                               "1], preprocessed as each task's run did (load_images)")
        if len(tasks) != len(images):
            raise RequestError(f"{len(images)} images but {len(tasks)} task names")
        ids = np.array([self.task_index(t) for t in tasks], np.int32)
        if not tasks:
            raise RequestError("no images to predict")
        chunks = [self._call(images[i:i + self.batch_size], ids[i:i + self.batch_size])
                  for i in range(0, len(images), self.batch_size)]
        logits = np.concatenate([c[0] for c in chunks])
        width = max(c[1].shape[1] for c in chunks)
        indices = np.concatenate([np.pad(c[1], ((0, 0), (0, width - c[1].shape[1])),
                                         constant_values=-1) for c in chunks])
        scale = np.array([self.tasks[t].scale for t in tasks], np.float64)[:, None]
        z = logits.astype(np.float64)  # as single-task predict: float64, max subtracted
        probs = np.exp(scale * (z - z.max(-1, keepdims=True)))
        probs /= probs.sum(-1, keepdims=True)
        return Scores(tasks, logits, probs, indices)

    def _call(self, images: np.ndarray, ids: np.ndarray):
        n = len(images)
        rows = _bucket(n, self.batch_size)
        groups = []
        for g in range(len(self._phases)):
            members = np.flatnonzero(self._group[ids] == g)
            padded = np.full(_bucket(len(members), rows), rows, np.int32)
            padded[:len(members)] = members
            groups.append(padded)
        padded_images = np.zeros((rows,) + images.shape[1:], np.float32)
        padded_images[:n] = images
        task = np.zeros(rows, np.int32)
        task[:n] = ids
        logits, indices = self._forward(self._params, self._stacks, self._heads, padded_images,
                                        task, self._local[task], tuple(groups))
        return np.asarray(logits)[:n], np.asarray(indices)[:n]

    def predict(self, images, tasks: Sequence[str], top_k: int = 5,
                digits: Optional[int] = None) -> list[dict]:
        """One dict per image: task, and its task's top-k classes (at most all of them) with
        label, name, probability and score (the cosine), as single-task predict gives them;
        `digits` rounds the floats."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
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
        return data.load_image_files(list(files), self.tasks[task].config.data)

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


def cli_settings(config) -> list[str]:
    """What the command line's --config still sets with several exports (the fields declared
    SERVING); every other setting comes from each export."""
    return list(schema.fields(config, SERVING))


def predict_requests(config, exports_by_task: Mapping[str, str],
                     requests: Sequence[tuple[str, str]]) -> Iterator[dict]:
    """The command line's multi-export predict: the backbone of `config.backbone.checkpoint`,
    `config.predict.batch_size` and `.top_k`; every other setting comes from each export.
    Requests and exports are all checked when this returns, before the first row."""
    known = list(exports_by_task)
    for task, file in requests:
        if task not in exports_by_task:
            raise RequestError(f"{file} asks for task {task!r}, which no export names; "
                               f"the tasks are {', '.join(map(repr, known))}")
    predictor = MultiTaskPredictor.from_exports(
        config.backbone.checkpoint, exports_by_task, batch_size=int(config.predict.batch_size))
    return predictor.predict_files(requests, top_k=int(config.predict.top_k))
