"""SIGTERM (the preemption notice on Cloud TPU) asks the train loop to save and stop.

With several processes, JAX's preemption sync point makes every process agree on the same
step to stop at; a single process uses its own signal handler.
"""

from __future__ import annotations

import signal

import jax
from absl import logging


class PreemptionWatch:
    def __init__(self):
        self._signalled = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not in the main thread
                self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._signalled = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
