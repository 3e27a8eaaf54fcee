"""Evaluation and prediction with a trained phase: loading its export next to the backbone,
one jitted predict function per (model, phase, mesh), accuracy reports on a split, validation
scalars during training, and top-k labels of image files."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lpt_jax import backbones, data, parallel
from lpt_jax.errors import ConfigError, ExportError, Input
from lpt_jax.method.phases import Phase
from lpt_jax.run import exports, preemption, reports, rundir
from lpt_jax.run.context import Context, build_context, expected_class_names


@functools.lru_cache(maxsize=8)
def make_predict_fn(model, phase: Phase, mesh) -> Callable:
    """Jitted (params, images) -> (cosine logits, selected pool indices); cached so that
    evaluating several splits compiles once."""
    forward = phase.forward(model)

    def predict(params, images):
        out = forward(params, images, False, None)
        return out["logits"], out["indices"]
    rep = parallel.replicated(mesh)
    return jax.jit(predict, in_shardings=(rep, parallel.batch_sharding(mesh)),
                   out_shardings=rep)


@functools.lru_cache(maxsize=8)
def make_ensemble_predict_fn(model, phase: Phase, mesh) -> Callable:
    """Jitted (params, views (B, V, H, W, 3)) -> (B, C) float32: the cosine logits of the
    phase's forward averaged over the V views (the mean of logits, not of probabilities, as
    LIFT). The views go through the forward one at a time as batches of B (lax.map), so
    device memory stays that of single-view evaluation (LIFT loops over ten crops for it)."""
    forward = phase.forward(model)

    def predict(params, views):
        def one_view(images):
            return forward(params, images, False, None)["logits"].astype(jnp.float32)
        return jnp.mean(jax.lax.map(one_view, jnp.swapaxes(views, 0, 1)), axis=0)
    rep = parallel.replicated(mesh)
    return jax.jit(predict, in_shardings=(rep, parallel.batch_sharding(mesh)),
                   out_shardings=rep)


def place_params(model, params, mesh):
    """`params` on `mesh` as the predict function reads them: replicated, and a bfloat16
    model's frozen backbone in bfloat16 (`backbones.stored_in_compute_dtype`)."""
    return jax.device_put(backbones.stored_in_compute_dtype(params, model.backbone),
                          parallel.replicated(mesh))


def predict_split(ctx: Context, params, phase: Phase, split: str):
    """(predicted labels, true labels, unreadable images skipped) over one pass of a split,
    padding removed; with eval.ensemble, predicted labels is a pair: (single view,
    ensembled), from the same pass."""
    ensemble = ctx.config.eval.ensemble
    predict = make_predict_fn(ctx.model, phase, ctx.mesh)
    predict_views = (make_ensemble_predict_fn(ctx.model, phase, ctx.mesh)
                     if ensemble != "none" else None)
    params = place_params(ctx.model, params, ctx.mesh)
    limit = ctx.config.eval.max_examples
    stream = data.make_eval_stream(ctx.source, ctx.config.data, split=split,
                                   batch_size=ctx.config.eval.batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(), ensemble=ensemble,
                                   ensemble_expand=ctx.config.eval.ensemble_expand)
    preds, ens_preds, labels, seen = [], [], [], 0
    with contextlib.closing(stream):  # a `break` (eval.max_examples) stops the pipeline too
        for batch in stream:
            mask = parallel.global_batch(batch["mask"], ctx.mesh)
            label = parallel.global_batch(batch["label"], ctx.mesh)
            logits, _ = predict(params, parallel.global_batch(batch["image"], ctx.mesh))
            mask, label, logits = (np.asarray(jax.device_get(x)) for x in (
                parallel.gather(mask), parallel.gather(label), logits))
            preds.append(np.argmax(logits, -1)[mask])
            if predict_views is not None:
                mean = predict_views(params, parallel.global_batch(batch["views"], ctx.mesh))
                ens_preds.append(np.argmax(np.asarray(jax.device_get(mean)), -1)[mask])
            labels.append(label[mask])
            seen += int(mask.sum())
            if limit and seen >= limit:
                break
    end = limit or None
    preds, labels = np.concatenate(preds)[:end], np.concatenate(labels)[:end]
    if predict_views is not None:
        preds = (preds, np.concatenate(ens_preds)[:end])
    return preds, labels, getattr(stream, "num_skipped", 0)


def accuracy(ctx: Context, params, phase: Phase, split: str) -> dict:
    """The accuracy report (overall, many/medium/few under both rules, per class); with
    eval.ensemble, the ensembled one under 'ensembled' (reports.ensembled_report)."""
    t0 = time.time()
    logging.info("evaluating phase %d on the %s split", phase.number, split)
    preds, labels, skipped = predict_split(ctx, params, phase, split)
    counts, names = ctx.source.train_counts, ctx.source.class_names
    ensemble = ctx.config.eval.ensemble
    if ensemble != "none":
        preds, ens_preds = preds
    report = reports.accuracy_report(preds, labels, counts, names)
    if ensemble != "none":
        report["ensembled"] = reports.ensembled_report(
            reports.accuracy_report(ens_preds, labels, counts, names), ensemble,
            data.ENSEMBLE_VIEWS[ensemble], ctx.config.eval.ensemble_expand)
    report.update(split=split, phase=phase.number, seconds=round(time.time() - t0, 1),
                  skipped_images=int(skipped))
    return report


def evaluate(ctx: Context, params, phase: Phase, split: str, outdir: str, title: str) -> dict:
    """`accuracy`, with its table, JSON, CSV and plot written to `outdir` (process 0)."""
    preemption.raise_if_interrupted()
    report = accuracy(ctx, params, phase, split)
    preemption.raise_if_interrupted()  # before anything is written
    if jax.process_index() == 0:
        paths = reports.write_reports(outdir, report, title=title, plot=ctx.config.eval.plot)
        print(reports.markdown_table(report, title), flush=True)  # the result: stdout
        logging.info("written: %s", ", ".join(paths.values()))
        report["files"] = paths
    return report


def validation_scalars(ctx: Context, params, phase: Phase) -> dict:
    """Validation accuracy for TensorBoard: overall and many/medium/few (release rule), and
    with eval.ensemble the ensembled ones as val_<ensemble>/overall, ..."""
    report = accuracy(ctx, params, phase, "val")
    scalars = {}
    for prefix, r in (("val", report), (f"val_{ctx.config.eval.ensemble}",
                                        report.get("ensembled"))):
        if r is None:
            continue
        scalars[f"{prefix}/overall"] = r["overall"]
        for group in reports.GROUPS:
            if r["release"][group] is not None:
                scalars[f"{prefix}/{group}"] = r["release"][group]
    return scalars


# ------------------------------------------------------------------------------------------
# A trained result from a workdir or an export file.

def title(ctx: Context, phase: Phase, split: str) -> str:
    return f"{ctx.method.name.upper()} phase {phase.number} on {ctx.config.data.name} {split}"


def load_trained(ctx: Context, path: Optional[str] = None, *, with_meta: bool = False):
    """Full params with an export's trained leaves, and the export's phase (and its meta,
    `with_meta`)."""
    if path is None:
        path = rundir.latest_export(ctx.workdir, ctx.method.phases)
        if path is None:
            raise ConfigError(f"no export.npz under {ctx.workdir}/phase<n>/: train first or "
                              "pass ", Input("export"))
    try:
        params, meta = exports.apply(ctx.params, path, class_names=expected_class_names(ctx),
                                     config=ctx.config)
    except ExportError as e:
        raise e.with_hint("check ", Input("export"), " (default: the workdir's newest "
                          "phase<n>/export.npz)") from None
    if ctx.backbone_identity:  # serving's policy: only on the backbone it was trained with
        exports.check_backbone(path, meta.get("backbone"), ctx.config.backbone.checkpoint,
                               ctx.backbone_identity)
    phase = exports.phase_of(path, meta)[1]
    return (params, phase, meta) if with_meta else (params, phase)


def export_scale(ctx: Context, meta) -> float:
    """The softmax scale of predicted probabilities: the export's run's (as serving takes
    it), else this run's."""
    import ml_collections
    if isinstance(meta.get("config"), dict):
        try:
            return float(ctx.method.probability_scale(ml_collections.ConfigDict(meta["config"])))
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
    return float(ctx.method.probability_scale(ctx.config))


def evaluate_workdir(config, workdir: str, export: Optional[str] = None) -> dict:
    ctx = build_context(config, workdir, trained_head=True)  # the head is the export's
    params, phase = load_trained(ctx, export)
    split = config.eval.final_split
    return evaluate(ctx, params, phase, split, rundir.eval_dir(workdir),
                    title(ctx, phase, split))


def predict_files(config, workdir: str, files: Sequence[str],
                  export: Optional[str] = None) -> Iterator[dict]:
    """One dict per image: file, and the top-k classes with label, name, `probability`
    (softmax of the cosines times the method's scale, LPT's loss.cb.scale, as in training) and
    `score` (the cosine similarity to the class weight, in [-1, 1])."""
    ctx = build_context(config, workdir, trained_head=True)  # the head is the export's
    params, phase, meta = load_trained(ctx, export, with_meta=True)
    mesh = parallel.make_mesh(jax.devices()[:1])
    predict = make_predict_fn(ctx.model, phase, mesh)
    params = place_params(ctx.model, params, mesh)  # once, not with every chunk of files
    k = min(config.predict.top_k, ctx.source.num_classes)  # every class, at most
    scale = export_scale(ctx, meta)
    for i in range(0, len(files), config.predict.batch_size):
        chunk = list(files[i:i + config.predict.batch_size])
        logits, _ = predict(params, jnp.asarray(data.load_image_files(chunk, config.data)))
        logits = np.asarray(logits, np.float64)
        probs = np.exp(scale * (logits - logits.max(-1, keepdims=True)))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-logits, axis=-1)[:, :k]
        for f, row, lg, pr in zip(chunk, top, logits, probs):
            yield {"file": f, "top_k": [
                {"label": int(c), "name": ctx.source.class_names[c],
                 "probability": round(float(pr[c]), 5), "score": round(float(lg[c]), 5)}
                for c in row]}
