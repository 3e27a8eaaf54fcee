"""LIFT as a second method on the same frozen trunk: its configs, its modules' starting point,
its loss and head init, and the generic run machinery (train, export, resume, evaluate,
predict, serving's refusal) working for it unchanged. LIFT's own PyTorch code is compared in
test_lift_goldens.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from lpt_jax import data, tree
from lpt_jax.backbones.vit import ViT
from lpt_jax.errors import ConfigError, ExportError, Stopped
from lpt_jax.method import losses
from lpt_jax.method.lift_model import LiftTuner, bottleneck_width
from lpt_jax.run import exports, head_init, inference, rundir, trainer
from lpt_jax.run.context import build_context
from lpt_jax.serving import MultiTaskPredictor

from helpers import REPO, TINY_VIT, make_image_folder, vit_kwargs
from tiny_run import make_backbone

TUNER_PATH = r"backbone/Transformer/encoderblock_\d+/tuner/.*"


def lift_config(tmp_path, *, epochs=2, tuners="adaptformer"):
    root, ckpt = tmp_path / "data", tmp_path / "vit.npz"
    if not root.exists():
        make_image_folder(root)
    if not ckpt.exists():
        make_backbone(ckpt)
    c = base_config("lift")
    c.model.vit = dict(TINY_VIT)
    c.model.lift.tuners = tuners
    c.model.lift.bottleneck = 4
    c.model.head_init = "class_mean"
    c.backbone.checkpoint = str(ckpt)
    c.data.update(dict(name="image_folder", root=str(root), image_size=32, resize_size=36))
    c.phase1.update(dict(epochs=epochs, batch_size=8))
    c.optim.update(dict(base_lr=0.05, lr_reference_batch=8, warmup_epochs=0))
    c.eval.update(dict(batch_size=8, plot=False))
    c.train.update(dict(log_every_steps=2, checkpoint_every_steps=3))
    return c


def load(path, arg):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_files_pick_lift_and_its_recipe():
    for path, arg in (("demo.py", "lift"), ("places_lt.py", "lift"),
                      ("cifar100_lt.py", "50,lift"), ("imagenet_lt.py", "lift"),
                      ("inaturalist2018.py", "lift"), ("places_lt.py", "siglip_b16,lift")):
        c = load(path, arg)
        assert c.model.method == "lift" and c.train.phases == "1", path
        assert c.model.head_init == "class_mean" and c.phase1.epochs == 10, path
        assert (c.optim.momentum, c.optim.weight_decay, c.optim.warmup_epochs) == (0.9, 5e-4, 0)
        assert c.optim.base_lr == 0.01 and c.optim.lr_reference_batch == c.phase1.batch_size
        assert "lpt" not in c.model and "phase2" not in c
    assert load("cifar100_lt.py", "50,lift").data.imbalance_ratio == 50
    assert load("places_lt.py", "lift").phase1.batch_size == 128
    assert load("places_lt.py", "siglip_b16,lift").model.vit.pool_type == "map"
    assert load("demo.py", None).model.method == "lpt"
    with pytest.raises(ConfigError, match="expected no argument or 'lift'"):
        load("demo.py", "lfit")


def test_the_bottleneck_follows_lifts_rule():
    # 2 ** max(0, floor(log2(C / 2L))), worked by hand for LIFT's datasets on ViT-B (L = 12).
    assert bottleneck_width(1000, 12) == 32    # ImageNet-LT: 1000 / 24 = 41.7
    assert bottleneck_width(365, 12) == 8      # Places-LT: 15.2
    assert bottleneck_width(100, 12) == 4      # CIFAR-100-LT: 4.2
    assert bottleneck_width(8142, 12) == 256   # iNaturalist 2018: 339
    assert bottleneck_width(6, 6) == 1         # the demo: 0.5 -> 2 ** 0


def _features(tuners, seed=0):
    plain = ViT(**vit_kwargs(TINY_VIT))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    params = plain.init(jax.random.key(seed), x)["params"]
    modules = tuple(tuners.split("+"))
    tuned = plain.clone(block_tuner=lambda w, m, name: LiftTuner(w, m, tuners=modules,
                                                                   bottleneck=4, name=name))
    tuned_params = tuned.init(jax.random.key(seed + 1), x)["params"]
    added = {k: v for k, v in tree.flatten(tuned_params).items() if "/tuner/" in k}
    full = tree.unflatten({**tree.flatten(params), **added})
    def f(module, p):
        return module.apply({"params": p}, x,
                            method=lambda mod, i: mod.encode_features(mod.embed(i)))
    return np.asarray(f(plain, params)), np.asarray(f(tuned, full)), added


@pytest.mark.parametrize("tuners", ["adaptformer", "adapter", "lora", "adaptformer+lora"])
def test_modules_start_as_the_identity(tuners):
    plain, tuned, added = _features(tuners)
    assert added and all("/tuner/" in k for k in added)
    np.testing.assert_allclose(tuned, plain, atol=1e-6)


def test_ssf_starts_near_but_not_at_the_identity():
    plain, tuned, added = _features("ssf")
    assert 0 < np.abs(tuned - plain).max() < 1.0
    scales = np.concatenate([np.ravel(v) for k, v in added.items() if k.endswith("_scale")])
    assert abs(scales.mean() - 1) < 0.01 and 0.01 < scales.std() < 0.03  # N(1, 0.02^2)


def test_logit_adjusted_is_the_cross_entropy_of_scaled_cosines_plus_tau_log_prior():
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, (5, 4)).astype(np.float32)
    labels, counts = np.array([0, 3, 1, 1, 2]), np.array([50, 20, 5, 1])
    for tau in (1.0, 0.5):
        adjusted = 25 * z + tau * np.log(counts / counts.sum())
        log_p = adjusted - np.log(np.exp(adjusted).sum(1, keepdims=True))
        want = -log_p[np.arange(5), labels].mean()
        loss = losses.make_branch_loss("logit_adjusted", counts, scale=25.0, tau=tau)
        np.testing.assert_allclose(float(loss(jnp.asarray(z), jnp.asarray(labels))), want,
                                   rtol=1e-5)


def test_the_class_mean_head_is_the_normalised_mean_of_plain_backbone_features(tmp_path):
    c = lift_config(tmp_path)
    ctx = build_context(c, str(tmp_path / "wd"))
    kernel = np.asarray(ctx.params["head"]["kernel"])
    # Independently: the plain ViT (no tuner) on every training image of the eval pipeline.
    plain = ViT(**vit_kwargs(TINY_VIT))
    params = {k: v for k, v in tree.flatten(ctx.params["backbone"]).items() if "/tuner/" not in k}
    sums = np.zeros((ctx.source.num_classes, TINY_VIT["width"]))
    counts = np.zeros(ctx.source.num_classes)
    for batch in data.make_eval_stream(ctx.source, c.data, split="train", batch_size=8):
        f = plain.apply({"params": tree.unflatten(params)}, batch["image"],
                        method=lambda m, i: m.encode_features(m.embed(i)))
        for row, label, keep in zip(np.asarray(f), batch["label"], batch["mask"]):
            if keep:
                sums[label] += row
                counts[label] += 1
    assert counts.sum() == ctx.source.num_train
    want = sums / counts[:, None]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(kernel, want.T, atol=1e-5)
    assert head_init.plain_backbone(ctx.model.backbone, {})[0].block_tuner is None


def test_lift_trains_exports_its_modules_resumes_evaluates_and_predicts(tmp_path):
    c = lift_config(tmp_path)
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    trainer.train(c, whole)
    export, meta = exports.read(rundir.export_path(whole, 1))
    assert meta["method"] == "lift" and set(export) == {"backbone", "head"}
    flat = tree.flatten(export)
    assert flat and all(tree.matches(k, (TUNER_PATH[len("backbone/"):],)) for k in
                        tree.flatten(export["backbone"]))
    trained = sum(np.size(v) for v in flat.values())
    ctx = build_context(c, whole)
    frozen = sum(np.size(v) for k, v in tree.flatten(ctx.params["backbone"]).items()
                 if "/tuner/" not in k)
    assert trained < 0.25 * frozen  # a few modules, not the backbone (tiny ViT: ~8 %)
    # The modules moved from their start (the identity), the frozen weights did not.
    ups = [v for k, v in flat.items() if k.endswith("adaptformer/up/kernel")]
    assert len(ups) == TINY_VIT["depth"] and max(np.abs(u).max() for u in ups) > 0

    # Stopped after 2 steps and rerun: the same export as the uninterrupted run.
    c.train.stop_after_steps = 2
    with pytest.raises(Stopped):
        trainer.train(c, stopped)
    c.train.stop_after_steps = 0
    trainer.train(c, stopped)
    again, _ = exports.read(rundir.export_path(stopped, 1))
    for k, v in tree.flatten(again).items():
        np.testing.assert_allclose(v, flat[k], atol=1e-6, err_msg=k)

    # Evaluation and prediction read the export like LPT's.
    report = inference.evaluate_workdir(c, whole)
    assert report["phase"] == 1 and 0 <= report["overall"] <= 100
    image = next((tmp_path / "data" / "test" / "class_0").iterdir())
    rows = list(inference.predict_files(c, whole, [str(image)]))
    assert len(rows) == 1 and len(rows[0]["top_k"]) == min(c.predict.top_k, 4)

    # Serving mixes tasks by their per-example forward, which LIFT's phase does not have.
    with pytest.raises(ExportError, match="cannot be served in mixed batches") as e:
        MultiTaskPredictor.from_exports(c.backbone.checkpoint,
                                        {"a": rundir.export_path(whole, 1)}, batch_size=8)
    assert "\n" not in str(e.value)


def test_a_backbone_without_block_hooks_is_refused_in_one_line(tmp_path):
    c = lift_config(tmp_path)
    from lpt_jax.method import lift
    with pytest.raises(ConfigError, match="needs a backbone with block hooks"):
        lift._build(c.model, 4, object())


@pytest.mark.parametrize("path, value, says", [
    ("model.lift.tuners", "adaptformer+foo", "model.lift.tuners='adaptformer+foo': expected "
     "'none' or module names joined by '+'"),
    ("model.lift.bottleneck", -1, "model.lift.bottleneck=-1: expected an integer >= 0"),
    ("loss.name", "agcl", "loss.name='agcl': expected 'logit_adjusted' or 'ce'"),
    ("loss.tau", -1.0, "loss.tau=-1.0: expected a finite number >= 0"),
    ("train.phases", "1,2", "train.phases='1,2': expected increasing phase numbers from {1} "
     "(lift), e.g. '1'"),
])
def test_a_bad_lift_value_is_one_line(tmp_path, path, value, says):
    from lpt_jax.config import schema
    c = lift_config(tmp_path)
    section, leaf = path.rsplit(".", 1)
    tree.lookup(c, section)[leaf] = value
    with pytest.raises(ConfigError) as e:
        schema.check(c)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_deep_prompts_equal_lpts_shared_prompt_and_shallow_ones_are_carried_through():
    from lpt_jax.method.lift_model import LIFT
    from lpt_jax.method.lpt_model import LPT
    plain = ViT(**vit_kwargs(TINY_VIT))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    backbone = plain.init(jax.random.key(0), x)["params"]
    depth, width = TINY_VIT["depth"], TINY_VIT["width"]
    prompt = jax.random.normal(jax.random.key(2), (depth, 5, width))

    # 'deep' is LPT's phase-1 prompt by another path (LPT: its shared prompt at every block).
    lift = LIFT(plain, 4, vpt="deep", vpt_length=5)
    params = lift.init(jax.random.key(3), x)["params"]
    assert params["vpt_prompt"].shape == (depth, 5, width)
    bound = (6 / (3 * TINY_VIT["patch_size"] ** 2 + width)) ** 0.5  # LIFT's uniform init
    assert 0.8 * bound < np.abs(params["vpt_prompt"]).max() <= bound
    ours = lift.apply({"params": {**params, "backbone": backbone, "vpt_prompt": prompt}}, x,
                      method=LIFT.classify)["query"]
    lpt = LPT(plain, 4, prompt_length=5, pool_size=2, shared_depth=depth)
    lpt_params = lpt.init(jax.random.key(4), x)["params"]
    theirs = lpt.apply({"params": {**lpt_params, "backbone": backbone, "shared_prompt": prompt}},
                       x, method=LPT.phase1)["query"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)

    # 'shallow': tokens appended before block 0 and computed through every block, as the
    # plain ViT computes a longer sequence (all rows of every block, then its class token).
    lift = LIFT(plain, 4, vpt="shallow", vpt_length=5)
    params = lift.init(jax.random.key(3), x)["params"]
    tokens = prompt[0]
    ours = lift.apply({"params": {**params, "backbone": backbone, "vpt_prompt": tokens}}, x,
                      method=LIFT.classify)["query"]

    def full(module, images):
        seq = module.embed(images)
        seq = jnp.concatenate([seq, jnp.broadcast_to(tokens, (3,) + tokens.shape)], axis=1)
        return module.features(module.encode(seq))
    want = plain.apply({"params": backbone}, x, method=full)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1e-5)
    without = plain.apply({"params": backbone}, x,
                          method=lambda m, i: m.encode_features(m.embed(i)))
    assert np.abs(np.asarray(ours) - np.asarray(without)).max() > 1e-3


def test_shallow_prompts_with_a_pooling_that_would_pool_them_are_refused(tmp_path):
    from lpt_jax.config import schema
    c = lift_config(tmp_path)
    c.model.lift.vpt = "shallow"
    schema.check(c)
    c.model.vit.pool_type = "gap"
    with pytest.raises(ConfigError, match="model.lift.vpt='shallow' carries its tokens"):
        schema.check(c)


def test_bitfit_is_the_plain_backbone_with_its_block_biases_trained(tmp_path):
    from lpt_jax.method import steps
    c = lift_config(tmp_path)
    c.model.lift.tuners = "none"
    c.phase1.trainable = (r"backbone/Transformer/encoderblock_\d+/.*/bias", "head/.*")
    ctx = build_context(c, str(tmp_path / "wd"))
    phase = ctx.method.phase(1)
    step = steps.make_train_step(ctx.model, phase, c, class_counts=ctx.source.train_counts,
                                 steps_per_epoch=4, batch_size=8)
    params = jax.device_get(ctx.params)
    state, frozen = step.init(params)
    rng = np.random.default_rng(0)
    one = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
           "label": np.arange(8, dtype=np.int32) % 4}
    state, _ = jax.jit(step.fn)(state, frozen, {"cb": one, "ib": one})
    after = tree.flatten(tree.merge(jax.device_get(state["trainable"]), frozen))
    before = tree.flatten(params)
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and all(k.endswith("/bias") or k.startswith("head/") for k in moved)
    assert any(k.startswith("backbone/") for k in moved)
    assert not any("/tuner/" in k for k in before)  # no module: the plain backbone
