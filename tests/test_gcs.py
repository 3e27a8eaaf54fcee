"""gs:// for real, against a Cloud Storage emulator (fake-gcs-server, started on a free loopback
port for this module): a run whose workdir and backbone live in a bucket trains, is preempted
by SIGTERM, resumes bit-identically, evaluates and predicts from the bucket and leaves exactly
the documented workdir layout; the workdir lease works on a bucket; a missing bucket, a missing
object, a refused request and an unreachable endpoint each end in one line.

The data root stays on local disk: tf.data reads image bytes through TensorFlow's own GCS
client, which cannot be pointed at an emulator (docs/storage.md)."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import cli, tree
from lpt_jax.backbones import vit_weights
from lpt_jax.errors import CheckpointError, ExportError, LeaseError, RemoteError
from lpt_jax.run import checkpoint as ckpt_lib
from lpt_jax.run import exports, inference, rundir, trainer
from lpt_jax.run.lease import WorkdirLease
from lpt_jax.storage import files, gcs

from gcs_emulator import Emulator, Refusing, free_port, list_objects
from helpers import REPO, tb_scalars
from tiny_run import tiny_config

BUCKET = "bucket"
WORKDIR = f"gs://{BUCKET}/run"
BACKBONE = f"gs://{BUCKET}/vit.npz"
# Phase 1: 72 steps, phase 2: 18 (6 an epoch). The train steps are then the programs that
# tests/test_preemption.py (phase 1) and tests/test_train.py (phase 2) compile too: whichever
# module runs second finds them in the session's compilation cache.
EPOCHS, EPOCHS_2 = 12, 3
TOTAL, TOTAL_2 = 6 * EPOCHS, 6 * EPOCHS_2
# Overrides shared by the runs that are compared (checkpoints rarely: each is an upload).
RUN_FLAGS = (f"--config.phase1.epochs={EPOCHS}", f"--config.phase2.epochs={EPOCHS_2}",
             "--config.train.checkpoint_every_steps=20", "--config.eval.plot=False")


@pytest.fixture(scope="module")
def emulator():
    """The emulator, named by STORAGE_EMULATOR_HOST in this process (and so in the run.py
    processes it starts) while the module runs; a bucket `bucket` in it."""
    emu = Emulator()
    saved = {k: os.environ.get(k) for k in (gcs.EMULATOR_ENV, gcs.RETRY_ENV)}
    os.environ[gcs.EMULATOR_ENV] = emu.url
    os.environ.pop(gcs.RETRY_ENV, None)
    try:
        emu.make_bucket(BUCKET)
        yield emu
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        files.configure_remote_libraries()  # forgets the tensorstore endpoint it derived
        emu.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Local training data and backbone file (tests/tiny_run.py's)."""
    tmp = tmp_path_factory.mktemp("gcs")
    tiny_config(tmp)
    return tmp


def _config(tmp, backbone=None):
    """The config of the run.py runs (RUN_FLAGS), in process; the backbone local unless given."""
    config = tiny_config(tmp)
    config.phase1.epochs, config.phase2.epochs = EPOCHS, EPOCHS_2
    config.train.checkpoint_every_steps = 20
    config.eval.plot = False
    config.backbone.checkpoint = backbone or config.backbone.checkpoint
    return config


def _cli(tmp):
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), f"--config={REPO}/tests/tiny_cli_config.py:{tmp}",
         f"--workdir={WORKDIR}", f"--config.backbone.checkpoint={BACKBONE}", *RUN_FLAGS],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _objects(prefix: str) -> list[str]:
    """Names under gs://bucket/<prefix>/, listed by the emulator's JSON API itself (not by
    the seam under test)."""
    names = list_objects(os.environ[gcs.EMULATOR_ENV], BUCKET, prefix + "/")
    return sorted(n[len(prefix) + 1:] for n in names)


@pytest.fixture(scope="module")
def bucket_run(emulator, inputs):
    """An uninterrupted local run of phase 1 (the reference), then run.py on the bucket:
    SIGTERM during phase 1, and the rerun that resumes and finishes phases 1 and 2."""
    tmp = inputs
    with open(tmp / "vit.npz", "rb") as f:
        files.write_bytes(BACKBONE, f.read())
    straight = _config(tmp)
    straight.train.phases = "1"
    trainer.train(straight, str(tmp / "straight"))

    first = _cli(tmp)
    seen = []
    for line in first.stdout:  # SIGTERM once phase 1's loop runs (it stops at the next step)
        seen.append(line)
        if "phase 1: compiling the train step" in line:
            time.sleep(0.1)  # the watch is installed right after that line
            first.send_signal(signal.SIGTERM)
            break
    out_first = "".join(seen) + first.communicate(timeout=300)[0]
    stopped = max((int(n.split("/")[0]) for n in _objects("run/phase1/checkpoints")),
                  default=None)
    exported_early = files.exists(f"{WORKDIR}/phase1/export.npz")
    second = _cli(tmp)
    out_second = second.communicate(timeout=300)[0]
    return dict(tmp=tmp, first=(first.returncode, out_first), stopped=stopped,
                exported_early=exported_early, second=(second.returncode, out_second))


def test_sigterm_in_a_bucket_saves_and_resumes_bit_identically(bucket_run):
    code, out = bucket_run["first"]
    assert code == 143 and "on SIGTERM" in out, out[-3000:]
    stopped = bucket_run["stopped"]
    assert stopped is not None and 0 < stopped < TOTAL, out[-3000:]
    assert not bucket_run["exported_early"]
    code, out = bucket_run["second"]
    assert code == 0, out[-3000:]
    assert f"resuming from step {stopped}" in out
    want = tree.flatten(exports.read(str(bucket_run["tmp"] / "straight/phase1/export.npz"))[0])
    got = tree.flatten(exports.read(f"{WORKDIR}/phase1/export.npz")[0])
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_events_of_both_runs_reach_the_bucket(bucket_run, tmp_path):
    events = [n for n in _objects("run/phase1") if n.startswith("events.out.tfevents.")]
    assert len(events) == 2, events  # one file per run
    for name in events:
        (tmp_path / name).write_bytes(files.read_bytes(f"{WORKDIR}/phase1/{name}"))
    steps = [s for s, _ in tb_scalars(tmp_path, "loss")]
    stopped = bucket_run["stopped"]
    assert steps[-1] == TOTAL and any(s <= stopped for s in steps), steps


def test_eval_and_predict_from_the_bucket_leave_the_documented_layout(bucket_run):
    tmp = bucket_run["tmp"]
    config = _config(tmp, backbone=BACKBONE)
    config.eval.plot = True
    report = inference.evaluate_workdir(config, WORKDIR)  # phase 2's export, the test split
    final = json.loads(files.read_text(f"{WORKDIR}/results/results.json"))
    assert report["phase"] == 2 and report["num_examples"] == final["num_examples"] == 16
    assert report["overall"] == final["overall"]
    assert [r["accuracy"] for r in report["per_class"]] == [
        r["accuracy"] for r in final["per_class"]]
    images = sorted(str(p) for p in (tmp / "data" / "test").rglob("*.png"))[:6]
    ours = list(inference.predict_files(config, WORKDIR, images,
                                        export=f"{WORKDIR}/phase1/export.npz"))
    local = _config(tmp)
    assert ours == list(inference.predict_files(local, str(tmp / "straight"), images))

    # The layout of rundir.py's docstring (and the README), nothing else: no lease, no
    # temporary or break file, no folder placeholder.
    names = _objects("run")
    reports = ("table.md", "results.json", "per_class.csv")
    expected = {"config.json", "phase1/export.npz", "phase2/export.npz", "eval/per_class.png",
                *(f"{d}/{n}" for d in ("phase1/val", "phase2/val", "results", "eval")
                  for n in reports)}
    rest = [n for n in names if n not in expected]
    assert expected <= set(names), sorted(expected - set(names))
    events = {p: [n for n in rest if n.startswith(f"phase{p}/events.out.tfevents.")]
              for p in (1, 2)}
    assert [len(events[1]), len(events[2])] == [2, 1], rest
    checkpoints = [n for n in rest if n not in events[1] + events[2]]
    for phase in (1, 2):
        steps = {n.split("/")[2] for n in checkpoints if n.startswith(f"phase{phase}/")}
        assert steps and all(s.isdigit() for s in steps), steps
        assert max(int(s) for s in steps) == (TOTAL if phase == 1 else TOTAL_2)
    assert all(n.startswith(("phase1/checkpoints/", "phase2/checkpoints/"))
               for n in checkpoints), checkpoints


# ------------------------------------------------------------------------------------------

def test_lease_on_a_bucket(emulator, caplog):
    """lease.json created only if absent (ifGenerationMatch=0): a second run is refused, a
    stale holder is taken over, of two racing runs exactly one wins, nothing is left."""
    workdir = f"gs://{BUCKET}/leased-{uuid.uuid4().hex[:8]}"
    first = WorkdirLease(workdir).acquire()
    assert first.path == f"{workdir}/lease.json"
    with pytest.raises(LeaseError, match=f"pid {os.getpid()}"):
        WorkdirLease(workdir).acquire()
    first.release()
    assert not files.exists(first.path)

    files.write_text(f"{workdir}/lease.json", json.dumps(dict(
        token="a" * 32, host="gone", pid=4242, machine="gone|x|y", started="earlier",
        heartbeat=time.time() - 3600)))
    caplog.set_level(logging.WARNING)
    with WorkdirLease(workdir) as held:
        assert json.loads(files.read_text(held.path))["token"] == held.token
    assert any("left by a run that is gone" in r.getMessage() and "pid 4242" in r.getMessage()
               for r in caplog.records)

    for attempt in range(3):
        barrier, won, refused = threading.Barrier(2), [], []

        def race():
            lease = WorkdirLease(f"{workdir}/{attempt}")
            barrier.wait()
            try:
                won.append(lease.acquire())
            except LeaseError:
                refused.append(lease)
        threads = [threading.Thread(target=race) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (len(won), len(refused)) == (1, 1)
        won[0].release()
    assert _objects(workdir[len(f"gs://{BUCKET}/"):]) == []


def test_create_if_absent_honours_the_precondition(emulator):
    """files.create_new on a bucket (gcsfs pipe_file mode='create', ifGenerationMatch=0): the
    first create wins, a second one of the same name is False and changes nothing, and of
    threads creating one name at once exactly one succeeds."""
    path = f"gs://{BUCKET}/create-{uuid.uuid4().hex[:8]}/lease.json"
    assert files.create_new(path, b"first") is True
    assert files.create_new(path, b"second") is False
    assert files.read_bytes(path) == b"first"
    results, barrier = [], threading.Barrier(4)

    def create(i):
        barrier.wait()
        results.append(files.create_new(f"{path}.race", f"{i}".encode()))
    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]


def test_reads_stream_in_ranges_pinned_to_one_generation(emulator):
    """open_read is seekable, reads in ranges of gcs.BLOCK bytes, and an object replaced while
    it is read is an error, never a mix of two files."""
    path = f"gs://{BUCKET}/pinned-{uuid.uuid4().hex[:8]}.bin"
    data = np.random.default_rng(0).integers(0, 256, gcs.BLOCK + 4096, np.uint8).tobytes()
    files.write_bytes(path, data)
    with files.open_read(path) as f:
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read(100) == data[:100]
        files.write_bytes(path, bytes(len(data)))  # replaced meanwhile
        assert f.read(100) == data[100:200]  # still the first range, read at open
        f.seek(gcs.BLOCK + 100)  # beyond it: a new range of the old generation
        with pytest.raises(RemoteError, match="replaced or removed while being read"):
            f.read(10)
    assert files.read_bytes(path) == bytes(len(data))


def test_damaged_checkpoint_in_a_bucket_is_set_aside(emulator):
    """A truncated newest step in a bucket: restored from the step before, set aside as
    <step>.damaged-<time> through the seam, and Orbax's next listing no longer sees it."""
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    directory = f"gs://{BUCKET}/{prefix}"

    def state(step):
        return {"w": jnp.arange(6, dtype=jnp.float32) * step, "step": jnp.int32(step)}
    ck = ckpt_lib.PhaseCheckpointer(directory, every_steps=1, keep=3, asynchronous=False)
    for step in (1, 2):
        ck.save(step, state(step), {"phase": 1}, force=True)
    ck.close()
    damaged = [n for n in _objects(prefix) if n.startswith("2/") and "/d/" in n]
    assert damaged
    for name in damaged:
        data = files.read_bytes(f"{directory}/{name}")
        files.write_bytes(f"{directory}/{name}", data[: len(data) // 2])
    ck = ckpt_lib.PhaseCheckpointer(directory, every_steps=1, keep=3, asynchronous=False)
    step, got, _ = ck.restore_latest_good(jax.eval_shape(lambda: state(0)))
    assert step == 1 and np.array_equal(got["w"], np.arange(6) * 1.0)
    assert ck.all_steps() == [1]
    assert [n for n in files.listdir(directory) if n.startswith("2.damaged-")]
    ck.save(2, state(2), {"phase": 1}, force=True)  # the step can be saved again
    ck.close()
    assert ck.all_steps() == [1, 2]


def _one_line(err) -> str:
    """The line run.py prints for `err`."""
    line = cli.os_error_line(err) if isinstance(err, OSError) else cli.one_line(err)
    assert "\n" not in line and "Traceback" not in line, line
    return line


def test_bad_buckets_end_in_one_line_each(emulator, inputs, monkeypatch):
    config = _config(inputs)
    config.train.phases = "1"

    # A missing bucket: the workdir is refused before anything is written.
    with pytest.raises(FileNotFoundError) as err:
        trainer.train(config, "gs://no-such-bucket/run")
    line = _one_line(err.value)
    assert "gs://no-such-bucket/run" in line and "bucket gs://no-such-bucket does not exist" in line
    with pytest.raises(CheckpointError, match="checkpoint not found: gs://no-such-bucket/vit.npz"):
        vit_weights.read_arrays("gs://no-such-bucket/vit.npz")

    # A missing object: the backbone and an export named by --export.
    with pytest.raises(CheckpointError) as err:
        vit_weights.read_arrays(f"gs://{BUCKET}/missing/vit.npz")
    assert "checkpoint not found: gs://bucket/missing/vit.npz" in _one_line(err.value)
    with pytest.raises(ExportError) as err:
        exports.read(f"gs://{BUCKET}/missing/export.npz")
    assert "gs://bucket/missing/export.npz" in _one_line(err.value)

    # No permission: fake-gcs-server has no IAM, so an endpoint that answers every request
    # with GCS's 403 stands in for a bucket this account may not use.
    refusing = Refusing()
    try:
        monkeypatch.setenv(gcs.EMULATOR_ENV, refusing.url)
        with pytest.raises(PermissionError) as err:
            trainer.train(config, f"gs://{BUCKET}/run-refused")
        line = _one_line(err.value)
        assert "gs://bucket/run-refused" in line and "access refused" in line, line
        with pytest.raises(CheckpointError) as err:
            vit_weights.read_arrays(BACKBONE)
        assert "access refused" in _one_line(err.value)
    finally:
        refusing.stop()

    # An unreachable endpoint: one line within the retry budget (LPT_GCS_RETRY_SECONDS),
    # and at once for every later call within that time.
    monkeypatch.setenv(gcs.EMULATOR_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(gcs.RETRY_ENV, "1")
    workdir = f"gs://{BUCKET}/run-unreachable"
    t0 = time.time()
    snapshot = rundir.Snapshot(workdir)  # what run.py takes first: never raises
    with pytest.raises(RemoteError) as err:
        trainer.train(config, workdir)
    line = _one_line(err.value)
    assert time.time() - t0 < 5
    assert workdir in line and "cannot reach Cloud Storage" in line and gcs.RETRY_ENV in line
    assert "connection refused" in line
    assert snapshot.undo() == []
    with pytest.raises(CheckpointError) as err:
        vit_weights.read_arrays(BACKBONE)
    assert "cannot reach" in _one_line(err.value) and "local copy" in err.value.args[0]
    assert time.time() - t0 < 5
