"""Long-tailed data pipelines: dataset registry, dual-sampling and eval streams.

    from lpt_jax import data
    cfg = data.default_config()
    src = data.get_source(cfg)
    it = data.make_train_stream(src, cfg, global_batch_size=256, seed=0)

The package is lazy (PEP 562): `import lpt_jax.data` and `data.default_config()` load
neither TensorFlow nor the dataset modules; a public name imports its submodule on
first use. TensorFlow is imported (with the accelerators hidden from it) by the
submodules that need it, through `lpt_jax.data._tf`; the dataset modules register
their sources when `get_source` / `registered_sources` is first called.
"""

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "default_config": "config",

    "GROUP_NAMES": "groups",
    "cifar_lt_counts": "groups",
    "shot_groups": "groups",
    "steps_per_epoch": "groups",
    "DualSampler": "sampling",
    "Source": "source",
    "SplitData": "source",
    "get_source": "source",
    "registered_sources": "registry",
    "ENSEMBLE_VIEWS": "preprocess",
    "EvalStream": "eval_stream",
    "TrainStream": "streams",
    "load_image_files": "eval_stream",
    "make_eval_stream": "eval_stream",
    "make_train_stream": "streams",
    "num_eval_examples": "eval_stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never runs
    from lpt_jax.data.config import default_config  # noqa: F401
    from lpt_jax.data.eval_stream import (  # noqa: F401
        EvalStream,
        load_image_files,
        make_eval_stream,
        num_eval_examples,
    )
    from lpt_jax.data.groups import GROUP_NAMES, cifar_lt_counts, shot_groups, steps_per_epoch  # noqa: F401
    from lpt_jax.data.preprocess import ENSEMBLE_VIEWS  # noqa: F401
    from lpt_jax.data.registry import registered_sources  # noqa: F401
    from lpt_jax.data.sampling import DualSampler  # noqa: F401
    from lpt_jax.data.source import Source, SplitData, get_source  # noqa: F401
    from lpt_jax.data.streams import TrainStream, make_train_stream  # noqa: F401
