"""Several exports on one frozen backbone (lpt_jax.serving): a mixed-task batch, in any order,
gives each example its own task's single-task prediction (the single-task forward that
predict_files runs, `inference.make_predict_fn` over LPT.phase1 / LPT.phase2, which
test_lpt_model checks against an independent implementation; probabilities recomputed here
from its cosines); exports of another backbone, unknown tasks and tasks that cannot share a
batch are refused in one line.

The exports are written directly (differently seeded random prompts, pools, keys and heads on
the tiny backbone, loud so that each part shows in the logits): the property does not depend
on training. One phase-1 task and two phase-2 tasks with different class counts, pool sizes
and top-k values.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import data, parallel, predict_inputs, tree
from lpt_jax.backbones import vit, vit_weights
from lpt_jax.errors import ConfigError, ExportError
from lpt_jax.method.lpt import METHOD
from lpt_jax.method.lpt_model import lpt_from_config
from lpt_jax.run import exports, inference
from lpt_jax.serving import MultiTaskPredictor, RequestError
from lpt_jax.weights import npz

from helpers import REPO, TINY_VIT, make_image_folder, vit_kwargs
from tiny_run import tiny_config

# name: (phase, classes, pool size, top-k, seed); 2 test images per class: 6 + 8 + 4 rows
TASKS = {"birds": (1, 3, 5, 2, 1), "cars": (2, 4, 5, 2, 2), "dogs": (2, 2, 3, 1, 3)}
SCALE = 20.0  # the configs' loss.cb.scale: probabilities are softmax(SCALE * cosines)


def _abstract(model, size):
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]


def write_backbone(path, seed):
    """A random tiny ViT (TINY_VIT) in big_vision layout, drawn in NumPy (nothing compiled)."""
    rng = np.random.default_rng(seed)

    def draw(p, leaf):
        name = jax.tree_util.keystr(p)
        if "scale" in name:
            return 1 + 0.1 * rng.standard_normal(leaf.shape)
        std = 0.1 if "bias" in name else 1 / np.sqrt(max(leaf.shape[0], 1))
        return std * rng.standard_normal(leaf.shape)
    shapes = _abstract(vit.ViT(num_classes=None, **vit_kwargs(TINY_VIT)), TINY_VIT["image_size"])
    vit_weights.save_big_vision_npz(str(path), jax.tree_util.tree_map_with_path(draw, shapes))
    return str(path)


def write_export(path, config, phase, num_classes, seed):
    """Random loud trained leaves of `phase` in the model's shapes, with the trainer's meta."""
    shapes = _abstract(lpt_from_config(config.model, num_classes), config.model.vit.image_size)
    rng = np.random.default_rng(seed)
    trained = exports.exported_subtree(
        jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes),
        METHOD.phase(phase))
    meta = {"phase": phase, "step": 1, "config": json.loads(config.to_json_best_effort()),
            "backbone": npz.file_fingerprint(config.backbone.checkpoint),
            "num_classes": num_classes,
            "class_names": [f"class_{c}" for c in range(num_classes)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    exports.write(str(path), trained, meta)
    return str(path)


def single_task_predict(task):
    """The single-task path's forward for one export: `inference.make_predict_fn` (LPT.phase1
    / LPT.phase2) on the backbone with the export's leaves put in, as predict_files runs it
    (its untrained leaves, the phase-1 pool, are zeros). Returns (fn(params, images), params)."""
    config = task["config"]
    model = lpt_from_config(config.model, TASKS[task["name"]][1])
    params, meta = exports.apply(_abstract(model, config.model.vit.image_size), task["export"])
    params["backbone"] = vit.load_params(config.backbone.checkpoint, params["backbone"],
                                         ignore=config.backbone.ignore, model=model.backbone)
    params = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        params)
    predict = inference.make_predict_fn(model, METHOD.phase(meta["phase"]),
                                        parallel.make_mesh(jax.devices()[:1]))
    return lambda p: [np.asarray(x) for x in predict(p, jnp.asarray(task["images"]))], params


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Per task: its config, export, test files and images, and its single-task (logits,
    pool indices); the predictor of all three, 16 rows a batch."""
    tmp = tmp_path_factory.mktemp("serving")
    write_backbone(tmp / "vit.npz", seed=0)
    base = tiny_config(tmp)  # the tiny run's config, on tmp/vit.npz
    tasks = {}
    for name, (phase, classes, pool, top_k, seed) in TASKS.items():
        config = base.copy_and_resolve_references()
        config.data.root = str(make_image_folder(tmp / name / "data", counts=(3,) * classes,
                                                 eval_per_class=2, seed=seed))
        config.model.lpt.pool_size, config.model.lpt.top_k = pool, top_k
        export = write_export(tmp / name / f"phase{phase}" / "export.npz", config, phase,
                              classes, seed)
        files = sorted(str(p) for p in (tmp / name / "data" / "test").glob("*/*.png"))
        task = tasks[name] = dict(name=name, config=config, export=export, files=files,
                                  phase=phase, images=data.load_image_files(files, config.data))
        task["predict"], task["params"] = single_task_predict(task)
        task["logits"], task["indices"] = task["predict"](task["params"])
    predictor = MultiTaskPredictor.from_exports(
        base.backbone.checkpoint, {n: t["export"] for n, t in tasks.items()}, batch_size=16)
    return dict(tmp=tmp, base=base, tasks=tasks, predictor=predictor)


def softmax(logits):
    z = SCALE * np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _check_rows(tasks, got, names, rows):
    for j, (name, row) in enumerate(zip(names, rows)):
        task = tasks[name]
        logits, c = task["logits"][row], TASKS[name][1]
        np.testing.assert_allclose(got.logits[j, :c], logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.probabilities[j, :c], softmax(logits), atol=1e-5, rtol=0)
        assert np.all(got.logits[j, c:] == -np.inf) and np.all(got.probabilities[j, c:] == 0)
        top_k = TASKS[name][3] if task["phase"] == 2 else 0
        assert got.indices[j, :top_k].tolist() == task["indices"][row].tolist()
        assert np.all(got.indices[j, top_k:] == -1)


def test_mixed_batches_in_any_order_equal_single_task_predictions(served):
    """Three random orders of all 18 images; batches of 16 + 2 rows. Every order keeps one
    random phase pattern (11 phase-2 rows in the first batch, padded to 12; 1 of 2 in the
    second, padded to 2), so the test compiles two programs, not one per mix."""
    tasks, predictor = served["tasks"], served["predictor"]
    rng = np.random.default_rng(0)
    pattern = np.concatenate([rng.permutation([2] * 11 + [1] * 5), [1, 2]])
    by_phase = {p: [(n, r) for n, t in tasks.items() if t["phase"] == p
                    for r in range(len(t["files"]))] for p in (1, 2)}
    for _ in range(3):
        pools = {p: [v[i] for i in rng.permutation(len(v))] for p, v in by_phase.items()}
        order = [pools[p].pop() for p in pattern]
        names, rows = [n for n, _ in order], [r for _, r in order]
        images = np.stack([tasks[n]["images"][r] for n, r in order])
        _check_rows(tasks, predictor.scores(images, names), names, rows)
    # a batch of phase-1 rows only runs no second pass
    _check_rows(tasks, predictor.scores(tasks["birds"]["images"][:2], ["birds"] * 2),
                ["birds"] * 2, [0, 1])
    # the selections differ between examples, so one pick for all would have failed above
    assert len({tuple(i) for i in tasks["cars"]["indices"]}) > 1


def test_the_tolerance_would_see_another_tasks_prompts(served):
    """Controls: the cars reference with the birds' shared prompt, or with its pool entries
    shifted, moves the logits far beyond 1e-5."""
    cars, birds = served["tasks"]["cars"], served["tasks"]["birds"]
    flat = tree.flatten(cars["params"])

    def logits_with(**leaves):
        return cars["predict"](tree.unflatten({**flat, **leaves}))[0]
    moved = logits_with(shared_prompt=birds["params"]["shared_prompt"])
    assert np.abs(moved - cars["logits"]).max() > 1e-3
    moved = logits_with(pool_prompts=np.roll(flat["pool_prompts"], 1, axis=0))
    assert np.abs(moved - cars["logits"]).max() > 1e-3


def test_rows_name_their_task_and_classes(served):
    tasks, predictor = served["tasks"], served["predictor"]
    rows = predictor.predict(tasks["birds"]["images"][:2], ["birds"] * 2, top_k=5)
    for row, logits in zip(rows, tasks["birds"]["logits"][:2]):
        assert row["task"] == "birds" and len(row["top_k"]) == 3  # at most its 3 classes
        assert [t["label"] for t in row["top_k"]] == np.argsort(-logits).tolist()
        assert [t["name"] for t in row["top_k"]] == [f"class_{c}" for c in np.argsort(-logits)]


def test_unknown_task_is_one_clear_error(served):
    predictor = served["predictor"]
    with pytest.raises(RequestError, match=r"unknown task 'cats'; this predictor serves "
                                           r"'birds', 'cars', 'dogs'"):
        predictor.predict(served["tasks"]["cars"]["images"][:2], ["cars", "cats"])
    with pytest.raises(RequestError, match=r"images of shape \(2, 16, 16, 3\)"):
        predictor.predict(np.zeros((2, 16, 16, 3)), ["cars", "cars"])


def test_images_that_are_not_preprocessed_are_refused_in_one_line(served):
    predictor, images = served["predictor"], served["tasks"]["cars"]["images"][:2]
    nan = images.copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(RequestError, match=r"image 1 holds non-finite values"):
        predictor.predict(nan, ["cars", "cars"])
    with pytest.raises(RequestError, match=r"images of dtype uint8: expected floats in \[-1, 1\]"):
        predictor.predict(np.full(images.shape, 200, np.uint8), ["cars", "cars"])
    with pytest.raises(RequestError, match=r"image values reach 255: expected \[-1, 1\]"):
        predictor.predict(np.full(images.shape, 255.0, np.float32), ["cars", "cars"])
    with pytest.raises(RequestError, match=r"top_k=True: expected a positive integer"):
        predictor.predict(images, ["cars", "cars"], top_k=True)


def test_exports_of_another_backbone_are_refused(served):
    other = write_backbone(served["tmp"] / "other_vit.npz", seed=1)
    with pytest.raises(ExportError, match=r"\(task 'birds'\) was trained on another backbone "
                                          r".*prompts only work on the backbone they were"):
        MultiTaskPredictor.from_exports(other, {"birds": served["tasks"]["birds"]["export"],
                                                "cars": served["tasks"]["cars"]["export"]})


def _drop_identity(path):
    trained, meta = exports.read(path)
    del meta["backbone"]
    exports.write(path, trained, meta)


@pytest.mark.parametrize("prompt_length,edit,says", [
    (4, None, r"\(task 'odd'\) cannot share a batch with task 'cars': its "
              r"model.lpt.prompt_length is 4, task 'cars''s is 10"),
    (10, _drop_identity, r"\(task 'odd'\) records no backbone identity"),
], ids=["prompt length", "no backbone identity"])
def test_exports_that_cannot_join_are_refused(served, prompt_length, edit, says):
    config = served["tasks"]["cars"]["config"].copy_and_resolve_references()
    config.model.lpt.prompt_length = prompt_length
    odd = write_export(served["tmp"] / f"odd{prompt_length}" / "export.npz", config, 2, 4, 7)
    if edit:
        edit(odd)
    with pytest.raises(ExportError, match=says):
        MultiTaskPredictor.from_exports(served["base"].backbone.checkpoint,
                                        {"cars": served["tasks"]["cars"]["export"], "odd": odd})


def test_command_line_task_names(served, tmp_path):
    tasks = served["tasks"]
    birds, cars = tasks["birds"]["export"], tasks["cars"]["export"]
    assert predict_inputs.predict_plan(birds, ["a.png"], None) is None  # one export: single-task path
    assert predict_inputs.task_exports(f"{birds},c={cars}") == {"birds": birds, "c": cars}
    with pytest.raises(ConfigError, match="two exports serve the task 'birds'"):
        predict_inputs.task_exports(f"{birds},{birds}")
    with pytest.raises(ConfigError, match=r"a.png names no task; write task=path"):
        predict_inputs.predict_plan(f"{birds},{cars}", ["a.png"], None)
    with pytest.raises(ConfigError, match=r"asks for task 'cats', which no --export names"):
        predict_inputs.predict_plan(f"{birds},{cars}", [f"cats={tmp_path}"], None)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "cars", "file": tasks["cars"]["files"][0]})
                        + "\n\n" + json.dumps({"task": "cars", "path": "x.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"line 3: expected an object with exactly"):
        predict_inputs.predict_plan(f"{birds},{cars}", [], str(requests))
    requests.write_text(json.dumps({"task": "cars", "file": tasks["cars"]["files"][0]}))
    assert predict_inputs.predict_plan(f"{birds},{cars}", [], str(requests)) == (
        {"birds": birds, "cars": cars}, [("cars", tasks["cars"]["files"][0])])


def test_command_line_predict_with_several_exports(served, tmp_path):
    """run.py --mode=predict with a named and an unnamed export (named after its workdir)
    and task=path files (a folder too): one JSON line per file with its task, top-k labels
    and probabilities of the single-task forward."""
    tasks = served["tasks"]
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import sys, pathlib\nsys.path.insert(0, %r)\nsys.path.insert(0, %r)\n"
                   "from tiny_run import tiny_config\n"
                   "def get_config():\n    return tiny_config(pathlib.Path(%r))\n"
                   % (str(REPO), str(REPO / "tests"), str(served["tmp"])))
    cars_folder = served["tmp"] / "cars" / "data" / "test" / "class_1"
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, "run.py", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
         "--mode=predict", f"--export=b={tasks['birds']['export']},{tasks['cars']['export']}",
         f"--files=cars={cars_folder},b={tasks['birds']['files'][4]}", f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = [("cars", i) for i, f in enumerate(tasks["cars"]["files"])
            if f.startswith(str(cars_folder))] + [("birds", 4)]
    assert [(r["task"], r["file"]) for r in rows] == [
        ("b" if n == "birds" else n, tasks[n]["files"][i]) for n, i in want]
    for r, (name, i) in zip(rows, want):
        logits = tasks[name]["logits"][i]
        assert [t["label"] for t in r["top_k"]] == np.argsort(-logits)[:5].tolist()
        probs = softmax(logits)
        for t in r["top_k"]:
            assert t["probability"] == pytest.approx(probs[t["label"]], abs=1e-5)
            assert t["score"] == pytest.approx(logits[t["label"]], abs=1e-5)
