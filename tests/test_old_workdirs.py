"""Workdirs and exports written before the redesign (commit 79f15d4, written by
tests/data/workdir_79f15d4: the tiny run's config.json and its phase-1 and phase-2 exports,
2 steps each) still resume, evaluate and serve: the run identity is now derived from the field
declarations (fields added since count at their default, fields now incidental are left out),
and exports without a recorded method are LPT's."""

import io
import json
import shutil

import numpy as np

from lpt_jax.run import exports as exports_lib
from lpt_jax.run import inference, rundir, trainer
from lpt_jax.serving import MultiTaskPredictor

from helpers import DATA
from tiny_run import tiny_config

OLD = DATA / "workdir_79f15d4"


def test_a_workdir_of_79f15d4_resumes_evaluates_and_serves(tmp_path):
    config = tiny_config(tmp_path / "inputs", epochs=1)
    config.train.phases, config.train.max_steps, config.eval.plot = "1,2", 2, False
    workdir = tmp_path / "wd"
    shutil.copytree(OLD, workdir)
    recorded = json.loads((workdir / "config.json").read_text())
    assert "method" not in recorded["config"]["model"]  # written before methods were named
    assert "prefetch" in recorded["config"]["data"]     # incidental now: left out
    # The inputs regenerated here (random backbone, synthetic images) stand in for the old
    # run's: the backbone's identity is taken from them; the data identity is the record's
    # own (names and counts: it predates the content digest, which is then not compared).
    ctx = inference.build_context(config, str(workdir))
    assert "train_content_sha256" not in recorded["inputs"]["data"]
    recorded["inputs"]["backbone"] = rundir.run_identity(
        config, ctx.backbone_identity, ctx.source.identity())["inputs"]["backbone"]
    (workdir / "config.json").write_text(json.dumps(recorded))
    for n in (1, 2):  # likewise the backbone identity the exports record (same file format)
        _set_backbone_identity(workdir / f"phase{n}" / "export.npz", ctx.backbone_identity)

    report = trainer.train(config, str(workdir))  # both phases finished: skipped, then the table
    assert report["phase"] == 2
    assert inference.evaluate_workdir(config, str(workdir))["overall"] == report["overall"]
    exports = {f"p{n}": str(workdir / f"phase{n}" / "export.npz") for n in (1, 2)}
    predictor = MultiTaskPredictor.from_exports(config.backbone.checkpoint, exports,
                                                batch_size=8)
    scores = predictor.scores(np.zeros((2, 32, 32, 3), np.float32), ["p1", "p2"])
    assert scores.logits.shape == (2, 4) and np.isfinite(scores.logits).all()


def _set_backbone_identity(path, identity):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays[exports_lib.META_KEY].tobytes().decode())
    meta["backbone"] = identity
    arrays[exports_lib.META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
