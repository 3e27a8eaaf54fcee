"""TensorBoard writers (clu's, which import TensorFlow): process 0 writes, other processes
get a writer that drops everything.

TensorBoard's event writer reaches remote folders only through TensorFlow's own file systems,
which cannot be pointed at an emulator: for a remote log folder the events are written to a
local temporary folder and copied there through lpt_jax.storage.files (at every flush, and at
most every `SYNC_EVERY_S` seconds while the phase writes: the delay TensorFlow's own writer
has)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import jax
from absl import logging
from clu import metric_writers

from lpt_jax.storage import files

SYNC_EVERY_S = 120.0


def make_writer(logdir: str):
    """TensorBoard events from process 0 only. (clu's create_default_writer would also log
    every scalar to the console; `Progress` prints one readable line instead.)"""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    if files.is_remote(logdir):
        return RemoteEventsWriter(logdir)
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


class RemoteEventsWriter(metric_writers.MultiWriter):
    """Events written to a local temporary folder, copied to the remote `logdir` through the
    file seam at `flush()` and, while writing, at most every `sync_every_s` seconds. A copy
    that fails is a warning (training goes on; the events stay in the local folder)."""

    def __init__(self, logdir: str, sync_every_s: float = SYNC_EVERY_S):
        self.logdir, self.sync_every_s = logdir, sync_every_s
        self.local = tempfile.mkdtemp(prefix="lpt_events_")
        atexit.register(shutil.rmtree, self.local, True)
        self._synced = time.monotonic()
        super().__init__([metric_writers.AsyncWriter(metric_writers.SummaryWriter(self.local))])

    def write_scalars(self, step, scalars):
        super().write_scalars(step, scalars)
        if time.monotonic() - self._synced > self.sync_every_s:
            self.flush()

    def flush(self):
        super().flush()
        self._synced = time.monotonic()
        try:
            for name in sorted(os.listdir(self.local)):
                with open(os.path.join(self.local, name), "rb") as f:
                    files.write_bytes(os.path.join(self.logdir, name), f.read())
        except OSError as e:
            logging.warning("TensorBoard events not copied to %s (%s); they are in %s until "
                            "this process ends", self.logdir, e, self.local)

    def close(self):
        self.flush()
        super().close()
