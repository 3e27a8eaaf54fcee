"""Preemption and faults: SIGTERM saves and resumes identically; SIGKILL during asynchronous
checkpoint writes never leaves a broken checkpoint; non-finite steps stop or are skipped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax import data, tree
from lpt_jax.errors import NonFiniteError
from lpt_jax.method import losses
from lpt_jax.run import checkpoint as ckpt_lib
from lpt_jax.run import exports, rundir, trainer

from helpers import REPO, make_image_folder, tb_scalars
from tiny_run import make_backbone, tiny_config

EPOCHS = 12  # 6 steps an epoch: 72 steps, long enough to be interrupted


def _cli(tmp, workdir, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # same 8 simulated devices as this process
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), f"--config={REPO}/tests/tiny_cli_config.py:{tmp}",
         f"--workdir={workdir}", "--config.train.phases=1", f"--config.phase1.epochs={EPOCHS}",
         "--config.eval.plot=False", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir, proc, timeout=300):
    ckdir = Path(workdir) / "phase1" / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("run ended before it could be interrupted:\n" + proc.stdout.read())
        if ckdir.is_dir() and any(p.name.isdigit() for p in ckdir.iterdir()):
            return ckdir
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _export(workdir):
    return tree.flatten(exports.read(rundir.export_path(str(workdir), 1))[0])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("pre")
    make_image_folder(tmp / "data")
    make_backbone(tmp / "vit.npz")
    config = tiny_config(tmp)
    config.train.phases = "1"
    config.phase1.epochs = EPOCHS
    config.eval.plot = False
    trainer.train(config, str(tmp / "straight"))
    return tmp, _export(tmp / "straight")


def test_sigterm_saves_and_resumes_identically(straight):
    tmp, want = straight
    workdir = tmp / "sigterm"
    proc = _cli(tmp, workdir)
    _wait_for_checkpoint(workdir, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped at step" in out and "on SIGTERM" in out
    steps = [int(p.name) for p in (workdir / "phase1" / "checkpoints").iterdir()]
    stopped = max(steps)
    assert 0 < stopped < 6 * EPOCHS
    assert not (workdir / "phase1" / "export.npz").exists()
    proc = _cli(tmp, workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from step {stopped}" in out
    got = _export(workdir)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_ctrl_c_saves_like_sigterm_and_exits_130(straight):
    """SIGINT (Ctrl-C) in the loop: a checkpoint is saved, no temporary folder is left, one
    line says what happened, exit status 128 + 2."""
    tmp, _ = straight
    workdir = tmp / "sigint"
    proc = _cli(tmp, workdir)
    ckdir = _wait_for_checkpoint(workdir, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "on SIGINT" in out and "Traceback" not in out, out[-3000:]
    names = [p.name for p in ckdir.iterdir()]
    assert names and all(n.isdigit() for n in names), names  # no tmp folder left


def test_stop_after_steps_is_its_own_outcome_not_a_preemption(straight):
    """train.stop_after_steps saves and stops with exit 3 and a 'stopped:' line (a preemption
    is 128 + its signal and says 'preempted:')."""
    tmp, _ = straight
    workdir = tmp / "stopped"
    proc = _cli(tmp, workdir, "--config.train.stop_after_steps=2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    assert "stopped: phase 1 stopped at step 2 (train.stop_after_steps)" in out, out[-3000:]
    assert "preempted" not in out and "Traceback" not in out, out[-3000:]
    assert "2" in [p.name for p in (workdir / "phase1" / "checkpoints").iterdir()]


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(Path(path).rglob("*"))}


def test_sigterm_during_evaluation_says_so_and_leaves_the_workdir_as_found(straight):
    """`--mode=eval` on a finished run, SIGTERM once evaluation has started: one line that
    says what happened, exit 143, and the workdir exactly as before (no half-written
    results)."""
    tmp, _ = straight
    workdir = tmp / "straight"
    before = _tree(workdir)
    proc = _cli(tmp, workdir, "--mode=eval")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "evaluating phase 1 on the test split" in line:
            proc.send_signal(signal.SIGTERM)
            break
    else:
        raise AssertionError("evaluation never started:\n" + "".join(seen)[-3000:])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "interrupted by SIGTERM outside the train loop" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "top-1 accuracy" not in out, "the signal came after the evaluation"
    assert _tree(workdir) == before


def test_sigkill_during_async_checkpoint_writes(straight):
    """Checkpoint every step and kill -9 while writes are in flight, twice; the restart uses the
    last complete checkpoint and still ends bit-identical to the uninterrupted run."""
    tmp, want = straight
    workdir = tmp / "sigkill"
    saw_partial = False
    for delay in (0.5, 1.5):
        proc = _cli(tmp, workdir, "--config.train.checkpoint_every_steps=1",
                    "--config.train.keep_checkpoints=2")
        ckdir = _wait_for_checkpoint(workdir, proc)
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=60)
        names = [p.name for p in ckdir.iterdir()]
        saw_partial |= any(not n.isdigit() for n in names)  # an uncommitted (tmp) checkpoint
        complete = [n for n in names if n.isdigit()]
        assert complete, names
    proc = _cli(tmp, workdir, "--config.train.checkpoint_every_steps=1",
                "--config.train.keep_checkpoints=2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    got = _export(workdir)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    print(f"an interrupted write was left behind by a kill: {saw_partial}")


def _nan_when_class3(logits, labels, class_counts, rng=None, *, gamma_pos, gamma_neg,
                     scale=20.0, margin=0.1, cloud_weight=0.5, cloud_std=1 / 3,
                     label_smoothing=0.1):
    """A-GCL that turns NaN whenever the batch holds class 3 (a data-dependent fault)."""
    loss = losses.agcl_loss(logits, labels, class_counts, rng, gamma_pos=gamma_pos,
                            gamma_neg=gamma_neg, scale=scale, margin=margin,
                            cloud_weight=cloud_weight, cloud_std=cloud_std,
                            label_smoothing=label_smoothing)
    return loss * jnp.where(jnp.any(labels == 3), jnp.nan, 1.0)  # NaN value and gradients


@pytest.fixture
def nan_loss(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "agcl_nan_on_class3", _nan_when_class3)


def _bad_steps(config, tmp):
    """Independently: the 1-based steps whose class-balanced batch holds class 3."""
    source = data.get_source(config.data)
    stream = data.make_train_stream(source, config.data, global_batch_size=8,
                                    seed=config.seed + 1000)
    return [s + 1 for s in range(config.train.max_steps)
            if 3 in next(stream)["cb"]["label"].tolist()]


def _nan_config(tmp, **train_fields):
    """10 steps of phase 1 whose class-balanced loss turns NaN on batches holding class 3."""
    config = tiny_config(tmp)
    config.train.phases = "1"
    config.train.max_steps = 10
    config.train.update(train_fields)
    config.loss.cb.name = "agcl_nan_on_class3"
    return config


def test_nonfinite_loss_stops_with_the_step_and_part(straight, nan_loss):
    tmp, _ = straight
    # Metrics are read every 10 steps but checkpoints written every step, so states after
    # the faulty step are saved before the error is seen: they must hold no NaN.
    config = _nan_config(tmp, log_every_steps=10, checkpoint_every_steps=1)
    first_bad = _bad_steps(config, tmp)[0]
    with pytest.raises(NonFiniteError) as err:
        trainer.train(config, str(tmp / "nan_stop"))
    msg = str(err.value)
    assert f"at step {first_bad}" in msg and "loss_cb" in msg
    ckdir = tmp / "nan_stop" / "phase1" / "checkpoints"
    steps = sorted(int(p.name) for p in ckdir.iterdir()) if ckdir.exists() else []
    assert steps and steps[-1] > first_bad, steps
    ck = ckpt_lib.PhaseCheckpointer(str(ckdir), every_steps=1, keep=3)
    for s in steps:  # nothing saved is worse than the last good state
        state, _ = ck.restore(s, None)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["trainable"]))
    ck.close()


def test_nonfinite_steps_can_be_skipped_and_counted(straight, nan_loss):
    tmp, _ = straight
    config = _nan_config(tmp, log_every_steps=10, on_nonfinite="skip")
    bad = _bad_steps(config, tmp)
    assert 0 < len(bad) < 10
    trainer.train(config, str(tmp / "nan_skip"))
    counted = tb_scalars(str(tmp / "nan_skip" / "phase1"), "nonfinite_steps")
    assert counted == [(10, float(len(bad)))]
    got = _export(tmp / "nan_skip")
    assert all(np.all(np.isfinite(v)) for v in got.values())


def test_a_signal_outside_the_train_loop_becomes_interrupted():
    """Outside the loop (startup, evaluation) run.py's handlers turn SIGTERM / SIGINT into
    `Interrupted`, which run.py words as one line (exit 128 + n) instead of dying silently."""
    from lpt_jax.errors import Interrupted
    from lpt_jax.run import preemption
    previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    try:
        preemption.raise_on_signals()
        for signum in preemption.SIGNALS:
            with pytest.raises(Interrupted) as err:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises at the next bytecode
            assert err.value.signum == signum
        # inside the loop the watch takes over, and gives the handlers back afterwards
        with preemption.PreemptionWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            assert watch.reached(1) and watch.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        preemption._received.clear()  # this process goes on testing


class _SignalledWhileFinalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here, inside the finalizer


# The finalizer's exception is the point of the test: Python reports it as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exception_a_finalizer_swallowed_is_not_lost():
    """A signal that lands while Python runs a `__del__` raises there, and Python only prints
    "Exception ignored": the signal must still stop the run at the next boundary (seen: a
    SIGTERM just after the train loop, lost while TF freed a resource; the run went on)."""
    from lpt_jax.errors import Interrupted
    from lpt_jax.run import preemption
    previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    try:
        preemption.raise_on_signals()
        _SignalledWhileFinalized()  # dropped at once: __del__ runs, its exception is ignored
        with pytest.raises(Interrupted) as err:
            preemption.raise_if_interrupted()
        assert err.value.signum == signal.SIGTERM
        with preemption.PreemptionWatch() as watch:  # a loop that starts afterwards stops
            assert watch.reached(0) and watch.signum == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        preemption._received.clear()
