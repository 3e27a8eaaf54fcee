"""configs/places_lt.py through the real trainer: the shipped Places-LT lists (365 classes,
62,500 / 7,300 / 36,500 entries), 224 px crops from a 256 resize, the release's shot groups
and the LPT constants (10 prompt tokens, pool 20, K = 6 shared blocks, top-2), with only the
backbone made small and random and the pixels stubbed.

The stub: a prepared directory (the format pods read) whose records keep every list entry's
path and label and hold a 16x16 JPEG, so no 100k files are written. The backbone: a random
ViT in big_vision layout at 224 px, patch 32, width 32, 2 heads, MLP 64 and depth 8, not 12:
K = 6 stays as configured (the group prompts then cover blocks 6-7), and compiling 8 blocks
instead of 12 cuts this test's CPU time by about a quarter (compiling the two train steps
dominates it).
"""

import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lpt_jax import data, tree
from lpt_jax.data import list_datasets, testing  # noqa: E402
from lpt_jax.run import exports, rundir, trainer  # noqa: E402

from helpers import CONFIGS, REPO, TINY_BLOCK, load_config  # noqa: E402
from tiny_run import make_backbone  # noqa: E402

SHIPPED = REPO / "lpt_jax" / "data" / "splits" / "places_lt"
SMALL_VIT = dict(variant=None, **TINY_BLOCK, depth=7, patch_size=32)  # K=6: one group block
STEPS = 2            # per phase
BATCH = 8            # per stream: one image per device on the 8 test devices, 2 classes x 4
EVAL_EXAMPLES = 16


def _list_counts(name):
    """Training counts straight from the shipped gzip list (independent of lpt_jax's parser)."""
    with gzip.open(SHIPPED / name, "rt") as f:
        labels = [int(line.rsplit(maxsplit=1)[1]) for line in f if line.strip()]
    return labels, np.bincount(labels, minlength=365)


def places_config(tmp_path):
    """configs/places_lt.py's get_config(), locked as run.py locks it, made small
    only where the CPU needs it."""
    config = load_config(CONFIGS / "places_lt.py")
    config.lock()  # as run.py's DEFINE_config_file(lock_config=True): no new fields by typo
    # the shipped lists, parsed by the loader that `format='files'` runs
    class_names, lists = list_datasets.load_lists(list_datasets.PLACES_LT, config.data)
    testing.write_prepared_stub(str(tmp_path / "places_prepared"), "places_lt", class_names,
                                lists, testing.tiny_jpegs(16))
    vit = dict(config.model.vit, **SMALL_VIT)
    make_backbone(tmp_path / "vit.npz", **vit)
    with config.unlocked():  # the small ViT needs width/depth fields the variant implies
        config.model.vit = vit
    config.backbone.checkpoint = str(tmp_path / "vit.npz")
    config.data.root = str(tmp_path / "places_prepared")
    config.phase1.batch_size = config.phase2.batch_size = BATCH
    config.eval.batch_size = BATCH
    config.eval.max_examples = EVAL_EXAMPLES
    config.eval.plot = False
    config.train.num_devices = 8
    config.train.max_steps = STEPS
    config.train.log_every_steps = 1
    return config


@pytest.fixture(scope="module")
def places_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("places")
    config = places_config(tmp)
    workdir = str(tmp / "wd")
    report = trainer.train(config, workdir)
    return config, workdir, report


def test_config_keeps_the_real_shapes_and_constants(places_run):
    config, _, _ = places_run
    assert (config.data.name, config.data.image_size, config.data.resize_size) == (
        "places_lt", 224, 256)
    assert config.model.vit.image_size == 224 and config.model.vit.depth == SMALL_VIT["depth"]
    lpt = config.model.lpt
    assert (lpt.prompt_length, lpt.pool_size, lpt.shared_depth, lpt.top_k) == (10, 20, 6, 2)
    assert config.loss.cb.name == config.loss.ib.name == "agcl"


def test_source_holds_the_shipped_lists(places_run):
    config, _, _ = places_run
    src = data.get_source(config.data)
    assert src.splits["train"].store.kind == "bytes"  # read through the prepared format
    assert src.num_classes == 365 and src.class_names[0] == "airfield"
    for split, name, n in (("train", "Places_LT_train.txt.gz", 62_500),
                           ("val", "Places_LT_val.txt.gz", 7_300),
                           ("test", "Places_LT_test.txt.gz", 36_500)):
        labels, _ = _list_counts(name)
        assert len(src.splits[split]) == len(labels) == n
        np.testing.assert_array_equal(src.splits[split].labels, labels)
    _, counts = _list_counts("Places_LT_train.txt.gz")
    assert (counts.max(), counts.min()) == (4980, 5)
    np.testing.assert_array_equal(src.train_counts, counts)


def test_both_phases_ran_their_steps(places_run):
    _, workdir, _ = places_run
    for phase in (1, 2):
        _, meta = exports.read(rundir.export_path(workdir, phase))
        assert meta["step"] == STEPS and meta["num_classes"] == 365
        steps = [int(s) for s in os.listdir(Path(workdir) / f"phase{phase}" / "checkpoints")
                 if s.isdigit()]
        assert max(steps) == STEPS


def test_exports_have_the_places_shapes(places_run):
    _, workdir, _ = places_run
    width, depth, k = SMALL_VIT["width"], SMALL_VIT["depth"], 6
    p1 = tree.flatten(exports.read(rundir.export_path(workdir, 1))[0])
    p2 = tree.flatten(exports.read(rundir.export_path(workdir, 2))[0])
    assert p1["shared_prompt"].shape == (depth, 10, width)
    assert p1["head/kernel"].shape == (width, 365)
    assert p2["head/kernel"].shape == (width, 365)
    assert p2["pool_prompts"].shape == (20, depth - k, 10, width)
    assert p2["pool_keys"].shape == (20, width)
    for v in list(p1.values()) + list(p2.values()):
        assert np.all(np.isfinite(v))


def test_reports_cover_365_classes_and_release_groups(places_run):
    _, workdir, report = places_run
    results = Path(workdir) / "results"
    with open(results / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    _, counts = _list_counts("Places_LT_train.txt.gz")
    assert len(rows) == 365
    assert [int(r["class"]) for r in rows] == list(range(365))
    assert [int(r["train_count"]) for r in rows] == counts.tolist()
    assert sum(int(r["test_count"]) for r in rows) == EVAL_EXAMPLES
    saved = json.loads((results / "results.json").read_text())
    assert saved["num_examples"] == EVAL_EXAMPLES == report["num_examples"]
    groups = {rule: tuple(saved[rule][f"{g}_classes"] for g in ("many", "medium", "few"))
              for rule in ("release", "oltr")}
    # expected from the list counts by the release rule (few <= 20) and OLTR's (few < 20)
    release = (int((counts > 100).sum()), int(((counts > 20) & (counts <= 100)).sum()),
               int((counts <= 20).sum()))
    assert groups["release"] == release == (131, 157, 77)
    assert groups["oltr"] == (131, 163, 71)
    for phase in (1, 2):  # model selection evaluates val (a prefix of it here), never test
        val = json.loads((Path(workdir) / f"phase{phase}" / "val" / "results.json").read_text())
        assert val["split"] == "val" and val["num_examples"] == EVAL_EXAMPLES

