"""Bad inputs (issue 7), each through the user's entry point: one actionable error line that
names the file / line / field / value and says what to do, and no partial output left behind.

Command-line cases run `python run.py` in subprocesses, launched together because imports
dominate their time; cases whose error is the library's own message call `train.train`
in-process. The data: a JPEG version of tests/tiny_run.py's folder with 8 training images
(3/2/2/1 per class), so that step 0's instance-balanced batch of 8 reads every one of them and
a bad file is met before any checkpoint, whatever the sampler's seed.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lpt_jax.data import testing
from lpt_jax.errors import DataError
from lpt_jax.run import trainer
from lpt_jax.run.exports import META_KEY

from helpers import REPO, TESTS, load_config, make_image_folder, tb_scalars
from tiny_run import make_backbone

COUNTS = (3, 2, 2, 1)  # 8 training images: one instance-balanced batch of 8 holds them all
EVAL_PER_CLASS = 4
CONFIG_FILE = '''"""run.py config of test_bad_inputs: tiny_run.py's run on <arg>/data, 2 steps."""
import pathlib
import sys

sys.path.insert(0, {tests!r})

from tiny_run import tiny_config  # noqa: E402


def get_config(arg):
    c = tiny_config(pathlib.Path(arg))
    c.train.phases = "1"
    c.train.max_steps = 2
    c.train.log_every_steps = 1
    c.eval.plot = False
    return c
'''


# ------------------------------------------------------------------------------------------
# Inputs.

@dataclasses.dataclass
class Inputs:
    base: Path            # the config file's argument: holds data/ and vit.npz
    config_file: Path
    good: Path            # image roots
    corrupt: Path         # train/class_1/1.jpg and test/class_2/2.jpg truncated
    all_corrupt: Path
    no_train_class: Path  # train/class_3/ is empty
    empty: Path           # class folders without images
    truncated_npz: Path

    @property
    def bad_train(self):
        return self.corrupt / "train" / "class_1" / "1.jpg"

    @property
    def bad_test(self):
        return self.corrupt / "test" / "class_2" / "2.jpg"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    good = make_image_folder(base / "data", COUNTS, EVAL_PER_CLASS, ext="jpg")
    make_backbone(base / "vit.npz")
    config_file = base / "bad_inputs_config.py"
    config_file.write_text(CONFIG_FILE.format(tests=str(TESTS)))

    corrupt = base / "corrupt"
    shutil.copytree(good, corrupt)
    all_corrupt = base / "all_corrupt"
    shutil.copytree(good, all_corrupt)
    for p in all_corrupt.rglob("*.jpg"):
        testing.truncate_file(str(p))
    no_train_class = base / "no_train_class"
    shutil.copytree(good, no_train_class)
    for p in (no_train_class / "train" / "class_3").glob("*.jpg"):
        p.unlink()
    empty = base / "empty"
    for split in ("train", "val"):
        for c in range(4):
            (empty / split / f"class_{c}").mkdir(parents=True)
    truncated = base / "vit_truncated.npz"
    raw = (base / "vit.npz").read_bytes()
    truncated.write_bytes(raw[:len(raw) // 2])

    found = Inputs(base, config_file, good, corrupt, all_corrupt, no_train_class, empty,
                   truncated)
    testing.truncate_file(str(found.bad_train))
    testing.truncate_file(str(found.bad_test))
    return found


def file_config(inputs, **data_fields):
    """The config run.py builds from the test's config file, plus data.<field> overrides."""
    config = load_config(inputs.config_file, str(inputs.base))
    for k, v in data_fields.items():
        setattr(config.data, k, v)
    return config


def snapshot(path):
    """{relative path: sha256 or 'dir'} of everything under `path`; None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------------------------------
# A finished run, in skip mode, with a corrupt training and a corrupt test image.

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def skip_run(inputs):
    config = file_config(inputs, root=str(inputs.corrupt), corrupt_images="skip")
    workdir = inputs.base / "skip_run"
    records = _Records()
    data_log = logging.getLogger("lpt_jax.data")  # the train and eval streams' loggers' parent
    data_log.addHandler(records)
    try:
        report = trainer.train(config, str(workdir))
    finally:
        data_log.removeHandler(records)
    return workdir, report, records.messages


def test_corrupt_jpeg_skipped_and_counted(inputs, skip_run):
    workdir, report, messages = skip_run
    train_skips = [m for m in messages if "skipping unreadable training image" in m]
    test_skips = [m for m in messages if "skipping unreadable test image" in m]
    assert len(train_skips) == 1 and str(inputs.bad_train) in train_skips[0]
    assert "(1 skipped so far, data.corrupt_images='skip'): Invalid JPEG data" in train_skips[0]
    assert len(test_skips) == 1 and str(inputs.bad_test) in test_skips[0]
    assert "(1 skipped so far" in test_skips[0]
    assert [v for _, v in tb_scalars(workdir / "phase1", "skipped_images")] == [1.0]  # TensorBoard
    # the run completed; the skipped test image is left out of the results
    assert report["num_examples"] == 4 * EVAL_PER_CLASS - 1
    rows = (workdir / "results" / "per_class.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[3]) for r in rows] == [4, 4, 3, 4]
    assert (workdir / "phase1" / "export.npz").is_file()


# ------------------------------------------------------------------------------------------
# Command-line cases.

@dataclasses.dataclass
class Case:
    args: tuple
    exit_code: int
    says: tuple            # fragments of the error line: what, where, what to do
    workdir: str = ""      # '' = a fresh one per case
    read_only: bool = False  # run without the right to write where permissions forbid it


def cli_cases(inputs, skip_workdir, copy_of_skip_workdir):
    syntax_error = inputs.base / "syntax_error_config.py"
    syntax_error.write_text("def get_config(:\n    pass\n")
    a_file = inputs.base / "a_file_not_a_folder"
    a_file.write_text("x")
    read_only = inputs.base / "read_only_workdir"
    read_only.mkdir()
    read_only.chmod(0o555)
    good_export = skip_workdir / "phase1" / "export.npz"
    no_head = _altered_export(good_export, inputs.base / "export_no_head.npz",
                              drop="head/kernel")
    nan = _altered_export(good_export, inputs.base / "export_nan.npz", nan="shared_prompt")
    reordered = _altered_export(good_export, inputs.base / "export_reordered.npz",
                                reorder_classes=True)
    export_copy = inputs.base / "export_copy.npz"
    shutil.copy(good_export, export_copy)
    an_image = sorted((inputs.good / "test" / "class_0").iterdir())[0]
    config_link = inputs.base / "link_to_config.py"
    config_link.symlink_to(inputs.config_file)
    other_backbone = make_backbone(inputs.base / "other_vit.npz", seed=1)
    comma = inputs.base / "comma"
    comma.mkdir()
    shutil.copy(an_image, comma / "a,b.jpg")
    null_record = inputs.base / "null_record"
    null_record.mkdir()
    (null_record / "config.json").write_text("null")
    return {
        "read-only workdir": Case(
            (), 1, (f"cannot write or read {read_only}/lease.json: Permission denied",
                    "make the folder writable or choose another --workdir"),
            workdir=str(read_only), read_only=True),
        "export without its head": Case(
            ("--mode=eval", f"--export={no_head}"), 1,
            (f"{no_head}", "head/kernel", "--export")),
        "export with NaN values": Case(
            ("--mode=eval", f"--export={nan}"), 1, (f"{nan}", "shared_prompt", "finite")),
        "export trained on another class order": Case(
            ("--mode=predict", f"--export={reordered}", f"--files={inputs.good}/test"), 1,
            (f"{reordered}", "class", "--config.eval.allow_other_class_names=True")),
        "several exports and a setting they decide": Case(
            ("--mode=predict", f"--export=a={good_export},b={good_export}",
             f"--files=a={inputs.good}/test", "--config.model.lpt.top_k=1"), 1,
            ("--config.model.lpt.top_k=1: with several exports every setting comes from each "
             "export; the command line sets only --config.backbone.checkpoint",)),
        "--files with --mode=train": Case(
            (f"--files={inputs.good}/test",), 2,
            ("--files has no effect with --mode=train: it is read by --mode=predict",)),
        "predict without --files": Case(
            ("--mode=predict", f"--export={good_export}"), 1,
            ("--mode=predict needs --files",)),
        "config file with a syntax error": Case(
            (f"--config={syntax_error}",), 2,
            (f"--config={syntax_error}: the config file does not load (SyntaxError",
             f"at {syntax_error}:1")),
        "workdir that is a file": Case(
            (), 1, (f"--workdir={a_file} is a file, not a folder",), workdir=str(a_file)),
        "predict --output in a missing folder": Case(
            ("--mode=predict", f"--files={inputs.good}",
             f"--output={inputs.base / 'missing' / 'preds.jsonl'}"), 1,
            (f"the folder {inputs.base / 'missing'} does not exist; create it first",)),
        "predict --output over its export": Case(
            ("--mode=predict", f"--export={export_copy}", f"--files={inputs.good}/test",
             f"--output={export_copy}"), 1,
            (f"--output={export_copy} is an export of --export ({export_copy}): predicting "
             "would overwrite it; choose another --output",)),
        "predict --output over an image": Case(
            ("--mode=predict", f"--export={good_export}", f"--files={an_image}",
             f"--output={an_image}"), 1,
            (f"--output={an_image} is an image to predict",)),
        "predict --output into the workdir": Case(
            ("--mode=predict", f"--files={inputs.good}/test",
             f"--output={copy_of_skip_workdir}/config.json"), 1,
            (f"--output={copy_of_skip_workdir}/config.json is inside --workdir=",
             "choose a path outside it"), workdir=str(copy_of_skip_workdir)),
        "predict --output through a symlink to the config file": Case(
            ("--mode=predict", f"--export={good_export}", f"--files={inputs.good}/test",
             f"--output={config_link}"), 1,
            (f"--output={config_link} is the config file",)),
        "eval with a training setting the export's run did not have": Case(
            ("--mode=eval", "--config.optim.base_lr=0.5"), 1,
            ("--config.optim.base_lr=0.5: --mode=eval takes it from the export",
             "it only shapes training: drop it"), workdir=str(copy_of_skip_workdir)),
        "predict with an export of another backbone file": Case(
            ("--mode=predict", f"--export={good_export}", f"--files={inputs.good}/test",
             f"--config.backbone.checkpoint={other_backbone}"), 1,
            (f"{good_export} was trained on another backbone",
             "prompts only work on the backbone they were trained with",
             "point --config.backbone.checkpoint at the file it was trained on")),
        "config file that does not exist, with an override": Case(
            (f"--config={inputs.base / 'nope.py'}", "--config.phase1.epochs=2"), 2,
            (f"--config={inputs.base / 'nope.py'}: cannot load the config file (no such file)",)),
        "a stray positional argument": Case(
            ("stray",), 2, ("unexpected arguments ['stray']: every input is a flag",)),
        "--files name holding a comma": Case(
            ("--mode=predict", f"--export={good_export}", f"--files={comma / 'a,b.jpg'}"), 1,
            (f"--files: {comma / 'a,b.jpg'} holds a comma, and --files splits at commas",)),
        "workdir whose config.json holds null": Case(
            (), 1, (f"{null_record}/config.json holds null, not a run record",
                    "use a new --workdir"), workdir=str(null_record)),
        "predict failing after some rows": Case(
            ("--mode=predict", f"--export={good_export}", f"--files={an_image},{inputs.bad_test}",
             "--config.predict.batch_size=1", f"--output={inputs.base / 'partial.jsonl'}"), 1,
            (f"cannot read image {inputs.bad_test}",)),
        "predict --output in a bucket": Case(
            ("--mode=predict", f"--files={inputs.good}", "--output=gs://bucket/preds.jsonl"), 1,
            ("--output=gs://bucket/preds.jsonl: predictions are written to a local file",)),
        "unknown config field": Case(
            ("--config.phase1.epoch=3",), 2,
            ("--config.phase1.epoch=3", "config.phase1 has no field 'epoch'",
             "did you mean config.phase1.epochs?")),
        "value of the wrong type": Case(
            ("--config.phase1.batch_size=eight",), 2,
            ("--config.phase1.batch_size=eight", "expected an integer, like the config's 8")),
        "all-corrupt image folder": Case(
            (f"--config.data.root={inputs.all_corrupt}",), 1,
            ("none of the 8 images of a train batch can be read", str(inputs.all_corrupt),
             "Invalid JPEG data", "check that data.root holds JPEG/PNG images")),
        "all-corrupt image folder, skip mode": Case(
            (f"--config.data.root={inputs.all_corrupt}", "--config.data.corrupt_images=skip"), 1,
            ("every training image of class", str(inputs.all_corrupt),
             "a class needs at least one readable image (check data.root)")),
        "corrupt JPEG among good ones, fail mode": Case(
            (f"--config.data.root={inputs.corrupt}",), 1,
            (f"cannot read image {inputs.bad_train} (train split", "Invalid JPEG data",
             "fix or remove the file, or set data.corrupt_images='skip'")),
        "checkpoint of another model size": Case(
            ("--config.model.vit.width=48",), 1,
            (f"checkpoint {inputs.base / 'vit.npz'} does not fit the model: shape mismatch (",
             ": checkpoint (32,) vs model (48,)",
             "check --config.backbone.checkpoint and --config.model.vit")),
        "truncated npz": Case(
            (f"--config.backbone.checkpoint={inputs.truncated_npz}",), 1,
            (f"{inputs.truncated_npz} is not a readable .npz checkpoint",
             "check --config.backbone.checkpoint")),
        "batch size not divisible by the devices": Case(
            ("--config.phase1.batch_size=12",), 1,
            ("phase1.batch_size=12 is not divisible by the 8 devices", "choose a multiple of 8")),
        "workdir of a different config": Case(
            (f"--config.data.root={inputs.corrupt}", "--config.data.corrupt_images=skip",
             "--config.loss.cb.margin=0.2"), 1,
            (f"{skip_workdir} holds a run with a different config (loss.cb.margin)",
             "use a new --workdir, or pass --config.train.allow_config_change=True"),
            workdir=str(skip_workdir)),
        "workdir of a different config, told to resume, then bad data": Case(
            (f"--config.data.root={inputs.all_corrupt}", "--config.train.allow_config_change=True"),
            1, ("none of the 8 images of a val batch can be read", "Invalid JPEG data"),
            workdir=str(copy_of_skip_workdir)),
    }


@dataclasses.dataclass
class Outcome:
    case: Case
    returncode: int
    stderr: str
    workdir: str
    before: dict
    after: dict


def _altered_export(good, out, *, drop=None, nan=None, reorder_classes=False):
    """A copy of a good export with one thing wrong, written without lpt_jax."""
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    if drop:
        del arrays[drop]
    if nan:
        arrays[nan] = np.full_like(arrays[nan], np.nan)
    if reorder_classes:
        meta = json.loads(arrays[META_KEY].tobytes())
        meta["class_names"] = meta["class_names"][::-1]
        arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(out, **arrays)
    return out


# As root, permissions do not stop writes; dropping the capabilities that bypass them does.
_NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
                "--inh-caps=-dac_override,-dac_read_search,-fowner"]


def _without_write_rights() -> list | None:
    """The command prefix that makes file permissions apply, or None when there is none."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run([*_NO_OVERRIDE, "true"], capture_output=True)
    return _NO_OVERRIDE if probe.returncode == 0 else None


def _run_cli(inputs, case, workdir):
    env = dict(os.environ)  # keeps conftest's 8 CPU devices and JAX compile cache
    prefix = _without_write_rights() if case.read_only else []
    if prefix is None:
        return None
    before = snapshot(workdir)
    proc = subprocess.run(
        [*prefix, sys.executable, str(REPO / "run.py"),
         f"--config={inputs.config_file}:{inputs.base}", f"--workdir={workdir}", *case.args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return Outcome(case, proc.returncode, proc.stderr, workdir, before, snapshot(workdir))


@pytest.fixture(scope="module")
def cli(inputs, skip_run):
    copy = inputs.base / "skip_run_copy"
    shutil.copytree(skip_run[0], copy)
    cases = cli_cases(inputs, skip_run[0], copy)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_cli, inputs, case,
                                     case.workdir or str(inputs.base / f"wd_{i}"))
                   for i, (name, case) in enumerate(cases.items())}
        return {name: f.result() for name, f in futures.items()}


def error_line(outcome) -> str:
    lines = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    return lines[0][len("error: "):]


CLI_CASES = ["config file with a syntax error", "workdir that is a file", "read-only workdir",
             "export without its head", "export with NaN values",
             "export trained on another class order",
             "several exports and a setting they decide", "--files with --mode=train",
             "predict without --files",
             "predict --output in a missing folder", "predict --output in a bucket",
             "predict --output over its export", "predict --output over an image",
             "predict --output into the workdir",
             "predict --output through a symlink to the config file",
             "predict failing after some rows",
             "config file that does not exist, with an override", "a stray positional argument",
             "--files name holding a comma", "workdir whose config.json holds null",
             "eval with a training setting the export's run did not have",
             "predict with an export of another backbone file",
             "unknown config field", "value of the wrong type",
             "all-corrupt image folder", "all-corrupt image folder, skip mode",
             "corrupt JPEG among good ones, fail mode", "checkpoint of another model size",
             "truncated npz",
             "batch size not divisible by the devices",
             "workdir of a different config",
             "workdir of a different config, told to resume, then bad data"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_error(cli, name):
    outcome = cli[name]
    if outcome is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    message = error_line(outcome)
    for fragment in outcome.case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert outcome.returncode == outcome.case.exit_code, outcome.stderr
    assert outcome.after == outcome.before, "the workdir changed"


def test_predict_never_writes_over_its_inputs_nor_leaves_a_partial_output(inputs, cli):
    """Refused outputs leave their files as they were; a predict that fails after writing
    rows leaves no file at all (the lines go to a temporary file renamed at the end)."""
    export = inputs.base / "export_copy.npz"
    with np.load(export) as f:
        assert META_KEY in f.files  # still a whole export
    image = cli["predict --output over an image"].case.args[2].split("=", 1)[1]
    assert Path(image).stat().st_size > 100
    assert not (inputs.base / "partial.jsonl").exists()
    assert not [p for p in inputs.base.iterdir() if p.name.startswith("partial.jsonl")]


def test_eval_accepts_the_training_commands_own_settings(inputs, cli):
    """The training command reused for --mode=eval: settings equal to the export's run's are
    no conflict (only another value would be ignored, and is refused above)."""
    workdir = inputs.base / "skip_run_for_eval"
    shutil.copytree(inputs.base / "skip_run_copy", workdir)
    case = Case(("--mode=eval", "--config.optim.base_lr=0.02", "--config.phase1.epochs=2"), 0,
                ())
    outcome = _run_cli(inputs, case, str(workdir))
    assert outcome.returncode == 0 and "error:" not in outcome.stderr, outcome.stderr[-2000:]


def _bad_input_table(inputs, cli) -> str:
    base = str(inputs.base)
    rows = ["| input | run.py's one line (on stderr) | exit |", "|---|---|---|"]
    for name in CLI_CASES:
        outcome = cli[name]
        if outcome is None:
            continue
        flags = " ".join([f"--workdir={outcome.workdir}", *outcome.case.args])
        said = error_line(outcome).replace("|", "\\|")
        row = f"| {name}: `{flags}` | `error: {said}` | {outcome.returncode} |"
        row = re.sub(r"<tmp>/wd_\d+", "<new folder>", row.replace(base, "<tmp>"))
        # The test's random weight files differ between JAX versions: so do their digests.
        rows.append(re.sub(r"fingerprint [0-9a-f]{12}", "fingerprint <digest>", row))
    return ("# Bad inputs and what run.py says\n\nGenerated by `tests/test_bad_inputs.py` "
            "(`LPT_UPDATE_DOCS=1` rewrites it; the test fails when it is stale) from real runs "
            "of `python run.py --config=<tmp>/bad_inputs_config.py:<tmp> ...` on tiny data. "
            "In every case the workdir is left exactly as it was found. Bad config values: "
            "[bad_config_values.md](bad_config_values.md).\n\n" + "\n".join(rows) + "\n")


def test_bad_input_table_is_current(inputs, cli):
    path = REPO / "docs" / "bad_inputs.md"
    table = _bad_input_table(inputs, cli)
    if os.environ.get("LPT_UPDATE_DOCS") == "1":
        path.write_text(table)
    assert path.exists() and path.read_text() == table, (
        "docs/bad_inputs.md is stale: rerun with LPT_UPDATE_DOCS=1")


def test_export_errors_name_the_export_flag_not_the_backbones(cli):
    for name in ("export without its head", "export with NaN values"):
        line = error_line(cli[name])
        assert "check --export" in line and "backbone" not in line, line
    line = error_line(cli["export trained on another class order"])  # its own remedy
    assert line.endswith("--config.eval.allow_other_class_names=True") and "backbone" not in line


def test_refused_workdir_was_a_real_run(cli):
    """The refusal above guarded something: a finished run's outputs, all still there."""
    for name in ("workdir of a different config",
                 "workdir of a different config, told to resume, then bad data"):
        before = cli[name].before
        assert {"config.json", "phase1/export.npz", "results/results.json"} <= set(before)


def test_told_to_resume_keeps_the_original_config_json(cli):
    """allow_config_change=True got past the refusal (the run reached the data); config.json
    keeps the original run's record, so the original command still resumes afterwards."""
    outcome = cli["workdir of a different config, told to resume, then bad data"]
    assert "holds a run with a different config" not in outcome.stderr
    assert "config.json (restored)" not in outcome.stderr, outcome.stderr


# ------------------------------------------------------------------------------------------
# In-process cases: the data package's messages, and nothing written.

def _write_list(path, rows):
    path.write_text("".join(f"{p} {label}\n" for p, label in rows))
    return str(path)


def _train_rows():
    return [(f"train/class_{c}/{i}.jpg", c) for c, n in enumerate(COUNTS) for i in range(n)]


def _fails_cleanly(config, workdir, exc_type=DataError) -> str:
    with pytest.raises(exc_type) as info:
        trainer.train(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message, message
    assert snapshot(workdir) is None, "the workdir was written"
    return message


def test_image_root_missing(inputs, tmp_path):
    nowhere = inputs.base / "nowhere"
    config = file_config(inputs, root=str(nowhere))
    message = _fails_cleanly(config, tmp_path / "wd")
    assert message.startswith(f"image_folder: data.root={nowhere} does not exist; expected a "
                              "folder with train/<class>/*.jpg")


def test_split_file_with_a_malformed_line(inputs, tmp_path):
    rows = _train_rows()
    bad_list = _write_list(tmp_path / "train.txt", rows)
    lines = Path(bad_list).read_text().splitlines()
    lines[2] = "train/class_0/2.jpg two"
    Path(bad_list).write_text("\n".join(lines) + "\n")
    config = file_config(inputs, train_list=bad_list)
    message = _fails_cleanly(config, tmp_path / "wd")
    assert message.startswith(f"{bad_list}:3: ")
    assert message.endswith("expected '<relative path> <integer label>', got "
                            "'train/class_0/2.jpg two'; fix or remove that line")


def test_label_not_below_num_classes(inputs, tmp_path):
    rows = _train_rows()
    rows[-1] = (rows[-1][0], 4)
    train_list = _write_list(tmp_path / "train.txt", rows)
    config = file_config(inputs, train_list=train_list, num_classes=4)
    message = _fails_cleanly(config, tmp_path / "wd")
    assert message == (f"{train_list}:8: label 4 of train/class_3/0.jpg is outside [0, 4); "
                       "fix the label, or raise data.num_classes (now 4)")


def test_class_with_zero_training_images(inputs, tmp_path):
    config = file_config(inputs, root=str(inputs.no_train_class))
    message = _fails_cleanly(config, tmp_path / "wd")
    assert "1 classes have no training image: 3 (class_3)" in message
    assert "add training images or remove the class" in message


def test_empty_image_folder(inputs, tmp_path):
    config = file_config(inputs, root=str(inputs.empty))
    message = _fails_cleanly(config, tmp_path / "wd")
    assert f"{inputs.empty / 'train'} holds no .jpg/.jpeg/.png images" in message
    assert "data.root should be a folder with train/<class>/*.jpg" in message
