#!/usr/bin/env python3
"""lpt_jax command line: train (phase 1 then phase 2), evaluate, or predict.

  python run.py --config=configs/places_lt.py --workdir=gs://bucket/run1
  python run.py --config=configs/cifar100_lt.py:50 --workdir=/tmp/c100 --config.phase1.epochs=5
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval
  python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=predict --files=a.jpg,b.jpg
"""

import json
import logging as logging_std
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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


def main(argv):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lpt_jax import parallel
    parallel.maybe_initialize_distributed()
    from lpt_jax import train  # imports TF (hidden from accelerators) and JAX
    from lpt_jax.backbone import CheckpointError
    from lpt_jax.data import DataError

    config, workdir = _CONFIG.value, _WORKDIR.value
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except train.Preempted as e:
        logging.warning("%s", e)
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    app.run(main)
