"""`lpt_jax.data` is lazy: a config loads without TensorFlow; sources still register."""

import subprocess
import sys
import textwrap

import pytest

from lpt_jax import data

from helpers import REPO

# Run in a fresh interpreter: the test process has loaded TensorFlow long ago.
_CHECK = textwrap.dedent("""
    import sys

    import lpt_jax.data.config
    lpt_jax.data.config.default_config()
    from lpt_jax import data
    cfg = data.default_config()
    data.shot_groups, data.steps_per_epoch, data.cifar_lt_counts
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
    assert not loaded, f"loading the data config imported {loaded[:5]}"

    from lpt_jax import data
    assert callable(data.get_source)
    names = data.registered_sources()
    assert {"cifar10_lt", "cifar100_lt", "image_folder", "imagenet_lt", "inaturalist2018",
            "places_lt"} <= set(names), names
    import tensorflow as tf
    assert tf.config.get_visible_devices("GPU") == [], "TF must not see JAX's GPUs"
    print("ok")
""")


def test_config_does_not_import_tensorflow_and_sources_register():
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_public_name_resolves():
    for name in data.__all__:
        assert getattr(data, name) is not None, name
    assert set(data.__all__) <= set(dir(data))
    assert data.get_source is data.source.get_source  # the submodule's object, not a copy
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        data.not_a_name  # noqa: B018  pylint: disable=pointless-statement
