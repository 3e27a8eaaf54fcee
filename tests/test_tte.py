"""Test-time ensembling (eval.ensemble, LIFT's `tte`): torchvision's FiveCrop / TenCrop views
of the image resized on its shorter side, the mean of their logits, both accuracies reported."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs.common import base_config
from lpt_jax import data, parallel
from lpt_jax.config import schema
from lpt_jax.data import preprocess
from lpt_jax.errors import ConfigError
from lpt_jax.run import context, inference

from tiny_run import tiny_config

S = 32  # crop size


def _distinct_image(h, w):
    """uint8 (h, w, 3) whose pixels are pairwise distinct (the flat index in R and G)."""
    i = np.arange(h * w)
    return np.stack([i % 256, i // 256, (3 * i + 1) % 256], -1).reshape(h, w, 3).astype(np.uint8)


def _unit(x):
    return np.asarray(x, np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("ensemble", ["five_crop", "ten_crop"])
def test_views_are_torchvision_five_and_ten_crop(ensemble):
    """71 x 57 with expand 25: the shorter side is already S + 25, so no resampling, and the
    centre offsets (71 - 32) / 2 = 19.5 and (57 - 32) / 2 = 12.5 tell torchvision's
    int(round(.)) (half to even: 20, 12) from floor (19, 12) and half-up (20, 13)."""
    img = _distinct_image(71, 57)
    # torchvision five_crop: tl, tr, bl, br, then center_crop; (top, left) by hand
    offsets = [(0, 0), (0, 57 - S), (71 - S, 0), (71 - S, 57 - S), (20, 12)]
    expected = [img[t:t + S, l:l + S] for t, l in offsets]
    if ensemble == "ten_crop":  # TenCrop: the five crops of the horizontally flipped image
        flipped = img[:, ::-1]
        expected += [flipped[t:t + S, l:l + S] for t, l in offsets]
    views = preprocess.eval_views(tf.constant(img), "pixels", S, 25, ensemble).numpy()
    assert views.shape == (len(expected), S, S, 3)
    np.testing.assert_array_equal(views, _unit(np.stack(expected)))


@pytest.mark.parametrize("shape,resized", [
    ((100, 80), (70, 56)),    # shrinks: shorter side 80 -> 56, longer int(56 * 100 / 80) = 70
    ((45, 81), (56, 100))])   # grows, wide: longer int(56 * 81 / 45) = int(100.8) = 100
def test_views_resize_the_shorter_side_as_torchvision(shape, resized):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    big = tf.image.resize(img, resized, method="bilinear", antialias=True).numpy()
    h, w = resized
    offsets = [(0, 0), (0, w - S), (h - S, 0), (h - S, w - S),
               (int(round((h - S) / 2)), int(round((w - S) / 2)))]
    expected = np.stack([big[t:t + S, l:l + S] for t, l in offsets])
    views = preprocess.eval_views(tf.constant(img), "pixels", S, 24, "five_crop").numpy()
    np.testing.assert_allclose(views, _unit(expected), atol=1e-3)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A tiny LPT context (8 simulated devices) with five_crop on; its prompts and head are
    the random initial ones (what is tested needs no training)."""
    tmp = tmp_path_factory.mktemp("tte")
    config = tiny_config(tmp)
    config.eval.plot, config.eval.ensemble = False, "five_crop"
    return context.build_context(config, str(tmp / "wd"))


def test_the_stream_yields_each_image_and_its_views(ctx):
    config = ctx.config
    src = data.get_source(config.data)
    plain = next(iter(data.make_eval_stream(src, config.data, "test", 12)))
    stream = data.make_eval_stream(src, config.data, "test", 12, ensemble="ten_crop",
                                   ensemble_expand=4)
    batches = list(stream)
    batch = batches[0]
    assert batch["views"].shape == (12, 10, S, S, 3)
    np.testing.assert_array_equal(batch["image"], plain["image"])  # the single view unchanged
    path = src.splits["test"].store.describe(0)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_allclose(batch["views"][0], preprocess.eval_views(
        tf.constant(pixels), "pixels", S, 4, "ten_crop").numpy(), atol=1e-6)
    last = batches[-1]  # 16 images in batches of 12: 8 padding rows, zero views
    assert not last["mask"][4:].any() and not last["views"][4:].any()


@pytest.mark.parametrize("phase_number", [1, 2])
def test_ensembled_logits_are_the_mean_of_per_view_logits(ctx, phase_number):
    phase = ctx.method.phase(phase_number)
    params = inference.place_params(ctx.model, ctx.params, ctx.mesh)
    views = np.random.default_rng(1).uniform(-1, 1, (8, 5, S, S, 3)).astype(np.float32)
    mean = inference.make_ensemble_predict_fn(ctx.model, phase, ctx.mesh)(
        params, parallel.global_batch(views, ctx.mesh))
    predict = inference.make_predict_fn(ctx.model, phase, ctx.mesh)
    per_view = np.stack([np.asarray(predict(params, parallel.global_batch(
        views[:, v], ctx.mesh))[0]) for v in range(5)])  # (V, B, C), one view at a time
    assert np.ptp(per_view, axis=0).max() > 1e-3  # the views disagree: the mean is a test
    np.testing.assert_allclose(np.asarray(mean), per_view.mean(0), rtol=1e-5, atol=1e-6)


def _independent_accuracy(ctx, params, phase, split):
    """% of `split` whose argmax of the per-view logits' mean is the label, one view at a
    time through the single-view predict function."""
    predict = inference.make_predict_fn(ctx.model, phase, ctx.mesh)
    placed = inference.place_params(ctx.model, params, ctx.mesh)
    correct = total = 0
    for batch in data.make_eval_stream(ctx.source, ctx.config.data, split, 8,
                                       ensemble="five_crop", ensemble_expand=24):
        logits = np.mean([np.asarray(predict(placed, parallel.global_batch(
            batch["views"][:, v], ctx.mesh))[0]) for v in range(5)], axis=0)
        m = batch["mask"]
        correct += int((logits.argmax(-1)[m] == batch["label"][m]).sum())
        total += int(m.sum())
    return 100.0 * correct / total


def test_reports_carry_both_accuracies(ctx, tmp_path):
    phase = ctx.method.phase(2)
    inference.evaluate(ctx, ctx.params, phase, "test", str(tmp_path / "tte"), "tte")
    saved = json.load(open(tmp_path / "tte" / "results.json"))
    table = open(tmp_path / "tte" / "table.md").read()
    ens = saved["ensembled"]
    assert (ens["ensemble"], ens["views"], ens["expand"]) == ("five_crop", 5, 24)
    for numbers, suffix in ((saved, ""), (ens, ", ensembled (five_crop, 5 views)")):
        for rule, title in (("release", "release rule (few <= 20)"),
                            ("oltr", "OLTR rule (few < 20)")):
            g = {k: "–" if v is None else f"{v:.2f}" for k, v in numbers[rule].items()}
            row = (f"| {title}{suffix} | {numbers['overall']:.2f} | {g['many']} | "
                   f"{g['medium']} | {g['few']} |")
            assert row in table, (row, table)
    csv_head = open(tmp_path / "tte" / "per_class.csv").readline().strip()
    assert csv_head == "class,name,train_count,test_count,accuracy,accuracy_five_crop"

    # The ensembled number is the accuracy of the mean of per-view logits (the validation
    # curves' too); the single-view one is what an evaluation without ensembling reports,
    # whose table is as before.
    assert ens["overall"] == pytest.approx(_independent_accuracy(ctx, ctx.params, phase, "test"))
    scalars = inference.validation_scalars(ctx, ctx.params, phase)
    assert scalars["val_five_crop/overall"] == pytest.approx(
        _independent_accuracy(ctx, ctx.params, phase, "val"))
    config = ctx.config.copy_and_resolve_references()
    config.eval.ensemble = "none"
    plain = inference.evaluate(dataclasses.replace(ctx, config=config), ctx.params, phase,
                               "test", str(tmp_path / "plain"), "tte")
    assert plain["overall"] == saved["overall"] and "ensembled" not in plain
    assert "ensembled" not in open(tmp_path / "plain" / "table.md").read()


@pytest.mark.parametrize("field,value,says", [
    ("ensemble", "multi_crop",
     "eval.ensemble='multi_crop': expected one of ['none', 'five_crop', 'ten_crop']"),
    ("ensemble_expand", -1, "eval.ensemble_expand=-1: expected an integer >= 0")])
def test_a_bad_value_is_one_line(field, value, says):
    config = base_config()
    config.eval[field] = value
    with pytest.raises(ConfigError) as err:
        schema.check(config)
    assert str(err.value).startswith(says) and "\n" not in str(err.value)
