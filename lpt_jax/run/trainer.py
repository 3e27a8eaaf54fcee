"""The trainer: the configured phases of the method in order, each resumable, then the final table.

    train(config, workdir)
      check the workdir and build the context (every early check, before any write)
      for each phase:  run_phase  ->  validation report (val split, never test)
      final evaluation on config.eval.final_split -> workdir/results/

    run_phase(ctx, phase, params)
      start from the previous phase's export (phase 2: the shared prompt and head of phase 1)
      build the phase's train step (steps.py), restore the latest checkpoint if any
      loop: batch -> step -> progress / validation / checkpoint, until done or preempted
      write the phase's export and return the params with what it trained
"""

from __future__ import annotations

import json
import signal

import jax
from absl import logging

from lpt_jax import data, parallel, tree
from lpt_jax.errors import ConfigError, ExportError, Preempted, Setting, Stopped
from lpt_jax.method import registry, steps
from lpt_jax.method.phases import Phase
from lpt_jax.run import exports, inference, lease, preemption, rundir
from lpt_jax.run.checkpoint import PhaseCheckpointer
from lpt_jax.run.context import Context, build_context, expected_class_names
from lpt_jax.run.preemption import PreemptionWatch
from lpt_jax.run.progress import Progress, make_writer
from lpt_jax.storage import files


def train(config, workdir: str) -> dict:
    """Runs the configured phases, then the final evaluation; returns the final report.
    Holds the workdir's lease throughout: another live run on it is refused (LeaseError)."""
    with lease.hold(workdir):
        return _train(config, workdir)


def _train(config, workdir: str) -> dict:
    phases = registry.of(config).parse_phases(config.train.phases)
    rundir.check_config(config, workdir)
    ctx = build_context(config, workdir)
    identity = rundir.run_identity(config, ctx.backbone_identity, ctx.source.identity())
    rundir.check_inputs(config, workdir, identity)
    if jax.process_index() == 0:  # every early check passed: the first write
        rundir.record(workdir, identity)  # kept as first written (allow_config_change too)
    logging.info("data: %s, %d classes, %d training images; devices: %d (%s), processes: %d",
                 config.data.name, ctx.source.num_classes, ctx.source.num_train,
                 ctx.mesh.devices.size, jax.devices()[0].platform, jax.process_count())
    params = ctx.params
    for phase in phases:
        params = run_phase(ctx, phase, params, first=phase is phases[0])
        preemption.raise_if_interrupted()
        if "val" in ctx.source.splits:  # model selection looks at val, never at test
            inference.evaluate(ctx, params, phase, "val", rundir.val_dir(workdir, phase),
                               f"phase {phase.number}, val")
    final, split = phases[-1], config.eval.final_split
    return inference.evaluate(ctx, params, final, split, rundir.results_dir(workdir),
                              inference.title(ctx, final, split))


def phase_schedule(config, phase: Phase, num_train: int) -> tuple[int, int, int]:
    """(batch_size, steps_per_epoch, total_steps) of a phase."""
    section = phase.section(config)
    spe = data.steps_per_epoch(num_train, section.batch_size)
    total = spe * section.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    return section.batch_size, spe, total


def run_phase(ctx: Context, phase: Phase, params: dict, *, first: bool = True) -> dict:
    """Trains one phase (resuming if a checkpoint exists); returns the full param tree.
    `first`: no earlier phase ran in this invocation (train.start_export may name the export
    it starts from)."""
    config, mesh, workdir = ctx.config, ctx.mesh, ctx.workdir
    if phase.starts_from:
        params = _start_from(ctx, params, phase, first)
    batch_size, spe, total = phase_schedule(config, phase, ctx.source.num_train)
    done = _finished(ctx, params, phase, total)
    if done is not None:
        logging.info("phase %d already finished (%s): skipping", phase.number,
                     rundir.export_path(workdir, phase))
        return done

    train_step = steps.make_train_step(ctx.model, phase, config,
                                       class_counts=ctx.source.train_counts,
                                       steps_per_epoch=spe, batch_size=batch_size)
    state, frozen = jax.device_put(train_step.init(params), parallel.replicated(mesh))
    ckpt = PhaseCheckpointer(rundir.checkpoint_dir(workdir, phase),
                             every_steps=config.train.checkpoint_every_steps,
                             keep=config.train.keep_checkpoints)
    resumed = ckpt.restore_latest_good(jax.eval_shape(lambda: state))  # verified
    start = resumed[0] if resumed else 0
    if resumed:
        logging.info("phase %d: resuming from step %d", phase.number, start)
        state = jax.device_put(resumed[1], parallel.replicated(mesh))
    step_fn = train_step.jit(mesh)
    stream = data.make_train_stream(ctx.source, config.data, global_batch_size=batch_size,
                                    seed=phase.seed(config), start_step=start,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    streams=ctx.method.streams(config))  # only what it reads
    writer = make_writer(rundir.phase_dir(workdir, phase))
    images_per_step = batch_size * len(ctx.method.streams(config))
    progress = Progress(phase.number, total, spe, images_per_step, writer,
                        config.train.log_every_steps, config.train.on_nonfinite,
                        latest_checkpoint=ckpt.latest_step)
    validate_every = spe * config.eval.every_epochs if "val" in ctx.source.splits else 0
    meta = {"phase": phase.number, "total_steps": total, "steps_per_epoch": spe}
    stop_after, step = config.train.stop_after_steps, start
    progress.start(start)
    try:
        with PreemptionWatch() as preemption:
            for step in range(start + 1, total + 1):  # `step`: steps done after this one
                state, metrics = step_fn(state, frozen, parallel.global_batch(next(stream), mesh))
                last = step == total
                preempted = preemption.reached(step)
                stop = preempted or bool(stop_after and step - start >= stop_after)
                progress.add(step, metrics, force=last or stop)
                if jax.process_count() == 1:  # (with several, process 0 alone would stop)
                    lease.check_held(workdir)  # taken over by another run: write no more
                if validate_every and step % validate_every == 0 and not last:
                    writer.write_scalars(step, inference.validation_scalars(
                        ctx, tree.merge(state["trainable"], frozen), phase))
                ckpt.save(step, state, meta, force=last or stop)
                if stop and not last:
                    where = f"phase {phase.number} stopped at step {step}"
                    if preempted:
                        raise Preempted(f"{where} on {signal.Signals(preemption.signum).name}; "
                                        "checkpoint saved, rerun the same command to resume",
                                        preemption.signum)
                    raise Stopped(f"{where} (train.stop_after_steps); checkpoint saved, rerun "
                                  "the same command to continue")
    finally:  # a started checkpoint write always completes (or is cleaned up on restart)
        ckpt.close()
        skipped = getattr(stream, "num_skipped", 0)
        if skipped:
            logging.warning("phase %d: %d unreadable training images were skipped "
                            "(data.corrupt_images='skip')", phase.number, skipped)
            writer.write_scalars(step, {"skipped_images": float(skipped)})
        writer.flush()
        stream.close()  # stop tf.data's threads now: never left to interpreter exit

    result = tree.merge(jax.device_get(state["trainable"]), jax.device_get(frozen))
    if jax.process_index() == 0:
        exports.write(rundir.export_path(workdir, phase),
                      exports.exported_subtree(result, phase, ctx.method),
                      _export_meta(ctx, phase, total))
    parallel.sync("export")
    return result


def _start_from(ctx: Context, params: dict, phase: Phase, first: bool) -> dict:
    """`params` with the export of the phase this one starts from put in."""
    previous = ctx.method.phase(phase.starts_from)
    given = ctx.config.train.start_export if first else ""
    path = given or rundir.export_path(ctx.workdir, previous)
    if not files.exists(path):
        raise ConfigError(
            f"phase {phase.number} needs the result of phase {previous.number}, and {path} does "
            f"not exist: run phase {previous.number} first (",
            Setting("train.phases", f"{previous.number},{phase.number}"), ") or point ",
            Setting("train.start_export"), " at an export.npz", path=path,
            field="train.start_export")
    try:
        return exports.apply(params, path, previous, class_names=expected_class_names(ctx),
                             config=ctx.config)[0]
    except ExportError as e:
        raise e.with_hint("check ", Setting("train.start_export"), " (default: the workdir's "
                          f"{previous.name}/export.npz)", field="train.start_export") from None


def _finished(ctx: Context, params: dict, phase: Phase, total: int):
    """The params with this phase's export put in, if that export is of a finished run."""
    path = rundir.export_path(ctx.workdir, phase)
    if not files.exists(path):
        return None
    finished, meta = exports.apply(params, path, phase, config=ctx.config)
    return finished if meta.get("step") == total else None


def _export_meta(ctx: Context, phase: Phase, step: int) -> dict:
    return {"method": ctx.method.name, "phase": phase.number, "step": step,
            "config": json.loads(ctx.config.to_json_best_effort()),
            "backbone": ctx.backbone_identity, "num_classes": ctx.source.num_classes,
            "class_names": list(ctx.source.class_names)}
