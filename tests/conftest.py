"""Test-wide setup: 8 simulated CPU devices (set before JAX starts), quiet TensorFlow, one JAX
compile cache per run, and the fixtures for data kept in ../shared.

Constants and plain helpers are in helpers.py.
"""

import collections
import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny programs: share them through JAX's persistent cache, with
# the run.py / worker subprocesses too (they inherit the environment). The folder is this
# run's and is removed when it ends (pytest_sessionfinish); LPT_TEST_JAX_CACHE names a
# folder of the user's instead, which is kept.
_USER_CACHE = os.environ.get("LPT_TEST_JAX_CACHE")
_CACHE = _USER_CACHE or tempfile.mkdtemp(prefix="lpt_jax_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402
import pytest  # noqa: E402

from helpers import CIFAR10_TARBALL, SHARED_SPLITS, require_shared  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The files that take longest (seconds on an idle 2-core machine, `--durations`), run first:
# with `-n 2 --dist loadfile` the two workers take files in collection order, and xdist's
# default order (most tests first) left a long file with few tests (test_multiprocess) for the
# end, with the other worker idle. Longest first keeps both busy to the end.
SLOW_FIRST = ("test_train", "test_multiprocess", "test_bad_inputs", "test_preemption",
              "test_gcs", "test_lease_e2e", "test_places_config", "test_backbone",
              "test_toy_backbone", "test_toy_phase", "test_demo", "test_lift", "test_siglip")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    del session, config
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: files whole


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    if not _USER_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason, with its count (on a clone without ../shared: 2 lines for
    23 tests). -rs would list every skipped test: pytest reports a fixture's skip at the test."""
    if terminalreporter.hasopt("s"):  # -rs / -ra already list them
        return
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"SKIPPED [{count}] {reason}")


# ------------------------------------------------------------------------------------------
# Data from ../shared: every test that needs it skips through these (helpers.require_shared).

@pytest.fixture(scope="session")
def cifar10_tarball():
    """The CIFAR-10 JPEG tarball (train/<class>/*.jpg, test/<class>/*.jpg)."""
    return require_shared(CIFAR10_TARBALL, "the CIFAR-10 JPEG tarball")


@pytest.fixture(scope="session")
def shared_splits():
    """The original split lists of Places-LT, ImageNet-LT and iNaturalist 2018."""
    return require_shared(SHARED_SPLITS, "the original LT split lists")


@pytest.fixture(scope="session")
def cifar10_tree(cifar10_tarball, tmp_path_factory):
    """Factory: `cifar10_tree(train_counts, eval_per_class, eval_splits=("test",))` -> the
    root of a new long-tailed image folder of real CIFAR-10 JPEGs cut from the tarball
    (lpt_jax.data.testing.cifar10_tree), the same eval images in every split of `eval_splits`."""
    from lpt_jax.data import testing  # pylint: disable=import-outside-toplevel

    def make(train_counts, eval_per_class=0, eval_splits=("test",)):
        root = tmp_path_factory.mktemp("cifar10_tree")
        testing.cifar10_tree(str(cifar10_tarball), str(root), train_counts, eval_per_class,
                             eval_split=eval_splits[0])
        for split in eval_splits[1:]:
            shutil.copytree(root / eval_splits[0], root / split)
        return root
    return make


# ------------------------------------------------------------------------------------------
# Deprecations: one our code causes fails its test; the libraries' own stay visible.
#
# A library warns from its own frame (optax.global_norm warns in optax), so a filter on the
# warning's module cannot tell "we call a deprecated API" from "orbax calls one of jax's".
# The call stack can: leave the package that issued the warning, and look at who called it.

_OURS = ("lpt_jax", "configs")


def _package(frame) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".")[0]


def _calling_frame(frame):
    """The frame whose code called into the package that issued a warning (the issuing frame
    itself where that package is ours); `frame` is the one that called warnings.warn."""
    while frame is not None and _package(frame) in ("warnings", "_py_warnings"):
        frame = frame.f_back
    if frame is None or _package(frame) in _OURS:
        return frame
    issuer = _package(frame)
    while frame is not None and _package(frame) == issuer:
        frame = frame.f_back
    return frame


def deprecation_caller(frame) -> str:
    """The top-level package of `_calling_frame(frame)` ('' where there is none)."""
    caller = _calling_frame(frame)
    return _package(caller) if caller is not None else ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    ours = []
    impl = getattr(warnings, "_showwarnmsg_impl", None)  # pytest's recorder for this test

    def record(msg):
        if issubclass(msg.category, (DeprecationWarning, PendingDeprecationWarning)):
            caller = _calling_frame(sys._getframe(1))
            if caller is not None and _package(caller) in _OURS:
                ours.append(f"{caller.f_code.co_filename}:{caller.f_lineno}: {msg.message}")
        impl(msg)

    if impl is not None:
        warnings._showwarnmsg_impl = record
    try:
        result = yield
    finally:
        if impl is not None:
            warnings._showwarnmsg_impl = impl
    if ours:
        pytest.fail("our code calls a deprecated API:\n" + "\n".join(ours), pytrace=False)
    return result
