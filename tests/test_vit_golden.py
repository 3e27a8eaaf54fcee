"""Our ViT, loaded from AugReg-layout checkpoints, against timm (goldens from tools/make_vit_goldens.py)."""

import json

import jax
import numpy as np
import pytest

from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT
from lpt_jax.tree import flatten

from helpers import DATA

GOLDENS = sorted(p.stem for p in DATA.glob("vit_*.json"))


def _model(meta):
    return ViT(num_classes=meta["num_classes"], image_size=(meta["image_size"],) * 2,
               patch_size=(meta["patch_size"],) * 2, width=meta["width"], depth=meta["depth"],
               mlp_dim=meta["mlp_dim"], num_heads=meta["num_heads"], pool_type=meta["pool_type"],
               layernorm_epsilon=meta["layernorm_epsilon"],
               gelu_approximate=meta["gelu_approximate"])


def _load(name, **overrides):
    meta = json.loads((DATA / f"{name}.json").read_text())
    meta.update(overrides)
    model = _model(meta)
    golden = np.load(DATA / f"{name}_golden.npz")
    init = jax.eval_shape(model.init, jax.random.key(0), golden["images"][:1])["params"]
    params = vit_weights.load_params(str(DATA / f"{name}.npz"), init)
    return model, params, golden


def test_goldens_present():
    assert len(GOLDENS) >= 2, "run tools/make_vit_goldens.py to create tests/data/vit_*"


@pytest.mark.parametrize("name", GOLDENS)
def test_matches_timm(name):
    model, params, golden = _load(name)
    with jax.default_matmul_precision("float32"):
        logits, out = jax.jit(model.apply)({"params": params}, golden["images"])
    d_logits = float(np.max(np.abs(np.asarray(logits) - golden["logits"])))
    d_feat = float(np.max(np.abs(np.asarray(out["pre_logits"]) - golden["features"])))
    print(f"{name}: max|dlogits|={d_logits:.2e} max|dfeatures|={d_feat:.2e} "
          f"(max|logit|={np.abs(golden['logits']).max():.2f})")
    assert d_logits < 1e-4 and d_feat < 1e-4


@pytest.mark.parametrize("name", GOLDENS)
def test_wrong_numerics_are_detected(name):
    """The goldens' 1e-4 tolerance is tight enough to catch the wrong GELU form (it moves logits by >1e-3)."""
    meta = json.loads((DATA / f"{name}.json").read_text())
    model, params, golden = _load(name, gelu_approximate=not meta["gelu_approximate"])
    logits, _ = model.apply({"params": params}, golden["images"])
    assert np.max(np.abs(np.asarray(logits) - golden["logits"])) > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_layout_of_golden_loads_identically(tmp_path, scan):
    model, params, golden = _load(GOLDENS[0])
    path = str(tmp_path / "bv.npz")
    vit_weights.save_big_vision_npz(path, params, scan=scan)
    again = vit_weights.load_params(path, jax.eval_shape(lambda: params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(flatten(again)[k], v, err_msg=k)
