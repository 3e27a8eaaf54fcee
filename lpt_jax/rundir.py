"""The run directory (`--workdir`): its layout, the guard that keeps one run per workdir, and
the undo of an invocation that failed before it saved anything.

    config.json                 the run-defining config (a different one refuses to resume)
    phase<n>/checkpoints/<step> Orbax: {trainable, opt_state, step, rng} + metadata
    phase<n>/export.npz         the phase's trained prompts/pool/keys/head + meta
    phase<n>/events.out...      TensorBoard curves
    phase<n>/val/               the phase's validation report (never the test split)
    results/                    the final table (md + json), per-class CSV and plot
    eval/                       what --mode=eval writes
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from absl import logging

from lpt_jax import files
from lpt_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# Config sections that define a run; a restart with different values would mix two runs.
RUN_DEFINING_SECTIONS = ("seed", "model", "backbone", "data", "loss", "optim", "phase1", "phase2")
# Entries that mean an invocation made progress worth resuming from (never undone).
_PROGRESS = re.compile(r"phase\d+/(checkpoints/\d+|export\.npz)")


def phase_dir(workdir: str, phase) -> str:
    return os.path.join(workdir, f"phase{int(getattr(phase, 'number', phase))}")


def checkpoint_dir(workdir: str, phase) -> str:
    return files.absolute(os.path.join(phase_dir(workdir, phase), "checkpoints"))


def export_path(workdir: str, phase) -> str:
    return os.path.join(phase_dir(workdir, phase), "export.npz")


def val_dir(workdir: str, phase) -> str:
    return os.path.join(phase_dir(workdir, phase), "val")


def results_dir(workdir: str) -> str:
    return os.path.join(workdir, "results")


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")


def latest_export(workdir: str, phases) -> Optional[str]:
    """The export of the last of `phases` (numbers, tried from the last) that exists."""
    for number in sorted(phases, reverse=True):
        if files.exists(export_path(workdir, number)):
            return export_path(workdir, number)
    return None


# ------------------------------------------------------------------------------------------
# One run per workdir.

def run_defining(config) -> dict:
    full = json.loads(config.to_json_best_effort())
    return {k: full[k] for k in RUN_DEFINING_SECTIONS if k in full}


def check_config(config, workdir: str) -> None:
    """Refuses to resume a workdir that holds a run of a different config."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not files.exists(path):
        return
    diff = sorted(_diff(json.loads(files.read_text(path)), run_defining(config)))
    if diff and not config.train.get("allow_config_change", False):
        raise ConfigError(
            f"{workdir} holds a run with a different config ({', '.join(diff[:8])}"
            f"{' ...' if len(diff) > 8 else ''}): use a new --workdir, or pass "
            "--config.train.allow_config_change=True to resume it anyway")


def record_config(config, workdir: str) -> None:
    files.write_text(os.path.join(workdir, CONFIG_FILE),
                     json.dumps(run_defining(config), indent=1, sort_keys=True))


def _diff(a, b, prefix="") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


# ------------------------------------------------------------------------------------------
# Leaving the workdir as found when an invocation fails early.

class Snapshot:
    """What a workdir held before an invocation; `undo` removes what the invocation added
    (and restores config.json) unless it saved a checkpoint or an export to resume from."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.entries = _entries(workdir)
        config = os.path.join(workdir, CONFIG_FILE)
        self.config_json = (files.read_bytes(config) if self.entries is not None
                            and files.exists(config) else None)

    def undo(self) -> list[str]:
        after = _entries(self.workdir)
        if after is None:
            return []
        new = after - (self.entries or set())
        if any(_PROGRESS.fullmatch(p) for p in new):
            logging.warning("keeping the checkpoints this run saved in %s: rerun the same "
                            "command to resume once the problem is fixed", self.workdir)
            return []
        if self.entries is None:  # the workdir itself is new
            files.remove(self.workdir)
            return [self.workdir]
        undone = sorted(p for p in new if os.path.dirname(p) not in new)
        for p in undone:
            files.remove(os.path.join(self.workdir, p))
        path = os.path.join(self.workdir, CONFIG_FILE)
        if self.config_json is not None and (
                not files.exists(path) or files.read_bytes(path) != self.config_json):
            files.write_bytes(path, self.config_json)
            undone.append(f"{CONFIG_FILE} (restored)")
        return undone


def _entries(workdir: str) -> Optional[set[str]]:
    """Relative paths of every file and folder under `workdir`; None if it does not exist."""
    if not files.isdir(workdir):
        return None
    found = set()
    for root, dirs, names in files.walk(workdir):
        rel = root[len(workdir.rstrip("/")):].strip("/")
        for name in list(dirs) + list(names):
            found.add(f"{rel}/{name}".strip("/"))
    return found
