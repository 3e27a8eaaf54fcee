"""Resumable train state of one phase, never the backbone: an Orbax manager for
{trainable, opt_state, step, rng} plus JSON metadata, asynchronous, every N steps and at the
end, keeping the last few. (The result of a phase is an export: lpt_jax/exports.py.)"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import orbax.checkpoint as ocp

from lpt_jax import files


class PhaseCheckpointer:
    def __init__(self, directory: str, *, every_steps: int, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True,
            enable_async_checkpointing=asynchronous)
        self.directory = files.absolute(directory)  # Orbax wants absolute local paths
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Mapping, meta: Mapping, *, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=force)

    def restore(self, step: int, abstract_state: Mapping) -> tuple[Any, dict]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
