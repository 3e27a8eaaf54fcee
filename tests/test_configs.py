"""The shipped configs: the spec's constants, the ':arg' form, and command-line overrides."""

import importlib.util
from pathlib import Path

import pytest

from lpt_jax.optim import epoch_learning_rates

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", ["places_lt", "imagenet_lt", "inaturalist2018", "cifar100_lt"])
def test_benchmark_configs_follow_the_spec(name):
    c = _load(name)
    assert c.data.name == name
    assert (c.model.vit.variant, c.model.vit.image_size) == ("B/16", 224)
    assert (c.model.vit.layernorm_epsilon, c.model.vit.gelu_approximate) == (1e-5, False)
    assert c.model.vit.pool_type == "tok"
    lpt = c.model.lpt
    assert (lpt.prompt_length, lpt.pool_size, lpt.shared_depth, lpt.top_k) == (10, 20, 6, 2)
    assert (lpt.head_dropout, lpt.prompt_init_std) == (0.1, 0.02)
    assert (c.loss.cb.gamma_pos, c.loss.cb.gamma_neg) == (0.0, 4.0)
    assert (c.loss.ib.gamma_pos, c.loss.ib.gamma_neg) == (0.5, 8.0)
    for b in (c.loss.cb, c.loss.ib):
        assert (b.name, b.scale, b.margin, b.label_smoothing) == ("agcl", 20.0, 0.1, 0.1)
        assert (b.cloud_weight, b.cloud_std) == (0.5, 1 / 3)
    assert c.loss.match_weight == 0.5
    o = c.optim
    assert (o.base_lr, o.lr_reference_batch, o.momentum, o.weight_decay) == (0.02, 256, 0.9, 0.01)
    assert c.phase1.batch_size == c.phase2.batch_size == 256
    assert (c.data.image_size, c.data.resize_size, c.data.cb_images_per_class) == (224, 256, 4)
    assert c.backbone.checkpoint.startswith("gs://vit_models/augreg/B_16-i21k-300ep")
    assert c.eval.final_split != c.data.eval_split or name in ("cifar100_lt", "inaturalist2018")


def test_spec_learning_rates():
    want = [1e-6, 0.0195106, 0.0180902, 0.0158779, 0.0130902, 0.01, 0.0069098, 0.0041221,
            0.0019098, 0.0004894]
    got = epoch_learning_rates(0.02, 10)
    assert got == pytest.approx(want, abs=5e-7)


@pytest.mark.parametrize("arg,ratio", [(None, 100), ("50", 50), ("10", 10)])
def test_cifar_arg_is_the_imbalance_ratio(arg, ratio):
    assert _load("cifar100_lt", arg).data.imbalance_ratio == ratio

# Command-line overrides and their errors are exercised through run.py in test_bad_inputs.py
# (unknown field, wrong type) and test_preemption.py (overrides that change the run).
