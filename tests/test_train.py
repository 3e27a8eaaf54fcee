"""The trainer end to end on a tiny model: outputs, loss, frozen params, resume, devices, errors."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import data, tree
from lpt_jax.errors import CheckpointError, ConfigError, Stopped
from lpt_jax.method import optim, steps
from lpt_jax.method.lpt import PHASES
from lpt_jax.method.lpt_model import lpt_from_config
from lpt_jax.run import checkpoint as ckpt_lib
from lpt_jax.run import context, exports, inference, rundir, trainer

from helpers import tb_scalars
from tiny_run import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    config = tiny_config(tmp, epochs=3)
    config.eval.every_epochs = 1  # validation curves during training
    workdir = str(tmp / "wd")
    report = trainer.train(config, workdir)
    return config, workdir, report


def test_outputs_exist_and_are_well_formed(trained):
    config, workdir, report = trained
    results = os.path.join(workdir, "results")
    table = open(os.path.join(results, "table.md")).read()
    assert "| release rule (few <= 20) |" in table and "| OLTR rule (few < 20) |" in table
    saved = json.load(open(os.path.join(results, "results.json")))
    assert saved["num_examples"] == 16 and 0 <= saved["overall"] <= 100
    assert saved["release"]["many_classes"] + saved["release"]["medium_classes"] + \
        saved["release"]["few_classes"] == 4
    rows = open(os.path.join(results, "per_class.csv")).read().strip().splitlines()
    assert rows[0] == "class,name,train_count,test_count,accuracy" and len(rows) == 5
    assert [int(r.split(",")[2]) for r in rows[1:]] == [24, 12, 6, 3]
    import matplotlib.image
    png = matplotlib.image.imread(os.path.join(results, "per_class.png"))
    assert png.ndim == 3 and png.shape[0] > 100
    for phase in (1, 2):
        pdir = os.path.join(workdir, f"phase{phase}")
        assert glob.glob(os.path.join(pdir, "events.out.tfevents.*"))
        assert os.path.exists(os.path.join(pdir, "val", "table.md"))
        steps = sorted(int(s) for s in os.listdir(os.path.join(pdir, "checkpoints")))
        assert steps[-1] == 18 and len(steps) <= config.train.keep_checkpoints


def test_validation_curves_during_training(trained):
    """eval.every_epochs=1: val accuracy at every epoch boundary but the last (the end of a
    phase has its own val report); written from the val split, never test."""
    _, workdir, _ = trained
    for phase in (1, 2):
        pdir = os.path.join(workdir, f"phase{phase}")
        for tag in ("val/overall", "val/medium", "val/few"):  # train counts 24/12/6/3
            points = tb_scalars(pdir, tag)
            assert [s for s, _ in points] == [6, 12], (tag, points)
            assert all(0 <= v <= 100 for _, v in points)
        assert not tb_scalars(pdir, "val/many")  # no many-shot class: no curve
    # what is logged: the IB weight under a name that does not read as time remaining, and
    # no constant-zero matching term in phase 1
    assert tb_scalars(os.path.join(workdir, "phase1"), "ib_weight")
    assert not tb_scalars(os.path.join(workdir, "phase1"), "match_cb")
    assert tb_scalars(os.path.join(workdir, "phase2"), "match_cb")


def test_loss_goes_down(trained):
    _, workdir, _ = trained
    loss = [v for _, v in tb_scalars(os.path.join(workdir, "phase1"), "loss")]
    assert len(loss) == 9
    assert np.mean(loss[-2:]) < 0.5 * np.mean(loss[:2]), loss


def test_phase2_logs_matching_and_pool_use(trained):
    _, workdir, _ = trained
    pdir = os.path.join(workdir, "phase2")
    match = [v for _, v in tb_scalars(pdir, "match_cb")]
    assert match and all(0 < m <= 2 for m in match)  # sum of top-2 cosines
    used = [v for _, v in tb_scalars(pdir, "pool_entries_used")]
    assert used and all(2 <= u <= 5 for u in used)


def test_exports_hold_only_what_each_phase_trains(trained):
    _, workdir, _ = trained
    p1, meta1 = exports.read(rundir.export_path(workdir, 1))
    p2, meta2 = exports.read(rundir.export_path(workdir, 2))
    assert sorted(tree.flatten(p1)) == ["head/kernel", "shared_prompt"]
    # phase 2's export is self-contained: it carries phase 1's (frozen) shared prompt too
    assert sorted(tree.flatten(p2)) == ["head/kernel", "pool_keys", "pool_prompts",
                                        "shared_prompt"]
    np.testing.assert_array_equal(p1["shared_prompt"], p2["shared_prompt"])
    assert meta1["phase"] == 1 and meta2["phase"] == 2
    assert meta2["backbone"]["size"] == os.path.getsize(meta2["config"]["backbone"]["checkpoint"])
    assert meta2["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    # phase 2 starts its head from phase 1's and trains it further
    assert not np.array_equal(p1["head"]["kernel"], p2["head"]["kernel"])


def test_frozen_params_bit_identical_after_training(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    config.optim.warmup_epochs = 0
    ctx = context.build_context(config, str(tmp_path / "wd"))
    before = jax.device_get(ctx.params)
    after1 = trainer.run_phase(ctx, PHASES[0], ctx.params)
    after2 = trainer.run_phase(ctx, PHASES[1], after1)
    for a, b, patterns in ((before, after1, PHASES[0].trainable), (after1, after2, PHASES[1].trainable)):
        fa, fb = tree.flatten(a), tree.flatten(b)
        for k in fa:
            if tree.matches(k, patterns):
                assert not np.array_equal(fa[k], fb[k]), f"{k} did not train"
            else:
                np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_optimizer_is_sgd_with_momentum_and_coupled_decay():
    """The direction the step scales by -lr: d1 = g + wd*p, d2 = m*d1 + g + wd*p."""
    cfg = tiny_config.__globals__["base_config"]().optim
    tx = optim.make_optimizer(cfg)
    params = {"w": jnp.ones((2, 4))}
    grads = {"w": 3.0 * jnp.ones((2, 4))}
    state = tx.init(params)
    d1, state = tx.update(grads, state, params)
    d2, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(d1["w"], 3.0 + 0.01, rtol=1e-6)
    np.testing.assert_allclose(d2["w"], 0.9 * 3.01 + 3.01, rtol=1e-6)


def test_train_step_state_holds_only_the_trainable_subtree(tmp_path):
    """Freezing is structural: frozen leaves are outside the state and its optimiser state."""
    config = tiny_config(tmp_path)
    model = lpt_from_config(config.model, 4)
    params = context.init_params(model, config)
    for phase in PHASES:
        ts = steps.make_train_step(model, phase, config, class_counts=np.array([8, 4, 2, 1]),
                                   steps_per_epoch=2, batch_size=8)
        state, frozen = ts.init(params)
        trained = set(tree.flatten(state["trainable"]))
        assert trained == {k for k in tree.flatten(params) if tree.matches(k, phase.trainable)}
        assert "backbone" in frozen and not trained & set(tree.flatten(frozen))
        momentum = [x.shape for x in jax.tree.leaves(state["opt_state"])]
        assert sorted(momentum) == sorted(x.shape for x in jax.tree.leaves(state["trainable"]))


def test_a_skipped_step_keeps_one_clock_for_lr_and_data(tmp_path):
    """A non-finite step is not applied, but the step counter still advances, and the next
    step uses the learning rate of its own step number (one clock for data position, lr and
    the IB weight): skip-then-step == a state that starts one step later."""
    config = tiny_config(tmp_path)
    config.optim.warmup_epochs = 3  # lr changes at every step below (one step per epoch)
    ctx = context.build_context(config, str(tmp_path / "wd"))
    ts = steps.make_train_step(ctx.model, PHASES[0], config, class_counts=np.array([8, 4, 2, 1]),
                               steps_per_epoch=1, batch_size=8)
    step = jax.jit(ts.fn)
    rng = np.random.default_rng(0)
    good = {b: {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                "label": np.arange(8, dtype=np.int32) % 4} for b in ("cb", "ib")}
    bad = jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, good)
    state, frozen = ts.init(ctx.params)
    # no second clock: the optimiser state holds momentum only (no step count of its own)
    assert all(np.ndim(x) > 0 for x in jax.tree.leaves(state["opt_state"]))
    skipped, m_bad = step(state, frozen, bad)
    assert int(m_bad["nonfinite"]) == 1 and int(skipped["step"]) == 1
    for a, b in zip(jax.tree.leaves(skipped["trainable"]), jax.tree.leaves(state["trainable"])):
        np.testing.assert_array_equal(a, b)
    after_skip, m = step(skipped, frozen, good)
    later = dict(state, step=jnp.int32(1))
    direct, m_direct = step(later, frozen, good)
    assert float(m["lr"]) == float(ts.schedule(1)) != float(ts.schedule(0))
    for a, b in zip(jax.tree.leaves(after_skip), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)
    assert float(m["ib_weight"]) == float(m_direct["ib_weight"])


def test_a_workdir_resumes_from_another_path_but_not_on_other_data(tmp_path):
    """config.json compares what the inputs are (backbone hash, data counts and names), not
    where they are: a moved clone resumes; a data folder that grew is refused."""
    import shutil

    def config_in(folder):
        c = tiny_config(folder)
        c.train.phases, c.train.max_steps, c.eval.plot = "1", 2, False
        return c
    first = tmp_path / "first"
    first.mkdir()
    trainer.train(config_in(first), str(first / "wd"))
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    config = config_in(moved)
    assert config.data.root != str(first / "data")
    trainer.train(config, str(moved / "wd"))  # accepted: the same run, elsewhere
    rare = sorted((moved / "data" / "train" / "class_3").iterdir())
    replaced = moved / "replaced"  # images replaced under the same names and counts
    shutil.copytree(moved, replaced)
    shutil.copy(rare[0], rare[0].with_name("extra" + rare[0].suffix))
    with pytest.raises(ConfigError, match="read other inputs.*data.num_train"):
        trainer.train(config, str(moved / "wd"))
    other = sorted((replaced / "data" / "train" / "class_0").iterdir())[-1]
    target = replaced / "data" / "train" / "class_3" / rare[0].name
    assert other.stat().st_size != target.stat().st_size
    shutil.copy(other, target)
    with pytest.raises(ConfigError, match=r"read other inputs.*\(data.train_content_sha256\)"):
        trainer.train(config_in(replaced), str(replaced / "wd"))


def test_kill_and_resume_is_bitwise(tmp_path):
    config = tiny_config(tmp_path)
    config.train.phases = "1"
    trainer.train(config, str(tmp_path / "straight"))
    config.train.stop_after_steps = 5
    with pytest.raises(Stopped, match="step 5 .train.stop_after_steps."):
        trainer.train(config, str(tmp_path / "resumed"))
    assert 5 in [int(s) for s in os.listdir(tmp_path / "resumed/phase1/checkpoints")]
    config.train.stop_after_steps = 0
    trainer.train(config, str(tmp_path / "resumed"))
    a, _ = exports.read(rundir.export_path(str(tmp_path / "straight"), 1))
    b, _ = exports.read(rundir.export_path(str(tmp_path / "resumed"), 1))
    for k, v in tree.flatten(a).items():
        np.testing.assert_array_equal(v, tree.flatten(b)[k], err_msg=k)


def test_eight_devices_match_one(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    results = {}
    for n in (1, 8):
        config = tiny_config(tmp_path, epochs=1)
        config.train.num_devices = n
        config.train.max_steps = 3
        config.optim.warmup_epochs = 0
        config.optim.base_lr = 5.0  # large steps, so that a difference would show
        config.eval.plot = False
        trainer.train(config, str(tmp_path / f"wd{n}"))
        results[n] = [exports.read(rundir.export_path(str(tmp_path / f"wd{n}"), p))[0]
                      for p in (1, 2)]
    init = context.init_params(lpt_from_config(config.model, 4), config)
    for phase in (0, 1):
        one, eight = tree.flatten(results[1][phase]), tree.flatten(results[8][phase])
        for k in one:
            np.testing.assert_allclose(one[k], eight[k], atol=2e-5, err_msg=k)
    moved = np.abs(results[1][0]["shared_prompt"] - init["shared_prompt"]).max()
    assert moved > 1e-3


def test_checkpoint_is_small_for_vit_b16_with_365_classes(tmp_path):
    """The real state of phase 2 (the bigger one) for ViT-B/16 and a 365-way head."""
    from configs.common import base_config
    config = base_config()
    model = lpt_from_config(config.model, 365)
    params = context.init_params(model, config)  # backbone stays abstract: never materialised
    backbone_sizes = {int(np.prod(x.shape)) for x in jax.tree.leaves(params["backbone"])
                      if np.prod(x.shape) > 10_000}
    state, _ = steps.make_train_step(model, PHASES[1], config, class_counts=np.ones(365),
                                     steps_per_epoch=245, batch_size=256).init(params)
    ckpt = ckpt_lib.PhaseCheckpointer(str(tmp_path / "ck"), every_steps=1, keep=1)
    ckpt.save(1, state, {"phase": 2}, force=True)
    ckpt.close()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ck")
                for f in fs)
    assert total < 10_000_000, total
    saved_sizes = {int(np.prod(x.shape)) for x in jax.tree.leaves(state)}
    assert not saved_sizes & backbone_sizes
    assert sum(saved_sizes) < 2_000_000


def test_errors_before_the_first_step(tmp_path):
    config = tiny_config(tmp_path)
    config.train.phases = "2"
    with pytest.raises(ConfigError, match="phase 2 needs the result of phase 1"):
        trainer.train(config, str(tmp_path / "a"))
    config = tiny_config(tmp_path, batch_size=12)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        trainer.train(config, str(tmp_path / "b"))
    config = tiny_config(tmp_path)
    config.backbone.checkpoint = str(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="not found"):
        trainer.train(config, str(tmp_path / "c"))
    config = tiny_config(tmp_path)
    config.model.vit.width = 48
    with pytest.raises(CheckpointError, match="shape mismatch"):
        trainer.train(config, str(tmp_path / "d"))
    config = tiny_config(tmp_path)
    config.data.image_size = 24
    with pytest.raises(ConfigError, match="image_size"):
        trainer.train(config, str(tmp_path / "e"))


def test_refuses_to_resume_a_different_run(tmp_path):
    config = tiny_config(tmp_path)
    config.train.max_steps = 1
    config.train.phases = "1"
    config.eval.plot = False
    trainer.train(config, str(tmp_path / "wd"))
    config.loss.cb.margin = 0.2
    with pytest.raises(ConfigError, match="loss.cb.margin"):
        trainer.train(config, str(tmp_path / "wd"))
    config.train.allow_config_change = True
    trainer.train(config, str(tmp_path / "wd"))


def test_eval_mode_reproduces_the_final_table(trained):
    config, workdir, report = trained
    again = inference.evaluate_workdir(config, workdir)
    assert again["phase"] == 2 and again["overall"] == report["overall"]
    assert os.path.exists(os.path.join(workdir, "eval", "table.md"))
    phase1 = inference.evaluate_workdir(config, workdir, rundir.export_path(workdir, 1))
    assert phase1["phase"] == 1


def test_predict_mode_gives_top_k_labels(trained):
    config, workdir, _ = trained
    files = sorted(glob.glob(os.path.join(config.data.root, "test", "class_0", "*.png")))[:3]
    config.predict.top_k = 2
    rows = list(inference.predict_files(config, workdir, files))
    assert [r["file"] for r in rows] == files
    for r in rows:
        assert len(r["top_k"]) == 2
        assert {t["name"] for t in r["top_k"]} <= {f"class_{i}" for i in range(4)}
        assert r["top_k"][0]["score"] >= r["top_k"][1]["score"]
        assert -1 <= r["top_k"][1]["score"] <= 1  # cosine logits
    # the same answer as the evaluation path gives for these images
    ctx = context.build_context(config, workdir)
    params, phase = inference.load_trained(ctx)
    logits, _ = inference.make_predict_fn(ctx.model, phase, ctx.mesh)(
        params, jnp.asarray(np.concatenate([data.load_image_files(files, config.data)] * 8)[:8]))
    assert [r["top_k"][0]["label"] for r in rows] == np.argmax(np.asarray(logits), -1)[:3].tolist()
    # probability: softmax over every class of the cosines times the loss scale (float64 here)
    z = 20.0 * np.asarray(logits, np.float64)[:3]
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    for r, p in zip(rows, want):
        for t in r["top_k"]:
            assert t["probability"] == pytest.approx(p[t["label"]], abs=1e-5)


def test_remat_and_bf16_steps_and_a_relative_workdir(tmp_path, monkeypatch):
    """Remat gives the same step; bf16 activations (float32 params and loss) stay close. The
    base run uses a relative --workdir, as the README's runs/demo does (Orbax needs absolute
    paths: the trainer must make them so)."""
    monkeypatch.chdir(tmp_path)
    results, configs = {}, {}
    for variant in ("base", "remat", "bfloat16"):
        config = configs[variant] = tiny_config(tmp_path, epochs=1)
        config.train.max_steps = 2
        config.train.phases = "1"
        config.optim.warmup_epochs = 0
        config.eval.plot = False
        if variant == "remat":
            config.model.vit.remat = True
        if variant == "bfloat16":
            config.model.vit.dtype = "bfloat16"
        workdir = f"runs/{variant}" if variant == "base" else str(tmp_path / variant)
        trainer.train(config, workdir)
        results[variant] = tree.flatten(exports.read(rundir.export_path(workdir, 1))[0])
    assert (tmp_path / "runs/base/phase1/export.npz").exists()
    assert (tmp_path / "runs/base/results/table.md").exists()
    for option, tol in (("remat", 1e-5), ("bfloat16", 2e-2)):
        for k, v in results["base"].items():
            assert results[option][k].dtype == np.float32
            np.testing.assert_allclose(results[option][k], v, atol=tol, err_msg=f"{option} {k}")
    base = configs["base"]  # resuming from the relative path's checkpoint
    base.train.max_steps = 3
    base.train.allow_config_change = True
    trainer.train(base, "runs/base")
    assert exports.read(rundir.export_path("runs/base", 1))[1]["step"] == 3


def test_phase2_trained_with_the_shared_prompt_gets_its_gradient_in_every_block(tmp_path):
    """Widening phase 2's trainable set to the shared prompt: the step no longer stops the
    gradient through the shared trunk (blocks 0..K-1), so the prompt's gradient there equals
    the release's two-pass computation's (it was silently 0 before), and a step moves it."""
    from lpt_jax.method.lpt_model import LPT
    config = tiny_config(tmp_path)
    config.phase2.trainable = ("shared_prompt", "pool_prompts", "pool_keys", "head/.*")
    config.optim.update(weight_decay=0.0, momentum=0.0, warmup_epochs=0)
    ctx = context.build_context(config, str(tmp_path / "wd"))
    phase, k = PHASES[1], config.model.lpt.shared_depth
    trainable, frozen = tree.split(ctx.params, config.phase2.trainable)
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)

    def grad_of(forward):
        def loss(t):
            out = forward(tree.merge(t, frozen), images, False, None)
            return jnp.sum(out["logits"] ** 2) - out["match"]
        return jax.grad(loss)(trainable)["shared_prompt"]

    def two_passes(params, x, train, rng):
        return ctx.model.apply({"params": params}, x, train, method=LPT.phase2_reference)
    shipped, reference = grad_of(phase.forward(ctx.model, True)), grad_of(two_passes)
    np.testing.assert_allclose(shipped, reference, atol=1e-6)
    assert np.abs(reference[:k]).max() > 1e-4  # the trunk blocks do have a gradient
    assert np.abs(grad_of(phase.forward(ctx.model))[:k]).max() == 0  # the frozen-trunk path

    step = steps.make_train_step(ctx.model, phase, config, class_counts=ctx.source.train_counts,
                                 steps_per_epoch=5, batch_size=8)
    state, frozen_state = step.init(ctx.params)
    batch = next(data.make_train_stream(ctx.source, config.data, global_batch_size=8, seed=0))
    before = np.asarray(state["trainable"]["shared_prompt"])
    after, _ = jax.jit(step.fn)(state, frozen_state, batch)
    moved = np.abs(np.asarray(after["trainable"]["shared_prompt"]) - before)
    assert moved[:k].max() > 0 and moved[k:].max() > 0
