"""The LPT trainer: phase 1 then phase 2 on a device mesh, resumable, with reports.

Data flow (one direction): config -> data source and streams -> global arrays on the mesh ->
jit train step (gradients of the phase's trainable subtree only) -> Orbax checkpoints, clu
metrics, and at the end of each phase an export file and the evaluation reports.

Workdir layout:
    config.json                 the config of the run (a different one refuses to resume)
    phase{1,2}/checkpoints/     Orbax: {trainable, opt_state, step, rng} + data position
    phase{1,2}/export.npz       the phase's trained prompts/pool/keys/head + meta
    phase{1,2}/events...        TensorBoard curves (clu writers)
    phase{1,2}/val/             the phase's validation report (never the test split)
    results/                    the final table (md + json), per-class CSV and plot
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from lpt_jax import backbone as backbone_lib
from lpt_jax import checkpoint as ckpt_lib
from lpt_jax import data, evaluate, losses, optim, parallel, tree
from lpt_jax.errors import ConfigError
from lpt_jax.models.lpt import LPT, TRAINABLE, lpt_from_config

# Config sections that define a run; a restart with different values would mix two runs.
RUN_DEFINING_SECTIONS = ("seed", "model", "backbone", "data", "loss", "optim", "phase1", "phase2")


@dataclasses.dataclass
class Context:
    """What every phase shares: built once per run."""
    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    source: Any
    model: LPT
    params: dict              # the full LPT tree (host or replicated device arrays)
    backbone_identity: dict


# ------------------------------------------------------------------------------------------
# Building.

def build_context(config, workdir: str, *, load_backbone: bool = True) -> Context:
    """Validates config, data and checkpoint, and builds the model and its parameters."""
    _check_config(config)
    n = config.train.num_devices
    if n and n > jax.device_count():
        raise ConfigError(f"train.num_devices={n} but only {jax.device_count()} devices exist")
    mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
    for phase in (1, 2):
        batch = config[f"phase{phase}"].batch_size
        parallel.check_batch_size(batch, mesh, f"phase{phase}.batch_size")
        group = config.data.cb_images_per_class * jax.process_count()
        if batch % group:
            raise ConfigError(
                f"phase{phase}.batch_size={batch} must be a multiple of data.cb_images_per_class"
                f" x processes = {group}: the class-balanced batch comes in same-class groups")
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    source = data.get_source(config.data)
    model = lpt_from_config(config.model, source.num_classes)
    params = init_params(model, config)
    identity = {}
    if load_backbone:
        params["backbone"] = load_backbone_params(model, config, params["backbone"])
        identity = ckpt_lib.file_fingerprint(config.backbone.checkpoint)
    return Context(config, workdir, mesh, source, model, params, identity)


def _check_config(config) -> None:
    vit, d = config.model.vit, config.data
    if vit.image_size != d.image_size:
        raise ConfigError(f"model.vit.image_size={vit.image_size} but data.image_size="
                          f"{d.image_size}: the backbone is built for the training crop size")
    parse_phases(config.train.phases)
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={config.train.on_nonfinite!r}: 'stop' or 'skip'")
    for branch in ("cb", "ib"):
        name = config.loss[branch].name
        if name not in losses.LOSSES:
            raise ConfigError(f"loss.{branch}.name={name!r}; known: {sorted(losses.LOSSES)}")


def parse_phases(spec) -> tuple[int, ...]:
    phases = tuple(int(p) for p in str(spec).replace(" ", "").split(",") if p)
    if not phases or any(p not in (1, 2) for p in phases) or list(phases) != sorted(set(phases)):
        raise ConfigError(f"train.phases={spec!r}: expected '1', '2' or '1,2'")
    return phases


def init_params(model: LPT, config) -> dict:
    """Initialises the LPT tree; the backbone part is only created abstractly when it will be
    loaded (XLA drops its unused random init)."""
    size = config.model.vit.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(0)}

    def init_all():
        return model.init(rngs, dummy)["params"]

    def init_prompts():
        params = dict(init_all())
        params.pop("backbone")
        return params

    params = dict(jax.jit(init_prompts)())
    params["backbone"] = jax.eval_shape(init_all)["backbone"]
    return params


def load_backbone_params(model: LPT, config, abstract_backbone) -> dict:
    return backbone_lib.load_params(
        config.backbone.checkpoint, abstract_backbone,
        dont_load=config.backbone.dont_load, ignore=config.backbone.ignore,
        grid=model.backbone.grid)


# ------------------------------------------------------------------------------------------
# The train step.

def forward_fn(model: LPT, phase: int) -> Callable:
    """(params, images, train, dropout_rng) -> dict(logits, match, indices)."""
    def forward(params, images, train, rng):
        rngs = {"dropout": rng} if train else {}
        if phase == 1:
            logits = model.apply({"params": params}, images, train, method=LPT.phase1, rngs=rngs)
            return {"logits": logits, "match": jnp.zeros((), jnp.float32), "indices": None}
        return model.apply({"params": params}, images, train, method=LPT.phase2, rngs=rngs)
    return forward


def make_train_step(model: LPT, phase: int, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config, class_counts: np.ndarray,
                    steps_per_epoch: int, epochs: int) -> Callable:
    """Returns step(state, frozen, batch) -> (state, metrics), differentiating only the
    trainable subtree; the frozen tree is a plain input (no weight gradients exist for it)."""
    patterns = trainable_patterns(config, phase)
    forward = forward_fn(model, phase)
    branch_losses = {b: losses.make_branch_loss(
        config.loss[b].name, class_counts,
        **{k: v for k, v in config.loss[b].items() if k != "name"}) for b in ("cb", "ib")}
    w_match = config.loss.match_weight
    dual = config.loss.dual_sampling
    pool_size = model.pool_size

    def objective(trainable, frozen, batch, rng, epoch):
        params = tree.merge(trainable, frozen)
        r_cb, r_ib, d_cb, d_ib = jax.random.split(rng, 4)
        out_ib = forward(params, batch["ib"]["image"], True, d_ib)
        loss_ib = branch_losses["ib"](out_ib["logits"], batch["ib"]["label"], r_ib)
        if not dual:  # ablation: the instance-balanced branch alone, weight 1
            total = loss_ib - w_match * out_ib["match"]
            return total, ({"loss_ib": loss_ib, "match_ib": out_ib["match"]},
                           [out_ib["indices"]])
        out_cb = forward(params, batch["cb"]["image"], True, d_cb)
        loss_cb = branch_losses["cb"](out_cb["logits"], batch["cb"]["label"], r_cb)
        total, parts = losses.phase_objective(loss_cb, loss_ib, out_cb["match"], out_ib["match"],
                                              losses.eta(epoch, epochs), w_match)
        parts.pop("total")
        return total, (parts, [out_cb["indices"], out_ib["indices"]])

    def step(state, frozen, batch):
        step_no = state["step"]
        rng = jax.random.fold_in(state["rng"], step_no)
        epoch = (step_no // steps_per_epoch).astype(jnp.float32)
        (loss, (parts, indices)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["trainable"], frozen, batch, rng, epoch)
        grad_norm = optax.global_norm(grads)  # of the trainable subtree only
        # The optax partition is the declared freezing policy over the whole tree; frozen
        # leaves get zero gradients here, which XLA removes together with their updates.
        full_grads = tree.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(full_grads, state["opt_state"],
                                       tree.merge(state["trainable"], frozen))
        new_trainable = optax.apply_updates(state["trainable"], tree.split(updates, patterns)[0])
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never reaches the state: keep the old one (and report it).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"trainable": keep(new_trainable, state["trainable"]),
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "step": step_no + 1, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step_no),
                   "nonfinite": (~finite).astype(jnp.int32), **parts}
        if phase == 2:
            idx = jnp.concatenate([i.reshape(-1) for i in indices if i is not None])
            metrics["pool_selection"] = jnp.bincount(idx, length=pool_size)
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------------
# Running a phase.

class _Preemption:
    """SIGTERM (the preemption notice on Cloud TPU) asks the loop to save and stop.

    With several processes, JAX's preemption sync point makes every process agree on the
    same step to stop at; a single process uses its own signal handler.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not in the main thread
                self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._signalled = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(RuntimeError):
    """Raised after a checkpoint was saved on SIGTERM; rerun the same command to resume."""


class NonFiniteError(FloatingPointError):
    pass


def trainable_patterns(config, phase: int) -> tuple[str, ...]:
    return tuple(config[f"phase{phase}"].get("trainable", TRAINABLE[phase]))


def phase_dir(workdir: str, phase: int) -> str:
    return os.path.join(workdir, f"phase{phase}")


def export_path(workdir: str, phase: int) -> str:
    return os.path.join(phase_dir(workdir, phase), "export.npz")


def phase_schedule(config, phase: int, num_train: int) -> tuple[int, int, int]:
    """(batch_size, steps_per_epoch, total_steps) of a phase."""
    pc = config[f"phase{phase}"]
    spe = data.steps_per_epoch(num_train, pc.batch_size)
    total = spe * pc.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    return pc.batch_size, spe, total


def run_phase(ctx: Context, phase: int) -> dict:
    """Trains one phase (resuming if a checkpoint exists); returns the full param tree."""
    config, mesh = ctx.config, ctx.mesh
    params = dict(ctx.params)
    if phase == 2:
        params = _with_phase1_result(ctx, params)
    batch_size, spe, total = phase_schedule(config, phase, ctx.source.num_train)
    pdir = phase_dir(ctx.workdir, phase)

    done = _finished_export(ctx, phase, total)
    if done is not None:
        logging.info("phase %d already finished (%s): skipping", phase, export_path(ctx.workdir, phase))
        return tree.merge(done, tree.split(params, trainable_patterns(config, phase))[1])

    patterns = trainable_patterns(config, phase)
    epochs = config[f"phase{phase}"].epochs
    tx, schedule = optim.make_optimizer(params, patterns, ml_collections.ConfigDict(config.optim),
                                        batch_size=batch_size, epochs=epochs, steps_per_epoch=spe)
    state, frozen = initial_state(params, patterns, tx, config.seed + 1000 * phase)
    rep = parallel.replicated(mesh)
    state = jax.device_put(state, rep)
    frozen = jax.device_put(frozen, rep)

    ckpt = ckpt_lib.PhaseCheckpointer(os.path.join(pdir, "checkpoints"),
                                      every_steps=config.train.checkpoint_every_steps,
                                      keep=config.train.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        logging.info("phase %d: resuming from step %d", phase, start)
        restored, meta = ckpt.restore(start, jax.eval_shape(lambda: state))
        state = jax.device_put(restored, rep)

    step_fn = jax.jit(
        make_train_step(ctx.model, phase, tx, schedule, config, ctx.source.train_counts, spe,
                        epochs),
        in_shardings=(rep, rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep),
        donate_argnums=(0,))
    stream = data.make_train_stream(ctx.source, config.data, global_batch_size=batch_size,
                                    seed=config.seed + 1000 * phase, start_step=start,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    writer = _writer(pdir)
    progress = _Progress(phase, total, spe, 2 * batch_size if config.loss.dual_sampling
                         else batch_size, writer, config.train.log_every_steps)
    meta = {"phase": phase, "total_steps": total, "steps_per_epoch": spe}
    pending, step = [], start - 1
    try:
        with _Preemption() as preemption:
            for step in range(start, total):
                batch = parallel.global_batch(next(stream), mesh)
                state, metrics = step_fn(state, frozen, batch)
                pending.append((step + 1, metrics))
                progress.tick(step + 1)
                last = step + 1 == total
                stop_after = config.train.stop_after_steps
                preempted = preemption.reached(step + 1)
                stop_now = preempted or (stop_after and step + 1 - start >= stop_after)
                if (step + 1) % config.train.log_every_steps == 0 or last or stop_now:
                    _flush_metrics(pending, writer, progress, config.train.on_nonfinite)
                    pending = []
                ckpt.save(step + 1, state, {**meta, "data_step": step + 1},
                          force=last or stop_now)
                if stop_now and not last:
                    why = "on SIGTERM" if preempted else "(train.stop_after_steps)"
                    raise Preempted(f"phase {phase} stopped at step {step + 1} {why}; "
                                    "checkpoint saved, rerun the same command to resume")
    finally:  # a started checkpoint write always completes (or is cleaned up on restart)
        ckpt.close()
        skipped = getattr(stream, "num_skipped", 0)
        if skipped:
            logging.warning("phase %d: %d unreadable training images were skipped "
                            "(data.corrupt_images='skip')", phase, skipped)
            writer.write_scalars(step + 1, {"skipped_images": float(skipped)})
        writer.flush()
        del stream  # stop tf.data's prefetch threads now rather than at interpreter exit

    trained = jax.device_get(state["trainable"])
    result = tree.merge(trained, tree.split(params, patterns)[1])
    if jax.process_index() == 0:
        ckpt_lib.export_trained(export_path(ctx.workdir, phase), exported_subtree(result, phase),
                                _export_meta(ctx, phase, total))
    _sync("export")
    return result


def exported_subtree(params: Mapping, phase: int) -> dict:
    """What an export holds: everything but the backbone that phases 1..phase have trained,
    so that the file alone (next to the backbone) reproduces the phase's predictions."""
    patterns = tuple(p for ph in range(1, phase + 1) for p in TRAINABLE[ph])
    return tree.split(params, patterns)[0]


def initial_state(params: Mapping, patterns, tx: optax.GradientTransformation,
                  seed: int) -> tuple[dict, dict]:
    """(train state, frozen tree): the state holds only what is trained plus what resuming
    needs; frozen leaves carry no optimizer state."""
    trainable, frozen = tree.split(params, patterns)
    state = {"trainable": trainable, "opt_state": tx.init(params), "step": jnp.int32(0),
             "rng": jax.random.PRNGKey(seed)}
    return state, frozen


def _with_phase1_result(ctx: Context, params: dict) -> dict:
    path = ctx.config.train.get("phase1_export") or export_path(ctx.workdir, 1)
    if not _exists(path):
        raise ConfigError(
            f"phase 2 needs the result of phase 1, and {path} does not exist: run phase 1 "
            "first (--config.train.phases=1,2) or point --config.train.phase1_export at an "
            "export.npz")
    return _with_export(params, path)[0]  # shared prompt + head from phase 1


def _with_export(params: Mapping, path: str) -> tuple[dict, dict]:
    """`params` with the leaves of an export file put in (shapes checked), and its meta."""
    trained, meta = ckpt_lib.load_export(path)
    flat = tree.flatten(params)
    for key, value in tree.flatten(trained).items():
        if key not in flat or tuple(flat[key].shape) != tuple(value.shape):
            raise ConfigError(f"{path}: {key} {tuple(value.shape)} does not fit this model")
        flat[key] = value
    return tree.unflatten(flat), meta


def _finished_export(ctx: Context, phase: int, total: int):
    path = export_path(ctx.workdir, phase)
    if not _exists(path):
        return None
    trained, meta = ckpt_lib.load_export(path)
    if meta.get("step") != total:
        return None
    return tree.split(trained, trainable_patterns(ctx.config, phase))[0]


def _export_meta(ctx: Context, phase: int, step: int) -> dict:
    return {"phase": phase, "step": step, "config": json.loads(ctx.config.to_json_best_effort()),
            "backbone": ctx.backbone_identity, "num_classes": ctx.source.num_classes,
            "class_names": list(ctx.source.class_names), "lpt_jax_export_version": 1}


# ------------------------------------------------------------------------------------------
# Metrics and progress.

def _writer(logdir: str):
    """TensorBoard events from process 0 only; the console gets `_Progress`'s line instead of
    every scalar."""
    from clu import metric_writers
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


class _Progress:
    """A readable progress line (and clu's steps/s + ETA in TensorBoard)."""

    def __init__(self, phase, total, spe, images_per_step, writer, every):
        from clu import periodic_actions
        self.phase, self.total, self.spe, self.ips = phase, total, spe, images_per_step
        self.t0, self.s0 = time.time(), None
        self.report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                      every_steps=every)

    def tick(self, step):
        self.report(step)  # clu wants every step

    def __call__(self, step, scalars):
        now = time.time()
        if self.s0 is None:  # the first interval includes compilation
            self.s0, self.t0 = step, now
            rate, eta = float("nan"), "?"
        else:
            rate = (step - self.s0) / max(now - self.t0, 1e-9)
            eta = _duration((self.total - step) / rate) if rate > 0 else "?"
        epoch = (step - 1) // self.spe
        logging.info(
            "phase %d  step %d/%d  epoch %d  loss %.4f  lr %.3g  |g| %.3g  %.1f img/s  ETA %s",
            self.phase, step, self.total, epoch, scalars["loss"], scalars["lr"],
            scalars["grad_norm"], rate * self.ips if rate == rate else float("nan"), eta)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _flush_metrics(pending, writer, progress, on_nonfinite: str) -> None:
    if not pending:
        return
    host = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    for s, m in zip(steps, host):
        if int(m["nonfinite"]):
            parts = {k: float(v) for k, v in m.items() if np.ndim(v) == 0 and k != "nonfinite"}
            bad = [k for k, v in parts.items() if not np.isfinite(v)]
            msg = (f"non-finite {', '.join(bad) or 'gradient'} at step {s} "
                   f"(values: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); "
                   "the update was not applied")
            if on_nonfinite == "stop":
                raise NonFiniteError(msg + "; the last checkpoint holds the last good state")
            logging.warning(msg + "; skipped (train.on_nonfinite='skip')")
    scalars = {k: float(np.mean([m[k] for m in host])) for k, v in host[-1].items()
               if np.ndim(v) == 0 and k != "nonfinite"}
    scalars["nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host))
    if "pool_selection" in host[-1]:  # which pool prompts are picked: collapse shows here
        counts = np.sum([m["pool_selection"] for m in host], axis=0)
        scalars["pool_entries_used"] = float(np.count_nonzero(counts))
        writer.write_histograms(steps[-1], {"pool_selection": np.repeat(
            np.arange(len(counts)), counts.astype(np.int64))})
    writer.write_scalars(steps[-1], dict(scalars))
    progress(steps[-1], scalars)


# ------------------------------------------------------------------------------------------
# Evaluation.

@functools.lru_cache(maxsize=8)
def make_predict_fn(model: LPT, phase: int, mesh) -> Callable:
    """Jitted (params, images) -> (logits, selected pool indices); cached per model/phase/mesh
    so that evaluating several splits compiles once."""
    forward = forward_fn(model, phase)

    def predict(params, images):
        out = forward(params, images, False, None)
        return out["logits"], (out["indices"] if out["indices"] is not None
                                else jnp.zeros((images.shape[0], 0), jnp.int32))
    rep = parallel.replicated(mesh)
    return jax.jit(predict, in_shardings=(rep, parallel.batch_sharding(mesh)),
                   out_shardings=rep)


def predict_split(ctx: Context, params, phase: int, split: str):
    """(predicted labels, true labels, unreadable images skipped) over one pass of a split,
    padding removed."""
    predict = make_predict_fn(ctx.model, phase, ctx.mesh)
    params = jax.device_put(params, parallel.replicated(ctx.mesh))
    preds, labels = [], []
    limit = ctx.config.eval.max_examples
    stream = data.make_eval_stream(ctx.source, ctx.config.data, split=split,
                                   batch_size=ctx.config.eval.batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
    seen = 0
    for batch in stream:
        mask = parallel.global_batch(batch["mask"], ctx.mesh)
        label = parallel.global_batch(batch["label"], ctx.mesh)
        logits, _ = predict(params, parallel.global_batch(batch["image"], ctx.mesh))
        mask, label, logits = (np.asarray(jax.device_get(x)) for x in (
            _gather(mask), _gather(label), logits))
        preds.append(np.argmax(logits, -1)[mask])
        labels.append(label[mask])
        seen += int(mask.sum())
        if limit and seen >= limit:
            break
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    if limit:
        preds, labels = preds[:limit], labels[:limit]
    return preds, labels, getattr(stream, "num_skipped", 0)


def _gather(x):
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)


def evaluate_params(ctx: Context, params, phase: int, split: str, outdir: str,
                    title: str) -> dict:
    t0 = time.time()
    preds, labels, skipped = predict_split(ctx, params, phase, split)
    report = evaluate.accuracy_report(preds, labels, ctx.source.train_counts,
                                      ctx.source.class_names)
    report.update(split=split, phase=phase, seconds=round(time.time() - t0, 1),
                  skipped_images=int(skipped))
    if jax.process_index() == 0:
        paths = evaluate.write_reports(outdir, report, title=title, plot=ctx.config.eval.plot)
        logging.info("%s\n%s\nwritten: %s", title, evaluate.markdown_table(report, title),
                     ", ".join(paths.values()))
        report["files"] = paths
    return report


# ------------------------------------------------------------------------------------------
# Entry points (run.py calls these).

def train(config, workdir: str) -> dict:
    """Runs the configured phases, then the final evaluation; returns the final report."""
    phases = parse_phases(config.train.phases)
    _check_workdir_config(config, workdir)
    ctx = build_context(config, workdir)  # every check that can fail early, before any write
    _record_workdir_config(config, workdir)
    logging.info("data: %s, %d classes, %d training images; devices: %d (%s), processes: %d",
                 config.data.name, ctx.source.num_classes, ctx.source.num_train,
                 ctx.mesh.devices.size, jax.devices()[0].platform, jax.process_count())
    params = ctx.params
    for phase in phases:
        params = run_phase(dataclasses.replace(ctx, params=params), phase)
        if "val" in ctx.source.splits:  # model selection looks at val, never at test
            evaluate_params(ctx, params, phase, "val",
                            os.path.join(phase_dir(workdir, phase), "val"), f"phase {phase}, val")
    split = config.eval.final_split
    return evaluate_params(ctx, params, phases[-1], split, os.path.join(workdir, "results"),
                           f"LPT phase {phases[-1]} on {config.data.name} {split}")


def load_trained(ctx: Context, path: Optional[str] = None) -> tuple[dict, int]:
    """Full params with an export's trained leaves; the phase comes from the export."""
    if path is None:
        for phase in (2, 1):
            if _exists(export_path(ctx.workdir, phase)):
                path = export_path(ctx.workdir, phase)
                break
        else:
            raise ConfigError(f"no export.npz under {ctx.workdir}/phase{{1,2}}: train first or "
                              "pass --export")
    params, meta = _with_export(ctx.params, path)
    if ctx.backbone_identity and meta.get("backbone") and (
            meta["backbone"].get("sha256_head_tail") != ctx.backbone_identity["sha256_head_tail"]):
        logging.warning("%s was trained with backbone %s, now loading %s", path,
                        meta["backbone"].get("path"), ctx.backbone_identity["path"])
    return params, int(meta["phase"])


def evaluate_workdir(config, workdir: str, export: Optional[str] = None) -> dict:
    ctx = build_context(config, workdir)
    params, phase = load_trained(ctx, export)
    split = config.eval.final_split
    return evaluate_params(ctx, params, phase, split, os.path.join(workdir, "eval"),
                           f"LPT phase {phase} on {config.data.name} {split}")


def predict_files(config, workdir: str, files, export: Optional[str] = None):
    """Yields one dict per image: file, top-k labels with class names and cosine scores."""
    ctx = build_context(config, workdir)
    params, phase = load_trained(ctx, export)
    predict = make_predict_fn(ctx.model, phase, parallel.make_mesh(jax.devices()[:1]))
    k = config.predict.top_k
    for i in range(0, len(files), config.predict.batch_size):
        chunk = files[i:i + config.predict.batch_size]
        images = data.load_image_files(chunk, config.data)
        logits, _ = predict(params, jnp.asarray(images))
        logits = np.asarray(logits)
        top = np.argsort(-logits, axis=-1)[:, :k]
        for f, row, lg in zip(chunk, top, logits):
            yield {"file": f, "top_k": [
                {"label": int(c), "name": ctx.source.class_names[c], "score": round(float(lg[c]), 5)}
                for c in row]}


# ------------------------------------------------------------------------------------------
# Workdir hygiene.

def _run_defining(config) -> dict:
    full = json.loads(config.to_json_best_effort())
    return {k: full[k] for k in RUN_DEFINING_SECTIONS if k in full}


def _check_workdir_config(config, workdir: str) -> None:
    """A workdir belongs to one run: refuse to resume it with a different config."""
    path = os.path.join(workdir, "config.json")
    if _exists(path):
        theirs = json.loads(_read_text(path))
        diff = sorted(_diff(theirs, _run_defining(config)))
        if diff and not config.train.get("allow_config_change", False):
            raise ConfigError(
                f"{workdir} holds a run with a different config ({', '.join(diff[:8])}"
                f"{' ...' if len(diff) > 8 else ''}): use a new --workdir, or pass "
                "--config.train.allow_config_change=True to resume it anyway")


def _record_workdir_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        _write_text(os.path.join(workdir, "config.json"),
                    json.dumps(_run_defining(config), indent=1, sort_keys=True))


def _diff(a, b, prefix="") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def _exists(path: str) -> bool:
    if "://" in path:
        import tensorflow as tf
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def _read_text(path: str) -> str:
    if "://" in path:
        import tensorflow as tf
        with tf.io.gfile.GFile(path) as f:
            return f.read()
    with open(path) as f:
        return f.read()


def _write_text(path: str, text: str) -> None:
    ckpt_lib._write_atomic(path, text.encode())  # other processes may be reading it


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
