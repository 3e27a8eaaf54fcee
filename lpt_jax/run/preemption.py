"""SIGTERM (the preemption notice on Cloud TPU) and SIGINT (Ctrl-C) ask the train loop to save
a checkpoint and stop; run.py then exits with 128 + the signal number (143, 130).

With several processes, JAX's preemption sync point makes every process agree on the same
step to stop at (SIGTERM); a single process uses its own handlers. Outside the loop, run.py's
handlers turn the same signals into `Interrupted`.
"""

from __future__ import annotations

import signal

import jax
from absl import logging

from lpt_jax.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
    def __init__(self):
        self.signum = None
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if _received:  # a signal came before the loop and its exception was lost
            self.signum = _received[0]
        for signum in SIGNALS:
            if self._multi and signum == signal.SIGTERM:
                continue  # JAX's preemption sync manager owns SIGTERM
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        logging.warning("%s received: saving a checkpoint and stopping",
                        signal.Signals(signum).name)
        self.signum = signum

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
        return self.signum is not None

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


# Signals received outside the train loop. The handler's exception is lost when the signal
# lands while Python runs a finalizer (`__del__`: "Exception ignored in ..."), so the signal
# is also kept here, and `raise_if_interrupted` (at every phase and evaluation boundary, and
# before run.py exits) raises it again.
_received: list[int] = []


def raise_on_signals() -> None:
    """Outside the train loop a signal stops the run at once, as `Interrupted` (run.py words
    it as one line and keeps what was saved)."""
    def handle(signum, frame):
        _received.append(signum)
        raise Interrupted(signum)
    for signum in SIGNALS:
        signal.signal(signum, handle)


def raise_if_interrupted() -> None:
    """`Interrupted` for a signal whose exception was swallowed on its way."""
    if _received:
        raise Interrupted(_received[0])
