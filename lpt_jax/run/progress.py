"""What a phase reports while it trains: TensorBoard scalars (clu writers, process 0 only), a
console line with the rate and ETA, and the non-finite step guard's verdicts.

TensorBoard's event writer reaches remote folders only through TensorFlow's own file systems,
which cannot be pointed at an emulator: for a remote log folder the events are written to a
local temporary folder and copied there through lpt_jax.files (at every flush, and at most
every `SYNC_EVERY_S` seconds while the phase writes: the delay TensorFlow's own writer has)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from lpt_jax.errors import NonFiniteError
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Collects each step's metrics (device arrays, fetched only when reported) and reports
    them every `every` steps: mean scalars to TensorBoard, one line to the console."""

    def __init__(self, phase: int, total: int, steps_per_epoch: int, images_per_step: int,
                 writer, every: int, on_nonfinite: str, latest_checkpoint=lambda: None):
        self.phase, self.total, self.spe, self.ips = phase, total, steps_per_epoch, images_per_step
        self.writer, self.every, self.on_nonfinite = writer, every, on_nonfinite
        self.latest_checkpoint = latest_checkpoint  # () -> the newest saved step, or None
        self.pending: list = []
        self.t0, self.s0 = None, None
        self.report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                      every_steps=every)

    def start(self, step: int) -> None:
        logging.info("phase %d: compiling the train step (step %d/%d)...", self.phase, step,
                     self.total)

    def add(self, step: int, metrics, *, force: bool = False) -> None:
        self.pending.append((step, metrics))
        self.report(step)  # clu's steps/s and ETA in TensorBoard; it wants every step
        if force or step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        host = jax.device_get([m for _, m in self.pending])
        self.pending = []
        for s, m in zip(steps, host):
            if int(m["nonfinite"]):
                self._nonfinite(s, m)
        scalars = {k: float(np.mean([m[k] for m in host])) for k, v in host[-1].items()
                   if np.ndim(v) == 0 and k != "nonfinite"}
        scalars["nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host))
        if "pool_selection" in host[-1]:  # the pool entries picked: collapse shows here
            picked = np.concatenate([m["pool_selection"] for m in host]).astype(np.int64)
            scalars["pool_entries_used"] = float(len(np.unique(picked)))
            self.writer.write_histograms(steps[-1], {"pool_selection": np.sort(picked)})
        self.writer.write_scalars(steps[-1], scalars)
        self._line(steps[-1], scalars)

    def _nonfinite(self, step: int, m) -> None:
        parts = {k: float(v) for k, v in m.items() if np.ndim(v) == 0 and k != "nonfinite"}
        bad = [k for k, v in parts.items() if not np.isfinite(v)]
        msg = (f"non-finite {', '.join(bad) or 'gradient'} at step {step} "
               f"(values: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); "
               "the update was not applied")
        if self.on_nonfinite == "stop":
            saved = self.latest_checkpoint()
            raise NonFiniteError(msg + (
                f"; the checkpoint of step {saved} holds the last good state" if saved else
                "; no checkpoint of this phase was saved yet (lower optim.base_lr, or set "
                "train.on_nonfinite='skip')"))
        logging.warning(msg + "; skipped (train.on_nonfinite='skip')")

    def _line(self, step: int, scalars) -> None:
        now = time.time()
        if self.s0 is None:  # the first interval includes compilation: no rate yet
            self.s0, self.t0 = step, now
            speed = "rate after the next report"
        else:
            rate = (step - self.s0) / max(now - self.t0, 1e-9)
            eta = _duration((self.total - step) / rate) if rate > 0 else "?"
            speed = f"{rate * self.ips:.1f} img/s  ETA {eta}"
        logging.info("phase %d  step %d/%d  epoch %d  loss %.4f  lr %.3g  |g| %.3g  %s",
                     self.phase, step, self.total, (step - 1) // self.spe, scalars["loss"],
                     scalars["lr"], scalars["grad_norm"], speed)
