"""What a phase reports while it trains: TensorBoard scalars (lpt_jax.run.events: clu writers,
process 0 only; a remote log folder is written locally and copied), a console line with the
rate and ETA, and the non-finite step guard's verdicts."""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from lpt_jax.errors import NonFiniteError


def make_writer(logdir: str):
    """TensorBoard events from process 0 only (`events.make_writer`). clu's writers import
    TensorFlow (2 s): loaded here, when a phase starts, not by every command that imports
    the trainer and may stop at a config check first."""
    from lpt_jax.run import events
    return events.make_writer(logdir)


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
        from clu import periodic_actions  # (imports TensorFlow: only once a phase runs)
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
