"""The run directory (the workdir): its layout, the guard that keeps one run per workdir, and
the undo of an invocation that failed before it saved anything.

    config.json                 the run-defining config (a different one refuses to resume)
    lease.json                  while a run is live: its host, pid, start, heartbeat (lease.py)
    phase<n>/checkpoints/<step> Orbax: {trainable, opt_state, step, rng} + metadata
    phase<n>/export.npz         the phase's trained prompts/pool/keys/head + meta
    phase<n>/events.out...      TensorBoard curves
    phase<n>/val/               the phase's validation report (never the test split)
    results/                    the final table (md + json), per-class CSV and plot
    eval/                       what an evaluation of the workdir writes

`phase<n>` is a phase's name (lpt_jax.method.phases). What defines a run is derived from the
config's field declarations (lpt_jax.config.schema.run_defining).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Optional

from absl import logging

from lpt_jax.config import schema
from lpt_jax.errors import ConfigError, Input, Setting
from lpt_jax.storage import files

CONFIG_FILE = "config.json"
# Entries that mean an invocation made progress worth resuming from (never undone).
_PROGRESS = re.compile(r"phase\d+/(checkpoints/\d+(\.damaged-[\w-]+)?|export\.npz)")


def phase_dir(workdir: str, phase) -> str:
    """`phase`: a Phase, or its number."""
    return os.path.join(workdir, getattr(phase, "name", f"phase{phase}"))


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
    """The export of the last of `phases` (tried from the last) that exists."""
    for phase in sorted(phases, key=lambda p: p.number, reverse=True):
        if files.exists(export_path(workdir, phase)):
            return export_path(workdir, phase)
    return None


# ------------------------------------------------------------------------------------------
# One run per workdir.

def run_defining(config) -> dict:
    """The fields that define what the run computes (lpt_jax.config.schema.run_defining)."""
    return schema.run_defining(config)


def run_identity(config, backbone_identity: dict, data_identity: dict) -> dict:
    """What config.json holds: the run-defining config and the identity of its inputs."""
    backbone = {k: v for k, v in backbone_identity.items() if k != "path"}
    return {"config": run_defining(config), "inputs": {"backbone": backbone,
                                                       "data": data_identity}}


def check_config(config, workdir: str) -> None:
    """Refuses (before anything is built) to resume a workdir that holds a run of a different
    config."""
    _refuse_if_different(config, workdir, "config", run_defining(config))


def check_inputs(config, workdir: str, identity: dict) -> None:
    """Refuses to resume a workdir whose run read another backbone file or other training
    data (e.g. a data folder that grew), whatever their paths."""
    _refuse_if_different(config, workdir, "inputs", identity["inputs"])


def record(workdir: str, identity: dict) -> None:
    """Writes config.json once: a resume with allow_config_change=True leaves the original
    record, so the original command still resumes the workdir afterwards."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not files.exists(path):
        files.write_text(path, json.dumps(identity, indent=1, sort_keys=True))


def _refuse_if_different(config, workdir: str, part: str, ours: dict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not files.exists(path):
        return
    try:
        theirs = json.loads(files.read_text(path))
    except ValueError as e:
        raise ConfigError(f"{path} is not readable JSON ({e}): this workdir was not written by "
                          "this lpt_jax or was damaged; use a new ", Input("workdir"),
                          path=path) from None
    if not isinstance(theirs, dict):
        raise ConfigError(f"{path} holds {json.dumps(theirs)[:60]}, not a run record: this "
                          "workdir was not written by this lpt_jax or was damaged; use a new ",
                          Input("workdir"), path=path)
    recorded = theirs.get(part) if isinstance(theirs.get(part), dict) else {}
    if part == "config":  # a field the record lacks was added since: it ran at its default
        diff = sorted(p for p in _leaves(ours) if _at(ours, p) != _at(
            recorded, p, lambda: schema.declared_default(config, p)))
    else:  # an identity a record lacks (written before it was recorded) is not compared
        diff = sorted(p for p in set(_leaves(recorded)) | set(_leaves(ours))
                      if _at(recorded, p) != _at(ours, p)
                      and not (_at(recorded, p) is _ABSENT and p in _LATER_IDENTITIES))
    if diff and not config.train.allow_config_change:
        what = ("a run with a different config" if part == "config" else
                "a run that read other inputs (backbone file or training data)")
        raise ConfigError(
            f"{workdir} holds {what} ({', '.join(diff[:8])}"
            f"{' ...' if len(diff) > 8 else ''}): use a new ", Input("workdir"),
            ", or pass ", Setting("train.allow_config_change", True), " to resume it anyway",
            path=path)


_ABSENT = object()
# Input identities added after the first records: an older record without them still
# resumes (it is judged by what it has).
_LATER_IDENTITIES = ("data.train_content_sha256", "backbone.sha256")


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the values in a nested dict."""
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _at(tree: dict, dotted: str, missing=lambda: _ABSENT):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing()
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------
# Leaving the workdir as found when an invocation fails early.

# What each mode writes in a workdir (top-level names). Training holds the workdir's lease, so
# nothing else writes these meanwhile; evaluation and prediction take no lease and undo only
# the files they themselves created.
TRAINING_OUTPUTS = re.compile(r"config\.json|phase\d+|results")


class Snapshot:
    """What a workdir held before an invocation, and what the invocation creates through the
    file seam; `undo` removes what this invocation added and nothing else.

    Training (`mode='train'`, under the lease): new entries among its own outputs
    (`config.json`, `phase<n>/`, `results/`; not the lease, not `eval/`), config.json restored,
    unless it saved a checkpoint or an export to resume from. Evaluation and prediction (no
    lease: another run may write beside them): exactly the files and folders they created,
    by name. Use as a context manager around the invocation."""

    def __init__(self, workdir: str, mode: str = "train"):
        self.workdir, self.mode, self.readable = workdir, mode, True
        self.created: list[str] = []
        self._recording = None
        try:
            self.entries = _entries(workdir) if mode == "train" else None
            config = os.path.join(workdir, CONFIG_FILE)
            self.config_json = (files.read_bytes(config) if self.entries is not None
                                and files.exists(config) else None)
            self.existed = files.isdir(workdir)
        except OSError as e:  # an unreachable or forbidden bucket: the run reports it itself
            logging.debug("cannot list %s (%s): nothing will be undone", workdir, e)
            self.readable, self.entries, self.config_json, self.existed = False, None, None, True

    def __enter__(self) -> "Snapshot":
        self._recording = files.recording()
        self.created = self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)

    def undo(self) -> list[str]:
        """What was removed or restored (never raises: it runs while an error is reported)."""
        if not self.readable:
            return []
        try:
            return self._undo_training() if self.mode == "train" else self._undo_created()
        except OSError as e:
            logging.warning("could not undo this run's partial output in %s (%s)",
                            self.workdir, e)
            return []

    def _undo_created(self) -> list[str]:
        root = files.absolute(self.workdir).rstrip("/") + "/"
        undone = []
        for path in reversed(self.created):  # deepest first: folders after their files
            inside = files.absolute(path)
            if not (inside + "/").startswith(root) and inside != root.rstrip("/"):
                continue
            if files.is_remote(path) or not os.path.isdir(path):
                if files.exists(path):
                    files.remove(path)
                    undone.append(path)
            elif not os.listdir(path):  # a folder it created and nothing else filled
                os.rmdir(path)
                undone.append(path)
        return [os.path.relpath(p, self.workdir) if not files.is_remote(p) else p
                for p in undone]

    def _undo_training(self) -> list[str]:
        after = _entries(self.workdir)
        if after is None:
            return []
        new = {p for p in after - (self.entries or set())
               if TRAINING_OUTPUTS.fullmatch(p.split("/")[0])}
        if any(_PROGRESS.fullmatch(p) for p in new):
            logging.warning("keeping the checkpoints this run saved in %s: rerun the same "
                            "command to resume once the problem is fixed", self.workdir)
            return []
        undone = sorted(p for p in new if os.path.dirname(p) not in new)
        for p in undone:
            files.remove(os.path.join(self.workdir, p))
        path = os.path.join(self.workdir, CONFIG_FILE)
        if self.config_json is not None and (
                not files.exists(path) or files.read_bytes(path) != self.config_json):
            files.write_bytes(path, self.config_json)
            undone.append(f"{CONFIG_FILE} (restored)")
        if not self.existed and not files.is_remote(self.workdir):
            with contextlib.suppress(OSError):  # a folder it created, if nothing else is there
                os.rmdir(self.workdir)
                undone.append(self.workdir)
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
