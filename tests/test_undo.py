"""A failed invocation undoes what it created, and nothing another run wrote meanwhile
(lpt_jax.run.rundir.Snapshot): evaluation and prediction take no lease, so they remove exactly
the files they created, by name; training (under its lease) removes only new entries of its
own outputs. 'Another run' writes here with the standard library, as another process would:
not through this process's file seam."""

import json

from lpt_jax.run import rundir
from lpt_jax.storage import files


def _other_run_writes(workdir):
    (workdir / "lease.json").write_text(json.dumps({"token": "theirs"}))
    (workdir / "results").mkdir()
    (workdir / "results" / "table.md").write_text("their table")
    (workdir / "phase1").mkdir()
    (workdir / "phase1" / "events.out.tfevents.1").write_text("their events")


def test_a_failing_eval_removes_only_what_it_created(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    with rundir.Snapshot(str(workdir), "eval") as snapshot:
        files.write_bytes(str(workdir / "eval" / "table.md"), b"ours, half written")
        _other_run_writes(workdir)
    assert snapshot.undo() == ["eval/table.md", "eval"]
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "lease.json", "phase1",
                                                         "results"]
    assert (workdir / "results" / "table.md").read_text() == "their table"


def test_a_failing_predict_removes_nothing_of_the_workdir(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    with rundir.Snapshot(str(workdir), "predict") as snapshot:
        _other_run_writes(workdir)
    assert snapshot.undo() == []
    assert (workdir / "lease.json").exists() and (workdir / "results" / "table.md").exists()


def test_a_file_that_existed_before_is_never_removed(tmp_path):
    workdir = tmp_path / "wd"
    (workdir / "eval").mkdir(parents=True)
    (workdir / "eval" / "table.md").write_text("an earlier evaluation")
    with rundir.Snapshot(str(workdir), "eval") as snapshot:
        files.write_bytes(str(workdir / "eval" / "table.md"), b"rewritten")  # not created
        files.write_bytes(str(workdir / "eval" / "results.json"), b"{}")      # created
    assert snapshot.undo() == ["eval/results.json"]
    assert (workdir / "eval" / "table.md").exists()


def test_a_failing_training_start_keeps_what_others_wrote(tmp_path):
    """Training undoes new entries of its own outputs (config.json, phase<n>/, results/) and
    restores config.json; an evaluation's eval/ and the lease written meanwhile stay."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"config": {}}')
    with rundir.Snapshot(str(workdir), "train") as snapshot:
        (workdir / "config.json").write_text('{"config": {"changed": 1}}')
        (workdir / "phase1").mkdir()
        (workdir / "eval").mkdir()                      # an evaluation beside it
        (workdir / "eval" / "table.md").write_text("theirs")
        (workdir / "lease.json").write_text("{}")       # the lease is the lease's business
    assert snapshot.undo() == ["phase1", "config.json (restored)"]
    assert (workdir / "eval" / "table.md").exists() and (workdir / "lease.json").exists()
    assert (workdir / "config.json").read_text() == '{"config": {}}'
