"""The shipped configs: the spec's constants, the ':arg' form, and command-line overrides."""

import subprocess
import sys

import pytest

from lpt_jax.method.optim import epoch_learning_rates

from helpers import CONFIGS, REPO, load_config


def _load(name, arg=None):
    return load_config(CONFIGS / f"{name}.py", arg)


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
    # The table's split: iNaturalist 2018 reports on its official val split (it has no test).
    assert c.eval.final_split == ("val" if name == "inaturalist2018" else "test")
    assert c.model.backbone == "vit"


def test_spec_learning_rates():
    want = [1e-6, 0.0195106, 0.0180902, 0.0158779, 0.0130902, 0.01, 0.0069098, 0.0041221,
            0.0019098, 0.0004894]
    got = epoch_learning_rates(0.02, 10)
    assert got == pytest.approx(want, abs=5e-7)


@pytest.mark.parametrize("warmup,head", [
    # timm CosineLRScheduler (the release's): warmup_lr + e * (lr - warmup_lr) / W for e < W,
    # then the cosine over the whole run; values worked out by hand from that formula
    (2, [1e-6, 1e-6 + 0.019999 / 2, 0.0180902]),
    (3, [1e-6, 1e-6 + 0.019999 / 3, 1e-6 + 2 * 0.019999 / 3, 0.0158779]),
    (0, [0.02, 0.0195106]),
])
def test_warmup_longer_than_one_epoch_ramps_like_timm(warmup, head):
    got = epoch_learning_rates(0.02, 10, warmup_lr=1e-6, warmup_epochs=warmup)
    assert got[:len(head)] == pytest.approx(head, abs=5e-7)
    assert got[-1] == pytest.approx(0.0004894, abs=5e-7)  # the cosine does not shift


@pytest.mark.parametrize("arg,ratio", [(None, 100), ("50", 50), ("10", 10)])
def test_cifar_arg_is_the_imbalance_ratio(arg, ratio):
    assert _load("cifar100_lt", arg).data.imbalance_ratio == ratio


SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "common"))


def test_loading_a_config_imports_no_tensorflow():
    import subprocess
    import sys
    code = ("import importlib, sys\n"
            f"for name in {SHIPPED!r}:\n"
            "    importlib.import_module('configs.' + name).get_config()\n"
            "    assert 'tensorflow' not in sys.modules, name\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=CONFIGS.parent, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_section_is_a_config_dict(name):
    from ml_collections import ConfigDict
    c = _load(name)
    for section in ("model", "model.vit", "model.lpt", "backbone", "data", "loss", "loss.cb",
                    "loss.ib", "optim", "phase1", "phase2", "train", "eval", "predict"):
        node = c
        for part in section.split("."):
            node = node[part]
        assert isinstance(node, ConfigDict), section
    assert "eval_split" not in c.data


def test_demo_sets_only_the_backbone_shape():
    demo, common = _load("demo"), _load("places_lt")
    differ = {k for k in common.model.vit if demo.model.vit[k] != common.model.vit[k]}
    assert differ == {"variant", "width", "depth", "num_heads", "mlp_dim", "patch_size",
                      "image_size"}
    assert (demo.model.vit.width, demo.model.vit.depth, demo.model.vit.patch_size) == (128, 6, 4)


def _parse_config_flags(argv):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()  # config_flags defines the --config.* flags from the argv it sees
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("name", ["demo", "places_lt"])
def test_command_line_overrides_are_type_checked(name):
    from absl import flags
    c = _parse_config_flags([
        "prog", f"--config={CONFIGS / name}.py", "--config.model.vit.width=64",
        "--config.model.vit.patch_size=8", "--config.loss.cb.gamma_neg=2",
        "--config.phase2.epochs=3"])
    assert (c.model.vit.width, c.model.vit.patch_size) == (64, 8)
    assert isinstance(c.loss.cb.gamma_neg, float) and c.phase2.epochs == 3
    with pytest.raises(flags.IllegalFlagValueError):
        _parse_config_flags(["prog", f"--config={CONFIGS / name}.py",
                             "--config.model.vit.width=wide"])


def test_help_config_lists_every_field_from_its_declaration():
    """run.py --help_config prints each field of the config (after the overrides) with its
    default, what it accepts, its doc and its roles, and exits 0 without a --workdir."""
    from lpt_jax.config import schema
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), f"--config={CONFIGS}/demo.py", "--help_config",
         "--config.optim.base_lr=0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    paths = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert paths == [p for p, _, _ in schema.of(_load("demo")).walk()]
    text = proc.stdout
    assert "optim.base_lr" in text and "0.5 (default 0.02)" in text
    assert "accepts 'epoch_permutation' or 'independent'" in text
    assert "[location]" in text and "not run-defining" in text
