"""A full disk is one `error:` line naming the file or folder: a checkpoint that Orbax fails to
write in its background threads (measured on a real 20 MB tmpfs where this machine allows the
mount). A write through the file seam names its file too (tests/test_exports.py)."""

import errno
import os
import subprocess
import sys
import uuid

import pytest

from lpt_jax import cli
from lpt_jax.run.checkpoint import PhaseCheckpointer

from helpers import REPO, make_image_folder
from tiny_run import make_backbone


def test_a_failed_asynchronous_checkpoint_write_is_an_oserror_naming_the_folder(tmp_path):
    ckpt = PhaseCheckpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=1)

    def failing(*args, **kwargs):  # what Orbax raises once a background write ran out of space
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0": Failed to write 6941 '
                         "bytes to file 12: No space left on device [os_error_code='28']")
    ckpt._manager.wait_until_finished = failing
    with pytest.raises(OSError) as err:
        ckpt.close()
    assert err.value.errno == errno.ENOSPC and err.value.filename == ckpt.directory
    assert cli.os_error_line(err.value) == (
        f"cannot write or read {ckpt.directory}: No space left on device; free some space "
        "(the run resumes from its last checkpoint)")


def test_a_write_that_names_no_file_is_named_by_the_checkpoint_folder(tmp_path):
    """A file's write() out of space raises OSError(28) without a filename (seen once in
    ~10 staged disk-full runs: 'cannot write or read: No space left on device')."""
    ckpt = PhaseCheckpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=1)

    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    ckpt._manager.wait_until_finished = failing
    with pytest.raises(OSError) as err:
        ckpt.close()
    assert err.value.errno == errno.ENOSPC and err.value.filename == ckpt.directory


@pytest.fixture
def tiny_disk(tmp_path):
    """A 20 MB tmpfs, nearly full, or a skip where this machine does not allow the mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a 20 MB tmpfs is not allowed here (needs root with "
                    "CAP_SYS_ADMIN): the disk-full run cannot be staged")
    try:
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (free - (300 << 10)))  # 300 KiB left: config.json fits, a step not
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, tiny_disk):
    make_image_folder(tmp_path / "data")
    make_backbone(tmp_path / "vit.npz")
    workdir = tiny_disk / f"wd{uuid.uuid4().hex[:6]}"
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), f"--config={REPO}/tests/tiny_cli_config.py:{tmp_path}",
         f"--workdir={workdir}", "--config.train.phases=1", "--config.eval.plot=False"],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot write or read {workdir}/phase1/checkpoints: No space left "
                      "on device; free some space (the run resumes from its last checkpoint)"], \
        proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr, \
        proc.stderr[-6000:]
    assert len(proc.stderr.splitlines()) < 40, proc.stderr


_CLOSED_LOOP = """
import asyncio, sys, numpy as np, tensorstore as ts
if sys.argv[1] == "quiet":
    from lpt_jax import cli
    cli.quiet_closed_loop_callbacks()
arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[2]}},
              create=True, dtype=ts.float32, shape=[2 ** 23],
              chunk_layout=ts.ChunkLayout(chunk_shape=[2 ** 16])).result()

async def write():
    await arr.write(np.ones(2 ** 23, np.float32))

async def start():  # the loop closes with the write in flight, as Orbax's does on a failure
    asyncio.ensure_future(write())
    await asyncio.sleep(0.001)

loop = asyncio.new_event_loop()
loop.run_until_complete(start())
loop.close()
arr.write(np.zeros(1, np.float32)).result()  # wait for TensorStore's queue
import time; time.sleep(0.5)
raise ValueError("an unraisable-free failure is still reported")
"""


def test_writes_that_finish_after_orbax_closed_its_loop_print_no_tracebacks(tmp_path):
    """Seen in about 1 of 10 disk-full runs under load: a traceback per TensorStore chunk
    ('Event loop is closed') after the one error line. The same C++ callbacks, staged."""
    runs = {}
    for mode in ("default", "quiet"):
        proc = subprocess.run([sys.executable, "-c", _CLOSED_LOOP, mode, str(tmp_path / mode)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        runs[mode] = proc.stderr
    assert "RuntimeError: Event loop is closed" in runs["default"]  # the staging works
    assert "Event loop is closed" not in runs["quiet"], runs["quiet"][-3000:]
    assert "ValueError: an unraisable-free failure is still reported" in runs["quiet"]
