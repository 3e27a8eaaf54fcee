"""One process of a 2-process CPU run (4 simulated devices each), launched by test_multiprocess.

Usage: python multiprocess_worker.py PROCESS_ID COORDINATOR_PORT TMPDIR WORKDIR [sigterm]
"""

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]),
                str(pathlib.Path(__file__).resolve().parent)]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    process_id, port, tmp, workdir = (int(sys.argv[1]), int(sys.argv[2]),
                                      pathlib.Path(sys.argv[3]), sys.argv[4])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    from lpt_jax import data
    from lpt_jax.errors import Preempted
    from lpt_jax.run import trainer

    from tiny_run import multiprocess_config

    # Record what this process's training stream hands over, to check it is only its share.
    seen = []
    real_stream = data.make_train_stream

    def recording_stream(*args, **kwargs):
        for batch in real_stream(*args, **kwargs):
            seen.append({k: batch[k]["label"].tolist() for k in ("cb", "ib")})
            yield batch
    data.make_train_stream = recording_stream

    config = multiprocess_config(tmp)
    if sys.argv[5:] == ["sigterm"]:  # a long phase 1, to be stopped by SIGTERM
        config.train.max_steps = 0
        config.phase1.epochs = 200
        config.train.phases = "1"
        try:
            trainer.train(config, workdir)
        except Preempted as e:
            print(f"PREEMPTED process {process_id}: {e}", flush=True)
            sys.exit(143)
        return
    trainer.train(config, workdir)
    out = pathlib.Path(workdir) / f"seen_labels_process{process_id}.json"
    out.write_text(json.dumps({"process_index": jax.process_index(),
                               "process_count": jax.process_count(),
                               "local_devices": jax.local_device_count(), "batches": seen}))


if __name__ == "__main__":
    main()
