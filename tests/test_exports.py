"""Exports are verified on load: exact keys and shapes for the phase, finite values, known
version and phase, class names equal to the data's; the error names the file and --export."""

import io
import json
import re

import numpy as np
import pytest

from lpt_jax.errors import ExportError
from lpt_jax.run import exports, inference, rundir, trainer

from tiny_run import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    config = tiny_config(tmp)
    config.train.phases, config.train.max_steps, config.eval.plot = "1", 1, False
    workdir = str(tmp / "wd")
    trainer.train(config, workdir)
    return config, workdir, tmp


def _rewrite(src, dst, edit):
    """Copies the export `src` to `dst` with `edit(arrays, meta)` applied."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop(exports.META_KEY).tobytes().decode())
    edit(arrays, meta)
    arrays[exports.META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    open(dst, "wb").write(buf.getvalue())
    return str(dst)


def _drop(key):
    return lambda arrays, meta: arrays.pop(key)


def _nan(arrays, meta):
    arrays["shared_prompt"] = arrays["shared_prompt"] * np.nan


def _phase7(arrays, meta):
    meta["phase"] = 7


def _reorder(arrays, meta):
    meta["class_names"] = meta["class_names"][::-1]


def _other_epsilon(arrays, meta):
    meta["config"]["model"]["vit"]["layernorm_epsilon"] = 1e-6


def _other_top_k_and_gelu(arrays, meta):
    meta["config"]["model"]["lpt"]["top_k"] = 1
    meta["config"]["model"]["vit"]["gelu_approximate"] = True


@pytest.mark.parametrize("edit,says", [
    (_drop("head/kernel"), "missing: head/kernel"),
    (_drop("shared_prompt"), "missing: shared_prompt"),
    (_nan, "shared_prompt holds non-finite values"),
    (_phase7, "names method 'lpt', phase 7"),
    (_reorder, "label 0 is 'class_3' in the export and 'class_0' in the data"),
    (_other_epsilon, "trained with model.vit.layernorm_epsilon=1e-06; this run has 1e-05; "
                     "pass --config.model.vit.layernorm_epsilon=1e-06$"),
    (_other_top_k_and_gelu, "model.vit.gelu_approximate=True, model.lpt.top_k=1; this run "
                            "has False, 2; pass --config.model.vit.gelu_approximate=True "
                            "--config.model.lpt.top_k=1$"),
], ids=["no head", "no shared prompt", "nan", "phase 7", "reordered classes",
        "other layernorm epsilon", "other top_k and gelu"])
def test_a_bad_export_is_refused(run, tmp_path, edit, says):
    config, workdir, _ = run
    bad = _rewrite(rundir.export_path(workdir, 1), tmp_path / "bad.npz", edit)
    with pytest.raises(ExportError) as err:
        inference.evaluate_workdir(config, workdir, bad)
    assert re.search(says, err.value.text(cli=True)), err.value.text(cli=True)  # run.py's line


def test_another_class_order_is_allowed_when_asked(run, tmp_path):
    config, workdir, _ = run
    bad = _rewrite(rundir.export_path(workdir, 1), tmp_path / "reordered.npz", _reorder)
    config = config.copy_and_resolve_references()
    config.eval.allow_other_class_names = True
    assert inference.evaluate_workdir(config, workdir, bad)["phase"] == 1


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """Disk full in the middle of a write: the old file stays, no temporary file is left."""
    import os

    from lpt_jax.storage import files
    target = tmp_path / "config.json"
    target.write_text("old")

    def full(fd):  # the bytes went out; making them durable fails
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        files.write_bytes(str(target), b"new contents")
    assert err.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_evaluation_beside_a_live_run_reads_and_leaves_its_lease(run):
    """Evaluation (and prediction) read a workdir beside a live run: they take no lease, write
    only eval/, and leave the holder's lease alone."""
    import os

    from lpt_jax.run import lease

    def holder():
        return json.loads(open(os.path.join(workdir, "lease.json")).read())["token"]
    config, workdir, _ = run
    with lease.hold(workdir):  # the live run
        token = holder()
        assert inference.evaluate_workdir(config, workdir)["phase"] == 1
        assert holder() == token
