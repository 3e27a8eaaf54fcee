#!/usr/bin/env python3
"""lpt_jax command line: train (phase 1 then phase 2), evaluate, or predict.

  python run.py --config=configs/places_lt.py --workdir=gs://bucket/run1
  python run.py --config=configs/cifar100_lt.py:50 --workdir=/tmp/c100 --config.phase1.epochs=5
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=predict --files=a.jpg,b.jpg
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=predict \
      --export=birds=runs/birds/phase2/export.npz,cars=runs/cars/phase1/export.npz \
      --files=birds=a.jpg,cars=b.jpg          (several tasks on one backbone: docs/serving.md)

  python run.py --config=configs/places_lt.py --help_config    (every config field: value,
                                                               accepted values, doc, roles)

A problem the user can fix ends the run with one line on stderr, `error: <what, where, what to
do>` (the library's errors, lpt_jax/errors.py, rendered here), and an exit status:

  0    finished
  1    a config value, data set, checkpoint, export or environment problem
  2    a bad command line (unknown config field, value of the wrong type)
  3    stopped where the config asked (train.stop_after_steps), checkpoint saved: rerun the
       same command to continue
  128 + signal   preempted (SIGTERM: 143) or interrupted (SIGINT: 130), checkpoint saved

A run that fails before it saved any checkpoint leaves its workdir as it found it.
"""

import gc
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lpt_jax import cli, predict_inputs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg' (e.g. configs/cifar100_lt.py:50); "
    "override any field with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                          "train: the configured phases (config.train.phases) then the final "
                          "evaluation; eval: evaluate an export; predict: top-k labels of images.")
_EXPORT = flags.DEFINE_string("export", None, "eval/predict: an export.npz (default: the "
                              "workdir's latest phase). predict: several, comma-separated, "
                              "each 'task=path' or a path (task: its workdir's name), served on "
                              "one backbone (docs/serving.md).")
_FILES = flags.DEFINE_list("files", [], "predict: image files or folders; with several "
                           "exports 'task=path'.")
_REQUESTS = flags.DEFINE_string("requests", None, "predict with several exports: a JSON-lines "
                                'file of {"task": ..., "file": ...} instead of --files.')
_OUTPUT = flags.DEFINE_string("output", None, "predict: JSON-lines file (default: stdout).")
_HELP_CONFIG = flags.DEFINE_bool("help_config", False, "Print every field of --config (after the "
                                 "overrides): value, default, accepted values, doc and roles.")

flags.mark_flags_as_required(["config"])


def _parse_flags(argv):
    """absl's flag parsing, with unknown config fields and badly typed values reported as one
    `error:` line (config_flags raises a bare AttributeError for an unknown field). Help
    is an answer, not an error: it exits 0 (absl's own exits 1)."""
    if any(a in ("-h", "-?", "--help", "--helpshort") for a in argv[1:]):
        print(f"{__doc__}\n{flags.FLAGS.main_module_help()}")
        sys.exit(0)
    if "--helpfull" in argv[1:]:
        print(flags.FLAGS.get_help())
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # config_flags defers a config file's load error to first use
        return remaining
    except (flags.Error, AttributeError, KeyError, OSError) as e:
        print(f"error: {cli.flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the config file's own Python error
        print(f"error: {cli.config_file_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    cli.quiet_closed_loop_callbacks()
    if len(argv) > 1:
        _fail_usage(f"unexpected arguments {argv[1:]}: every input is a flag, --name=value "
                    "(see --helpshort)")
    if _HELP_CONFIG.value:
        from lpt_jax.config import schema
        print(schema.describe(_CONFIG.value))
        return
    if not _WORKDIR.value:
        _fail_usage("--workdir is required, e.g. --workdir=/tmp/run1")
    misplaced = cli.flag_outside_its_modes(_MODE.value, {
        "--export": _EXPORT.value, "--files": _FILES.value, "--requests": _REQUESTS.value,
        "--output": _OUTPUT.value})
    if misplaced:  # it would be ignored
        _fail_usage(misplaced)
    config, workdir = _CONFIG.value, _WORKDIR.value
    problem = predict_inputs.output_problem(
        workdir, _OUTPUT.value if _MODE.value == "predict" else None)
    if problem:  # before JAX and TensorFlow load: a typo costs a second, not five
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    from lpt_jax import parallel
    from lpt_jax.run import preemption
    parallel.maybe_initialize_distributed()
    preemption.raise_on_signals()
    import jax

    from lpt_jax import errors
    from lpt_jax.run import inference, rundir

    snapshot = rundir.Snapshot(workdir, _MODE.value)  # what a failure will undo

    def fail(message: str, code: int):
        if jax.process_index() == 0:
            undone = snapshot.undo()  # keeps whatever a rerun can resume from
            if undone:
                logging.info("undid this run's partial output: %s", ", ".join(undone))
        print(message, file=sys.stderr)
        sys.exit(code)

    try:
        with snapshot:
            if _MODE.value == "train":
                from lpt_jax.run import trainer  # imports TF (hidden from accelerators)
                trainer.train(config, workdir)
            elif _MODE.value == "eval":
                _refuse_ignored_settings(config, workdir, "eval",
                                         [_EXPORT.value] if _EXPORT.value else [])
                inference.evaluate_workdir(config, workdir, _EXPORT.value)
            else:
                lines = (json.dumps(row) + "\n" for row in _predict(config, workdir))
                if _OUTPUT.value:  # whole or not at all: a failure leaves no partial file
                    predict_inputs.write_lines_atomically(_OUTPUT.value, lines)
                else:
                    sys.stdout.writelines(lines)
        preemption.raise_if_interrupted()  # a signal whose exception a finalizer swallowed
    except errors.LeaseError as e:  # another run holds the workdir: what changed there is its own
        logging.error("%s: %s", type(e).__name__, e)
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except errors.Error as e:  # config, data, checkpoint, export, non-finite values
        logging.error("%s: %s", type(e).__name__, e)
        fail(f"error: {cli.one_line(e)}", 1)
    except OSError as e:  # the environment: disk full, read-only or missing folders
        logging.error("%s: %s", type(e).__name__, e)
        fail(f"error: {cli.os_error_line(e)}", 1)
    except errors.Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except errors.Preempted as e:
        logging.warning("%s", e)
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (KeyboardInterrupt, errors.Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        fail(f"interrupted by {signal.Signals(signum).name} outside the train loop: saved "
             "checkpoints and exports are kept; rerun the same command to continue",
             128 + signum)
    # Shutdown would garbage-collect the ~400k objects TF and JAX made, only to free memory
    # the OS takes back anyway: 1-3 s of silence after the table on a busy machine.
    gc.freeze()


def _predict(config, workdir):
    """The rows of --mode=predict: one export (single-task) or several on one backbone."""
    from lpt_jax.errors import ConfigError
    from lpt_jax.run import inference
    plan = predict_inputs.predict_plan(_EXPORT.value, _FILES.value, _REQUESTS.value)
    if plan is None:  # one export: the single-task path
        _refuse_ignored_settings(config, workdir, "predict",
                                 [_EXPORT.value] if _EXPORT.value else [])
        files = predict_inputs.existing_files(_FILES.value)
        if not files:
            raise ConfigError("--mode=predict needs --files (image files or folders)")
        predict_inputs.refuse_output_over_inputs(
            _OUTPUT.value, workdir, config, cli.config_file(sys.argv),
            [_EXPORT.value] if _EXPORT.value else [], None, files)
        return inference.predict_files(config, workdir, files, _EXPORT.value)
    predict_inputs.refuse_output_over_inputs(
        _OUTPUT.value, workdir, config, cli.config_file(sys.argv), list(plan[0].values()),
        _REQUESTS.value, [f for _, f in plan[1]])
    from lpt_jax import (
        serving,  # several tasks on one backbone, every export and request checked first
    )
    from lpt_jax.config import schema
    from lpt_jax.run import exports as exports_lib
    settings = serving.cli_settings(config)
    recorded = [exports_lib.read(p)[1].get("config") or {} for p in plan[0].values()]
    unread = [p for p, _, _ in schema.of(config).walk() if p not in settings]
    stray = cli.ignored_overrides(sys.argv, config, unread, recorded)
    if stray:  # it would be ignored: each task's settings come from its export
        raise ConfigError(f"{stray[0]}: with several exports every setting comes from each "
                          "export; the command line sets only "
                          + ", ".join(f"--config.{f}" for f in settings))
    return serving.predict_requests(config, *plan)


def _refuse_ignored_settings(config, workdir: str, mode: str, exports: list):
    """Evaluation and prediction take the model and its head from the export(s): a setting
    only training reads, given another value than the export's run had, would be ignored, so
    it is refused (as a setting several exports decide is)."""
    from lpt_jax.config import schema
    from lpt_jax.config.fields import TRAINING
    from lpt_jax.errors import ConfigError
    from lpt_jax.method import registry
    from lpt_jax.run import exports as exports_lib
    from lpt_jax.run import rundir
    if not cli.overrides_outside(sys.argv, ()):
        return
    paths = exports or [rundir.latest_export(workdir, registry.of(config).phases)]
    recorded = [exports_lib.read(p)[1].get("config") or {} for p in paths if p]
    stray = cli.ignored_overrides(sys.argv, config, schema.fields(config, TRAINING), recorded)
    if stray:
        raise ConfigError(f"{stray[0]}: --mode={mode} takes it from the export ({paths[0]}), "
                          "whose run had another value; it only shapes training: drop it")


def _fail_usage(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
