"""Two processes (jax.distributed, CPU collectives, 4 simulated devices each) reproduce the
single-process run on 8 devices; only process 0 writes; each process reads only its share."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lpt_jax import data, tree
from lpt_jax.run import exports, rundir, trainer

from helpers import TESTS, make_image_folder
from tiny_run import make_backbone, multiprocess_config

WORKER = TESTS / "multiprocess_worker.py"


def _launch(port, tmp, workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(tmp), workdir,
                              *extra], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    make_image_folder(tmp / "data")
    make_backbone(tmp / "vit.npz")
    multi = str(tmp / "multi")
    port = _free_port()
    procs = _launch(port, tmp, multi)
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    single = str(tmp / "single")
    trainer.train(multiprocess_config(tmp), single)
    return tmp, multi, single


def test_two_processes_equal_one_process_on_eight_devices(runs):
    _, multi, single = runs
    for phase in (1, 2):
        a, _ = exports.read(rundir.export_path(multi, phase))
        b, _ = exports.read(rundir.export_path(single, phase))
        fa, fb = tree.flatten(a), tree.flatten(b)
        assert sorted(fa) == sorted(fb)
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], atol=2e-5, err_msg=f"phase {phase} {k}")
    ra = json.load(open(os.path.join(multi, "results", "results.json")))
    rb = json.load(open(os.path.join(single, "results", "results.json")))
    assert ra["num_examples"] == rb["num_examples"] == 16
    assert ra["overall"] == rb["overall"]


def test_only_process_zero_writes_and_checkpoints_are_consistent(runs):
    _, multi, _ = runs
    for phase in (1, 2):
        pdir = os.path.join(multi, f"phase{phase}")
        assert len(glob.glob(os.path.join(pdir, "events.out.tfevents.*"))) == 1
        steps = os.listdir(os.path.join(pdir, "checkpoints"))
        assert "3" in steps and all(s.isdigit() for s in steps), steps  # no half-written dirs
        assert not glob.glob(os.path.join(pdir, "*.tmp"))
    assert sorted(os.listdir(os.path.join(multi, "results"))) == [
        "per_class.csv", "results.json", "table.md"]


def test_each_process_reads_only_its_share(runs):
    tmp, multi, _ = runs
    config = multiprocess_config(tmp)
    source = data.get_source(config.data)
    full = data.make_train_stream(source, config.data, global_batch_size=8, seed=config.seed + 1000,
                                  start_step=0, process_index=0, process_count=1)
    global_batches = [next(full) for _ in range(3)]
    for pid in (0, 1):
        seen = json.load(open(os.path.join(multi, f"seen_labels_process{pid}.json")))
        assert seen["process_index"] == pid and seen["process_count"] == 2
        assert seen["local_devices"] == 4
        phase1 = seen["batches"][:3]
        for step, local in enumerate(phase1):
            for stream in ("cb", "ib"):
                want = global_batches[step][stream]["label"][4 * pid:4 * pid + 4].tolist()
                assert local[stream] == want and len(local[stream]) == 4


def test_sigterm_stops_every_process_at_the_same_step(runs):
    tmp, _, _ = runs
    workdir = str(tmp / "sigterm")
    procs = _launch(_free_port(), tmp, workdir, "sigterm")
    ckdir = os.path.join(workdir, "phase1", "checkpoints")
    deadline = time.time() + 300
    while not (os.path.isdir(ckdir) and any(n.isdigit() for n in os.listdir(ckdir))):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.2)
    time.sleep(2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
    stops = [re.search(r"stopped at step (\d+) on SIGTERM", o).group(1) for o in outs]
    assert stops[0] == stops[1], stops
    assert stops[0] in os.listdir(ckdir)
    assert not os.path.exists(rundir.export_path(workdir, 1))
