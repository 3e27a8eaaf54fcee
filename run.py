#!/usr/bin/env python3
"""lpt_jax command line: train (phase 1 then phase 2), evaluate, or predict.

  python run.py --config=configs/places_lt.py --workdir=gs://bucket/run1
  python run.py --config=configs/cifar100_lt.py:50 --workdir=/tmp/c100 --config.phase1.epochs=5
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=predict --files=a.jpg,b.jpg

A problem the user can fix ends the run with one line on stderr, `error: <what, where, what to
do>`, and an exit status: 2 for a bad command line (unknown config field, value of the wrong
type), 1 for a config value, data set or checkpoint that cannot work, 143 after a preemption
(checkpoint saved). A run that fails before it saved any checkpoint leaves its workdir as it
found it.
"""

import difflib
import importlib.util
import json
import logging as logging_std
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import platform  # noqa: E402

platform.configure_for_cpu()  # XLA CPU options measured in benchmarks/ (before JAX starts)

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg' (e.g. configs/cifar100_lt.py:50); "
    "override any field with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                          "train: the configured phases (config.train.phases) then the final "
                          "evaluation; eval: evaluate an export; predict: top-k labels of images.")
_EXPORT = flags.DEFINE_string("export", None, "eval/predict: an export.npz (default: the "
                              "workdir's latest phase).")
_FILES = flags.DEFINE_list("files", [], "predict: image files or folders.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: JSON-lines file (default: stdout).")

flags.mark_flags_as_required(["config", "workdir"])

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _expand(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                out += [os.path.join(root, n) for n in sorted(names)
                        if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            out.append(p)
    return out


class _QuietLibraries(logging_std.Filter):
    """Orbax and TF log every checkpoint step at INFO: keep their warnings only."""

    def filter(self, record):
        noisy = ("orbax", "tensorflow", "jax._src", "clu/platform")
        return record.levelno >= logging_std.WARNING or not any(
            n in record.pathname for n in noisy)


# ------------------------------------------------------------------------------------------
# Command-line errors: one line naming the flag, the field and what it accepts.

def _config_arg(argv):
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv):
    """[(field path, argument as typed)] of the --config.a.b=value arguments."""
    out = []
    for a in argv:
        m = re.match(r"^--?(?:no)?config\.([^=\s]+)", a)
        if m:
            out.append((m.group(1), a))
    return out


def _load_config(spec):
    """The config a --config=file[:arg] value names, loaded as config_flags does; None if that
    fails (the error path then falls back to absl's message)."""
    path, *arg = spec.split(":", 1)
    try:
        module_spec = importlib.util.spec_from_file_location("lpt_run_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(*arg)
    except Exception:  # noqa: BLE001 - only used to word an error better
        return None


def _unknown_field(config, path):
    """'config.a has no field b; did you mean ...' for the first missing part of `path`."""
    node, walked = config, "config"
    for part in path.split("."):
        if not isinstance(node, (ConfigDict, dict)):
            return f"{walked} is a value ({node!r}), not a section: it has no field {part!r}"
        if part not in node:
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1)
            hint = (f"did you mean {walked}.{close[0]}?" if close
                    else f"{walked} has: {', '.join(keys)}")
            return f"{walked} has no field {part!r}; {hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _field(config, path):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _expected(value):
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, (tuple, list)):
        return "a tuple, e.g. '(\"a\", \"b\")' or the flag repeated once per item"
    return {int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def _flag_error(err, argv):
    """One line for a command line that absl / config_flags rejected."""
    spec = _config_arg(argv)
    text = str(err).strip()
    config = _load_config(spec) if spec else None
    if config is not None:
        for path, arg in _overrides(argv):
            unknown = _unknown_field(config, path)
            if unknown:
                return f"{arg}: {unknown}"
        m = re.match(r"flag --config\.([^=\s]+)=(.*?): (.*)", text.splitlines()[0] if text else "")
        if m:
            path, value, why = m.groups()
            try:
                default = _field(config, path)
                return (f"--config.{path}={value}: expected {_expected(default)}, like the "
                        f"config's {default!r} ({why.strip('()')})")
            except (KeyError, AttributeError):
                pass
    missing = re.search(r"Flag --(\w+) must have a value other than None", text)
    if missing:
        example = {"config": "configs/places_lt.py", "workdir": "/tmp/run1"}.get(missing.group(1))
        return f"--{missing.group(1)} is required" + (
            f", e.g. --{missing.group(1)}={example}" if example else "")
    if isinstance(err, OSError):
        return f"--config={spec}: cannot load the config file ({text.splitlines()[-1].strip()})"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{first} (see --helpshort)"


def _parse_flags(argv):
    """absl's flag parsing, with unknown config fields and badly typed values reported as one
    `error:` line (config_flags raises a bare AttributeError for an unknown field)."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # config_flags defers a config file's load error to first use
        return remaining
    except (flags.Error, AttributeError, KeyError, OSError) as e:
        text = str(e)
        if "Traceback" in text:  # a Python error inside the config file: its trace helps
            print(text, file=sys.stderr)
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------
# Errors during the run: one line, and no half-written workdir.

# What to check, for error types whose messages cannot know the config fields behind them.
_HINTS = {"CheckpointError": "check --config.backbone.checkpoint and --config.model.vit "
                             "(variant, or width/depth/patch_size/image_size)"}
_MAX_LINE = 400


def _one_line(err):
    """The error as one line: detail lines of the form 'what (n): a; b; ...' shrink to
    'what (n), e.g. a' (the full message goes to the log)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    parts = lines[:1]
    for line in lines[1:]:
        m = re.match(r"(.+?\(\d+\)): (.*)", line)
        parts.append(f"{m.group(1)}, e.g. {m.group(2).split('; ')[0]};" if m else line)
    text = " ".join(parts).rstrip(";") or type(err).__name__
    if len(text) > _MAX_LINE:
        text = text[:_MAX_LINE].rstrip() + " ... (full message in the log above)"
    hint = _HINTS.get(type(err).__name__)
    return f"{text}; {hint}" if hint else text


# A new entry like these means the failed invocation made progress worth resuming from.
_PROGRESS = re.compile(r"phase\d+/(checkpoints/\d+|export\.npz)")


def _entries(workdir):
    """Relative paths of every file and folder under `workdir`; None if it does not exist."""
    import tensorflow as tf
    if not tf.io.gfile.isdir(workdir):
        return None
    found = set()
    for root, dirs, files in tf.io.gfile.walk(workdir):
        rel = root[len(workdir.rstrip("/")):].strip("/")
        for name in list(dirs) + list(files):
            found.add(f"{rel}/{name.strip('/')}".strip("/"))
    return found


def _read_bytes(path):
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _undo_outputs(workdir, before, config_json):
    """Removes what this invocation added to `workdir` and puts back the run's config.json
    (`allow_config_change` rewrites it), unless the invocation saved a checkpoint or an
    export: then a rerun resumes from it. Returns what was removed or restored."""
    import tensorflow as tf
    after = _entries(workdir)
    if after is None:
        return []
    new = after - (before or set())
    if any(_PROGRESS.fullmatch(p) for p in new):
        logging.warning("keeping the checkpoints this run saved in %s: rerun the same command "
                        "to resume once the problem is fixed", workdir)
        return []
    if before is None:  # the workdir itself is new
        tf.io.gfile.rmtree(workdir)
        return [workdir]
    undone = sorted(p for p in new if os.path.dirname(p) not in new)
    for p in undone:
        full = os.path.join(workdir, p)
        if tf.io.gfile.isdir(full):
            tf.io.gfile.rmtree(full)
        elif tf.io.gfile.exists(full):
            tf.io.gfile.remove(full)
    path = os.path.join(workdir, "config.json")
    if config_json is not None and _read_bytes(path) != config_json:
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(config_json)
        undone.append("config.json (restored)")
    return undone


def main(argv):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lpt_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax

    from lpt_jax import train  # imports TF (hidden from accelerators) and JAX
    from lpt_jax.backbone import CheckpointError
    from lpt_jax.data import DataError

    config, workdir = _CONFIG.value, _WORKDIR.value
    before = _entries(workdir)
    config_json = _read_bytes(os.path.join(workdir, "config.json")) if before else None
    try:
        if _MODE.value == "train":
            train.train(config, workdir)
        elif _MODE.value == "eval":
            train.evaluate_workdir(config, workdir, _EXPORT.value)
        else:
            files = _expand(_FILES.value)
            if not files:
                raise train.ConfigError("--mode=predict needs --files (image files or folders)")
            out = open(_OUTPUT.value, "w") if _OUTPUT.value else sys.stdout
            for row in train.predict_files(config, workdir, files, _EXPORT.value):
                out.write(json.dumps(row) + "\n")
            if out is not sys.stdout:
                out.close()
    except (train.ConfigError, DataError, CheckpointError, train.NonFiniteError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        if jax.process_index() == 0:
            undone = _undo_outputs(workdir, before, config_json)
            if undone:
                logging.info("undid this run's partial output: %s", ", ".join(undone))
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except train.Preempted as e:
        logging.warning("%s", e)
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
