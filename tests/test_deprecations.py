"""Deprecated APIs: our code calls none (a call fails the test that makes it, through
conftest.py's hook), while a library's own deprecations stay visible (README "Environments")."""

from __future__ import annotations

import sys
import warnings

import jax
import numpy as np
from conftest import deprecation_caller

from configs.common import base_config
from lpt_jax.method import steps
from lpt_jax.method.lpt import PHASES
from lpt_jax.method.lpt_model import lpt_from_config

from helpers import TINY_VIT


def _in_module(module_name: str, source: str, **names):
    """The function `source` defines, compiled as if it were code of module `module_name`."""
    scope = {"__name__": module_name, "warnings": warnings, "sys": sys, **names}
    exec(source, scope)
    return scope["f"]


def _frame_that_warned(*callers: str):
    """Calls a deprecated function of `somelib._src` through a function of each module in
    `callers` (outermost first); returns the frame that called warnings.warn."""
    fn = _in_module("somelib._src.linear_algebra",
                    "def f():\n    warnings.warn('old() is deprecated', DeprecationWarning)\n"
                    "    return sys._getframe(0)\n")
    for module_name in reversed(callers):
        fn = _in_module(module_name, "def f():\n    return inner()\n", inner=fn)
    with warnings.catch_warnings():  # only the frame matters here, not the warning
        warnings.simplefilter("ignore")
        return fn()


def test_the_caller_of_a_deprecated_api_is_who_crossed_into_the_library():
    assert deprecation_caller(_frame_that_warned("lpt_jax.method.steps", "somelib.api")) \
        == "lpt_jax"  # we call somelib: ours
    assert deprecation_caller(_frame_that_warned("lpt_jax.run", "orbax.checkpoint",
                                                 "somelib.api")) == "orbax"  # theirs
    assert deprecation_caller(_frame_that_warned("configs.common")) == "configs"
    own = _in_module("lpt_jax.tree", "def f():\n    return sys._getframe(0)\n")()
    assert deprecation_caller(own) == "lpt_jax"  # a deprecation we issue ourselves


def test_the_train_step_calls_no_deprecated_api():
    """Tracing both phases' steps: optax.global_norm (deprecated since optax 0.2.5) made this
    fail (conftest's hook turns the deprecation into a test failure)."""
    c = base_config()
    c.model.vit.update(dict(TINY_VIT, depth=2))
    c.model.lpt.update(dict(prompt_length=2, pool_size=4, shared_depth=1))
    model = lpt_from_config(c.model, 4)
    images = np.zeros((4, 32, 32, 3), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params)
    labels = np.arange(4, dtype=np.int32)
    batch = {b: {"image": images, "label": labels} for b in ("cb", "ib")}
    for phase in PHASES:
        ts = steps.make_train_step(model, phase, c, class_counts=np.array([8, 4, 2, 1]),
                                   steps_per_epoch=2, batch_size=4)
        state, frozen = ts.init(params)
        jax.eval_shape(ts.fn, state, frozen, batch)
