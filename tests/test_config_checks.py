"""Every bad config value is one ConfigError line naming the field, before anything is written.

The cases also generate docs/bad_config_values.md (input -> message -> exit code of run.py);
`LPT_UPDATE_DOCS=1 python -m pytest tests/test_config_checks.py` rewrites it, and without that
the test fails when the committed table is stale."""

import os

import pytest

from configs.common import base_config
from lpt_jax.config import schema
from lpt_jax.errors import ConfigError
from lpt_jax.run import trainer

from helpers import REPO
from tiny_run import tiny_config

# (override, value, fragment of the message): judged from the config alone.
CONFIG_ONLY = [
    ("phase1.epochs", 0, "phase1.epochs=0: expected an integer >= 1"),
    ("phase2.epochs", -3, "phase2.epochs=-3: expected an integer >= 1"),
    ("phase2.batch_size", 0, "phase2.batch_size=0: expected an integer >= 1"),
    ("train.max_steps", -1, "train.max_steps=-1: expected an integer >= 0"),
    ("optim.base_lr", -0.1, "optim.base_lr=-0.1: expected a finite number > 0"),
    ("optim.base_lr", float("nan"), "optim.base_lr=nan: expected a finite number > 0"),
    ("optim.base_lr", float("inf"), "optim.base_lr=inf: expected a finite number > 0"),
    ("optim.warmup_lr", -1e-6, "optim.warmup_lr=-1e-06: expected a finite number >= 0"),
    ("optim.momentum", 1.0, "optim.momentum=1.0: expected a number in [0, 1)"),
    ("optim.weight_decay", float("nan"), "optim.weight_decay=nan"),
    ("eval.max_examples", -5, "eval.max_examples=-5: expected an integer >= 0"),
    ("eval.batch_size", 0, "eval.batch_size=0: expected an integer >= 1"),
    ("eval.final_split", "bogus", "eval.final_split='bogus': expected 'val' or 'test'"),
    ("eval.every_epochs", -1, "eval.every_epochs=-1"),
    ("predict.batch_size", 0, "predict.batch_size=0: expected an integer >= 1"),
    ("predict.top_k", 0, "predict.top_k=0: expected an integer >= 1"),
    ("model.lpt.prompt_length", 0, "model.lpt.prompt_length=0: expected an integer >= 1"),
    ("model.lpt.pool_size", 0, "model.lpt.pool_size=0: expected an integer >= 1"),
    ("model.vit.attention", "flash", "model.vit.attention='flash': expected one of"),
    ("model.vit.attention", "cudnn", "model.vit.attention='cudnn' needs an NVIDIA GPU"),
    ("model.lpt.top_k", 0, "model.lpt.top_k=0"),
    ("model.lpt.top_k", 21, "model.lpt.top_k=21: expected an integer in [1, model.lpt.pool_size=20]"),
    ("model.lpt.shared_depth", -1, "model.lpt.shared_depth=-1"),
    ("data.cb_images_per_class", 0, "data.cb_images_per_class=0: expected an integer >= 1"),
    ("data.ib_sampling", "iid",
     "data.ib_sampling='iid': expected 'epoch_permutation' or 'independent'"),
    ("train.log_every_steps", 0, "train.log_every_steps=0: expected an integer >= 1"),
    ("train.checkpoint_every_steps", 0, "train.checkpoint_every_steps=0"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0: expected an integer >= 1"),
    ("train.microbatches", 0, "train.microbatches=0: expected an integer >= 1"),
    ("eval.ensemble", "nine_crop", "eval.ensemble='nine_crop': expected one of"),
    ("eval.ensemble_expand", -1, "eval.ensemble_expand=-1: expected an integer >= 0"),
    ("train.on_nonfinite", "ignore", "train.on_nonfinite='ignore': expected 'stop' or 'skip'"),
    ("train.phases", "2,1", "train.phases='2,1'"),
    ("loss.cb.name", "focal", "loss.cb.name='focal': expected one of"),
]
# Judged against the data and the backbone (the tiny run: 4 classes, depth-3 ViT).
WITH_DATA = [
    ("eval.final_split", "val", None),  # exists in the tiny data: accepted (control case)
    ("model.lpt.shared_depth", 7, "model.lpt.shared_depth=7: expected an integer in [0,"),
]


def _set(config, field, value):
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("field,value,says", CONFIG_ONLY, ids=[f"{f}={v}" for f, v, _ in CONFIG_ONLY])
def test_bad_value_is_one_line(field, value, says):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ConfigError) as err:
        schema.check(config)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_defaults_pass():
    schema.check(base_config())


@pytest.mark.parametrize("field,value,says", WITH_DATA, ids=[f"{f}={v}" for f, v, _ in WITH_DATA])
def test_bad_value_against_the_data_is_found_before_any_write(tmp_path, field, value, says):
    config = tiny_config(tmp_path)
    _set(config, field, value)
    config.train.max_steps = 1
    workdir = tmp_path / "wd"
    if says is None:
        from lpt_jax.run import context
        context.build_context(config, str(workdir))  # accepted, and writes nothing itself
    else:
        with pytest.raises(ConfigError, match=says.replace("[", r"\[")):
            trainer.train(config, str(workdir))
    assert not workdir.exists()


def _table() -> str:
    rows = ["| override | run.py says (exit 1, nothing written) |", "|---|---|"]
    for field, value, says in CONFIG_ONLY + [c for c in WITH_DATA if c[2]]:
        rows.append(f"| `--config.{field}={value}` | `error: {says} ...` |")
    return ("# Bad config values and what run.py says\n\nGenerated by "
            "`tests/test_config_checks.py` (`LPT_UPDATE_DOCS=1` rewrites it). Each value is "
            "refused before any file is written; the message starts as shown.\n\n"
            + "\n".join(rows) + "\n")


def test_bad_value_table_is_current():
    path = REPO / "docs" / "bad_config_values.md"
    if os.environ.get("LPT_UPDATE_DOCS") == "1":
        path.write_text(_table())
    assert path.exists() and path.read_text() == _table(), (
        "docs/bad_config_values.md is stale: rerun with LPT_UPDATE_DOCS=1")


def test_locations_and_retry_budgets_do_not_define_a_run():
    """Where inputs live (at any depth: model.text.tokenizer) and how often a download is
    retried leave a run's identity alone; a real setting beside them does not."""
    from lpt_jax.run import rundir
    a, b = base_config(), base_config()
    b.backbone.checkpoint, b.data.root = "/elsewhere/vit.npz", "/elsewhere/data"
    b.model.text.tokenizer, b.model.text.checkpoint = "/elsewhere/spm.model", "/x/two.npz"
    b.data.download_retries = 9
    assert rundir.run_defining(a) == rundir.run_defining(b)
    b.model.text.subtree = "text"
    assert rundir.run_defining(a) != rundir.run_defining(b)
