"""Our LIFT (lpt_jax.method.lift_model) against LIFT's own PyTorch code (Shi et al., ICML
2024, github shijxcs/LIFT) on shared random weights: goldens from tools/make_lift_goldens.py
(run in the oracle venv; this file needs no torch).

The golden file holds a random ViT (vit_jax layout under `vit/`, read by our own loader), the
random non-zero parameters of LIFT's `ViT_Tuner` under their torch names, and what LIFT's
code computed with them: the tuned feature and the cosine logits (scale 25) per module set,
the logit-adjusted loss, the class-mean head of a fake training set, its init statistics,
and torchvision's test-time ensemble crops.
"""

import functools
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import tree
from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT
from lpt_jax.method import lift, losses
from lpt_jax.method.lift_model import LiftTuner

from helpers import DATA

GOLDEN, META = DATA / "lift_goldens.npz", DATA / "lift_goldens.json"
pytestmark = pytest.mark.skipif(
    not GOLDEN.exists(), reason="tests/data/lift_goldens.npz is absent: run "
    "tools/make_lift_goldens.py --lift_repo=<LIFT checkout> in the oracle venv")

# Our module names for each golden configuration (LIFT's flags: tools/make_lift_goldens.py).
TUNERS = {"adaptformer": "adaptformer", "adapter": "adapter", "lora": "lora", "ssf": "ssf",
          "all": "adapter+adaptformer+lora+ssf"}
# ~float32 rounding of a 2-block ViT (measured ~1e-6; timm vs our ViT alone: ~2e-5 at D=64).
ATOL = 2e-5


@functools.lru_cache(maxsize=None)
def _golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}, json.loads(META.read_text())


def _unit(u8):
    """The oracle's input: the same float32 expression (tools/make_lift_goldens.py)."""
    return u8.astype(np.float32) / np.float32(127.5) - np.float32(1)


def _vit(meta) -> ViT:
    v = meta["vit"]
    return ViT(image_size=(v["image_size"],) * 2, patch_size=(v["patch_size"],) * 2,
               width=v["width"], depth=v["depth"], mlp_dim=v["mlp_dim"],
               num_heads=v["num_heads"], pool_type=v["pool_type"],
               layernorm_epsilon=v["layernorm_epsilon"],
               gelu_approximate=v["gelu_approximate"])


# ------------------------------------------------------------------------------------------
# LIFT's torch names -> ours.

_BOTTLENECK = {"ln.weight": "LayerNorm_0/scale", "ln.bias": "LayerNorm_0/bias",
               "down_proj.weight": "down/kernel", "down_proj.bias": "down/bias",
               "up_proj.weight": "up/kernel", "up_proj.bias": "up/bias", "scale": "scale"}
_LORA = {"q": "query", "v": "value"}
_SSF = {"attn_out": "out", "mlp_in": "Dense_0", "mlp_out": "Dense_1", "ln_1": "LayerNorm_0",
        "ln_2": "LayerNorm_1"}


def lift_to_ours(torch_params: dict, wrong: str = "") -> dict:
    """{'adaptformer_list.0.down_proj.weight': (out, in), ...} -> our flat tuner params
    {'Transformer/encoderblock_0/tuner/adaptformer/down/kernel': (in, out), ...}.

    `wrong` names one deliberate mapping error (test_a_wrong_mapping_is_detected)."""
    out = {}
    for key, value in torch_params.items():
        m = re.fullmatch(r"(\w+)_list\.(\d+)\.(.+)", key)
        assert m, key
        kind, block, rest = m.group(1), int(m.group(2)), m.group(3)
        if wrong == "blocks_swapped":
            block = 1 - block
        prefix = f"Transformer/encoderblock_{block}/tuner/"
        if kind in ("adaptformer", "adapter"):
            name = _BOTTLENECK[rest]
            if rest.endswith(".weight") and rest != "ln.weight":
                value = value.T  # torch Linear (out, in) -> Flax kernel (in, out)
            if wrong == "ln_scale_bias_swapped" and rest.startswith("ln."):
                name = _BOTTLENECK["ln.bias" if rest == "ln.weight" else "ln.weight"]
            if wrong == "adaptformer_scale_dropped" and rest == "scale":
                value = np.ones_like(value)
            out[prefix + f"{kind}/{name}"] = value
        elif kind == "lora":
            proj, ab = rest.split(".")
            if wrong == "lora_q_v_swapped":
                proj = {"q": "v", "v": "q"}[proj]
            out[prefix + f"lora_{_LORA[proj]}_{ab[-1].lower()}"] = value
        elif kind.startswith("ssf_"):
            site, leaf = rest.split(".")
            if site == "attn_in":  # LIFT: one SSF on the concatenated q|k|v
                parts = np.split(value, 3)
                order = ("value", "key", "query") if wrong == "ssf_qkv_reversed" else (
                    "query", "key", "value")
                for proj, part in zip(order, parts):
                    out[prefix + f"ssf_{proj}_{leaf}"] = part
            else:
                out[prefix + f"ssf_{_SSF[site]}_{leaf}"] = value
        else:
            raise AssertionError(f"unmapped LIFT parameter {key}")
    return out


@functools.lru_cache(maxsize=None)
def _forward(config: str):
    """(our LIFT model built by the method registry, jitted classify, backbone params without
    the tuner's)."""
    golden, meta = _golden()
    vit = _vit(meta)
    model_cfg = types.SimpleNamespace(
        backbone="vit", lift=types.SimpleNamespace(tuners=TUNERS[config],
                                                  bottleneck=meta["bottleneck"], vpt="none",
                                                  vpt_length=1))
    model = lift.METHOD.build(model_cfg, meta["num_classes"], vit)
    images = _unit(golden["images_u8"])
    abstract = jax.eval_shape(model.init, jax.random.key(0), images[:1])["params"]
    backbone = vit_weights.load_params(str(GOLDEN), abstract["backbone"], subtree="vit",
                                       dont_load=model.backbone.initialised_params)
    classify = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.classify))
    return model, classify, backbone, abstract


def _run(config: str, wrong: str = ""):
    golden, _ = _golden()
    model, classify, backbone, abstract = _forward(config)
    prefix = f"{config}/tuner/"
    torch_params = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    tuner = lift_to_ours(torch_params, wrong)
    flat = tree.flatten(backbone)
    want = {k for k in tree.flatten(abstract["backbone"]) if "/tuner/" in k}
    assert set(tuner) == want, (sorted(set(tuner) ^ want))  # every LIFT param, every one of ours
    for k, v in tuner.items():
        assert v.shape == tree.flatten(abstract["backbone"])[k].shape, k
    flat.update({k: jnp.asarray(v) for k, v in tuner.items()})
    params = {"backbone": tree.unflatten(flat),
              "head": {"kernel": jnp.asarray(golden["head_weight"].T)}}  # (C, D) -> (D, C)
    out = classify(params, _unit(golden["images_u8"]))
    return np.asarray(out["query"]), np.asarray(out["logits"])


@pytest.mark.parametrize("config", list(TUNERS))
def test_tuned_features_and_cosine_logits_match_lift(config):
    golden, meta = _golden()
    features, cosines = _run(config)
    d_feat = np.abs(features - golden[f"{config}/features"]).max()
    d_logit = np.abs(meta["cosine_scale"] * cosines - golden[f"{config}/logits"]).max()
    print(f"{config}: max|dfeature|={d_feat:.1e} (max|f|={np.abs(features).max():.2f}), "
          f"max|dlogit|={d_logit:.1e} (scale 25)")
    assert d_feat < ATOL
    assert d_logit < 25 * ATOL


@pytest.mark.parametrize("config", list(TUNERS))
def test_logit_adjusted_loss_matches_lift(config):
    golden, meta = _golden()
    _, cosines = _run(config)
    loss = losses.make_branch_loss("logit_adjusted", golden["class_counts"],
                                   scale=float(meta["cosine_scale"]), tau=meta["la_tau"])
    ours = float(loss(jnp.asarray(cosines), jnp.asarray(golden["labels"])))
    want = float(golden[f"{config}/la_loss"])
    print(f"{config}: LA loss ours {ours:.7f} LIFT {want:.7f}")
    assert abs(ours - want) < 1e-5 * max(1.0, abs(want))
    # And on LIFT's own logits (the loss alone, no model in between).
    on_lift = float(loss(jnp.asarray(golden[f"{config}/logits"] / meta["cosine_scale"]),
                         jnp.asarray(golden["labels"])))
    assert abs(on_lift - want) < 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("config,wrong", [
    ("adapter", "ln_scale_bias_swapped"), ("adaptformer", "adaptformer_scale_dropped"),
    ("lora", "lora_q_v_swapped"), ("ssf", "ssf_qkv_reversed"), ("all", "blocks_swapped")])
def test_a_wrong_mapping_is_detected(config, wrong):
    """The tolerance above sees one mis-mapped tensor (the oracle also checked that +-0.1 on
    any one tuner tensor moves LIFT's feature by > 1e-3)."""
    golden, _ = _golden()
    features, _ = _run(config, wrong)
    assert np.abs(features - golden[f"{config}/features"]).max() > 1e-3


def test_class_mean_head_matches_lift(monkeypatch):
    """head_init.class_mean_kernel (the plain backbone: its tuner dropped) on the fake training
    set, fed as two eval batches, against LIFT's Trainer.init_head_class_mean."""
    from lpt_jax import data, parallel
    from lpt_jax.run import head_init

    golden, meta = _golden()
    model, _, backbone, abstract = _forward("all")
    flat = tree.flatten(backbone)
    flat.update({k: jnp.full(v.shape, jnp.nan, v.dtype)  # the tuner must not be used
                 for k, v in tree.flatten(abstract["backbone"]).items() if "/tuner/" in k})
    mesh = parallel.make_mesh()
    n = mesh.devices.size
    images, labels = _unit(golden["train_images_u8"]), golden["train_labels"]
    batches = []
    for start in range(0, len(labels), n):
        k = min(n, len(labels) - start)
        pad = lambda a: np.concatenate([a[start:start + k],  # noqa: E731
                                        np.zeros((n - k,) + a.shape[1:], a.dtype)])
        batches.append(dict(image=pad(images), label=pad(labels).astype(np.int32),
                            mask=np.arange(n) < k))

    class Stream(list):
        def close(self):
            pass

    monkeypatch.setattr(data, "make_eval_stream", lambda *a, **kw: Stream(batches))
    source = types.SimpleNamespace(num_classes=meta["num_classes"],
                                   class_names=[str(c) for c in range(meta["num_classes"])])
    config = types.SimpleNamespace(data=None, eval=types.SimpleNamespace(batch_size=n))
    kernel = head_init.class_mean_kernel(config, source, model.backbone,
                                         tree.unflatten(flat), mesh)
    diff = np.abs(kernel.T - golden["class_mean_head"]).max()
    print(f"class-mean head: max|d|={diff:.1e}")
    assert diff < ATOL


def test_init_distribution_matches_lift():
    """Our LiftTuner's initialisation against statistics measured on LIFT's own modules
    (width 768, bottleneck 64), within sampling error."""
    golden, meta = _golden()
    stat = lambda k: float(golden[f"init/{k}"])  # noqa: E731
    d, r = meta["init_statistics"]["width"], meta["init_statistics"]["bottleneck"]
    tuner = LiftTuner(width=d, mlp_dim=4 * d, tuners=("adaptformer", "adapter", "lora", "ssf"),
                      bottleneck=r)
    x = jnp.zeros((1, 2, d))

    def touch(m, x):  # every site, so that every module creates its params
        y = m.norm("LayerNorm_0", x)
        for name in ("query", "key", "value"):
            y = y + m.projection(name, x, x.reshape(1, 2, 1, d)).reshape(1, 2, d)
        return m.mlp_branch(x, y)

    init = jax.jit(functools.partial(tuner.init, method=touch))
    params = tree.flatten(init(jax.random.key(0), x)["params"])
    for name in ("adaptformer", "adapter"):
        down = np.asarray(params[f"{name}/down/kernel"])
        assert down.shape == (d, r)
        assert abs(down.std() / stat(f"{name}_down_std") - 1) < 0.03, (down.std(), name)
        assert abs(down.mean()) < 3 * stat(f"{name}_down_std") / np.sqrt(down.size)
        assert stat(f"{name}_zero_at_init") == 1 and stat(f"{name}_ln_weight_is_one") == 1
        for k in ("up/kernel", "up/bias", "down/bias", "LayerNorm_0/bias"):
            assert not np.asarray(params[f"{name}/{k}"]).any(), (name, k)
        assert (np.asarray(params[f"{name}/LayerNorm_0/scale"]) == 1).all()
    assert float(params["adaptformer/scale"][0]) == stat("adaptformer_scale") == 1
    a = np.concatenate([np.ravel(params[f"lora_{p}_a"]) for p in ("query", "value")])
    bound = stat("lora_a_absmax")  # LIFT's max over 49k draws of U(-b, b): b to 1e-4
    assert bound * 0.999 < np.abs(a).max() <= bound * 1.001
    assert abs(a.std() / stat("lora_a_std") - 1) < 0.03
    assert not any(np.asarray(params[f"lora_{p}_b"]).any() for p in ("query", "value"))
    ssf = {leaf: np.concatenate([np.ravel(v) for k, v in params.items()
                                 if k.startswith("ssf_") and k.endswith(leaf)])
           for leaf in ("_scale", "_shift")}
    for leaf, values in ssf.items():
        mean, std = stat(f"ssf{leaf}_mean"), stat(f"ssf{leaf}_std")
        assert abs(values.mean() - mean) < 4 * std / np.sqrt(values.size), leaf
        assert abs(values.std() / std - 1) < 0.05, leaf
    # The LayerNorm in AdaptFormer / Adapter: torch's default eps, as LIFT's.
    assert stat("adaptformer_ln_eps") == stat("adapter_ln_eps") == 1e-5
    # LoRA's scaling 1 / r: checked by the forward goldens (r = 4 there).
    assert stat("lora_scaling") == 1 / r


@pytest.mark.parametrize("mode", ["five_crop", "ten_crop"])
def test_tte_crops_match_torchvision(mode):
    """Our eval views (lpt_jax.data.preprocess.eval_views) against torchvision's FiveCrop /
    TenCrop as LIFT's trainer composes them. The crops are compared on torchvision's own
    resized image (exact: crop offsets, order, the flip); the resize itself (PIL's
    antialiased bilinear vs TF's) only by size and to a few grey levels."""
    from lpt_jax.data import preprocess
    missing = [f for f in ("eval_views", "resize_shorter_side") if not hasattr(preprocess, f)]
    if missing:
        pytest.skip(f"lpt_jax.data.preprocess has no {', '.join(missing)} (the test-time "
                    "ensemble's views) yet")
    import tensorflow as tf

    golden, meta = _golden()
    res, expand = meta["tte"]["resolution"], meta["tte"]["expand"]
    resized = golden["tte/resized"]
    ours_resized = preprocess.resize_shorter_side(tf.constant(golden["tte/image"]),
                                                  res + expand).numpy()
    assert ours_resized.shape == resized.shape
    d_resize = np.abs(ours_resized - resized.astype(np.float32))
    print(f"resize: max|d|={d_resize.max():.2f}, mean {d_resize.mean():.2f} grey levels")
    assert d_resize.mean() < 2.0
    views = preprocess.eval_views(tf.constant(resized), "pixels", res, expand, mode).numpy()
    want = _unit(golden[f"tte/{mode}"])
    assert views.shape == want.shape
    np.testing.assert_allclose(views, want, atol=1e-6, rtol=0)
