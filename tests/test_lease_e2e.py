"""End-to-end checks of the lease and verified-resume wiring (trainer.py / run.py)."""

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lpt_jax import tree
from lpt_jax.errors import Stopped
from lpt_jax.run import exports, rundir, trainer

from helpers import REPO
from tiny_run import tiny_config


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    config = tiny_config(tmp_path)
    config.train.phases = "1"
    config.eval.plot = False
    trainer.train(config, str(tmp_path / "straight"))
    config.train.stop_after_steps = 7
    with pytest.raises(Stopped, match="step 7"):
        trainer.train(config, str(tmp_path / "wd"))
    ckdir = tmp_path / "wd" / "phase1" / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckdir)) == [3, 6, 7]
    for data in (p for p in (ckdir / "7").rglob("*") if p.is_file() and p.parent.name == "d"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    config.train.stop_after_steps = 0
    caplog.set_level(logging.WARNING)
    trainer.train(config, str(tmp_path / "wd"))
    warned = [r.getMessage() for r in caplog.records if "step 7" in r.getMessage()]
    assert len(warned) == 1 and "resuming from step 6" in warned[0], warned
    a, _ = exports.read(rundir.export_path(str(tmp_path / "straight"), 1))
    b, _ = exports.read(rundir.export_path(str(tmp_path / "wd"), 1))
    for k, v in tree.flatten(a).items():
        np.testing.assert_array_equal(v, tree.flatten(b)[k], err_msg=k)
    assert any(n.startswith("7.damaged-") for n in os.listdir(ckdir))


def _cli(tmp, workdir, *overrides, epochs=12):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), f"--config={REPO}/tests/tiny_cli_config.py:{tmp}",
         f"--workdir={workdir}", "--config.train.phases=1", f"--config.phase1.epochs={epochs}",
         "--config.eval.plot=False", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_run_on_a_live_workdir_is_refused_and_touches_nothing(tmp_path):
    tiny_config(tmp_path)  # data and backbone
    workdir = tmp_path / "wd"
    first = _cli(tmp_path, workdir, epochs=400)  # long enough to be live when signalled
    t0 = time.time()
    while not (workdir / "config.json").exists():
        assert first.poll() is None, first.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    second = _cli(tmp_path, workdir, "--config.seed=1", epochs=400)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "is in use by another run" in line, err
    assert f"pid {first.pid}" in line
    assert (workdir / "config.json").exists() and (workdir / "lease.json").exists()
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    assert not (workdir / "lease.json").exists()
    assert '"seed": 0' in (workdir / "config.json").read_text()


def test_a_run_whose_lease_is_taken_over_stops_before_writing_more(tmp_path, monkeypatch):
    """Another run takes the lease over mid-training (as after a stall longer than stale_s):
    the heartbeat notices, the loop stops at the next step with one line, no export is
    written, and the other run's lease is left in place."""
    import functools
    import json
    import threading
    import uuid

    from lpt_jax.errors import LeaseError
    from lpt_jax.run import lease
    from lpt_jax.storage import files
    monkeypatch.setattr(lease, "WorkdirLease",
                        functools.partial(lease.WorkdirLease, heartbeat_s=0.05))
    config = tiny_config(tmp_path, epochs=400)  # far longer than the test lets it run
    config.train.phases, config.eval.plot = "1", False
    workdir = tmp_path / "wd"
    path = str(workdir / "lease.json")
    other = {"host": "elsewhere", "pid": 4242, "started": "2020-01-02 03:04:05 UTC",
             "heartbeat": time.time(), "machine": "other-host|x|y", "pid_start": None,
             "token": uuid.uuid4().hex, "command": "run.py"}
    stop = threading.Event()

    def take_over():
        while not (workdir / "phase1" / "checkpoints").exists():  # training has started
            if stop.wait(0.1):
                return
        while not stop.is_set():  # until it stands (a heartbeat may write over it once)
            files.write_text(path, json.dumps(other))
            stop.wait(0.3)

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseError, match="taken over by another run"):
            trainer.train(config, str(workdir))
    finally:
        stop.set()
        thread.join()
    assert not (workdir / "phase1" / "export.npz").exists()
    assert json.loads((workdir / "lease.json").read_text())["token"] == other["token"]
