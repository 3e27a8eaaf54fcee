"""Resumable train state of one phase, never the backbone: an Orbax manager for
{trainable, opt_state, step, rng} plus JSON metadata, asynchronous, every N steps and at the
end, keeping the last few. (The result of a phase is an export: lpt_jax/exports.py.)

Every checkpoint is verified, not only readable:

  save     refuses a state with a non-finite leaf (NonFiniteError naming the leaf) and records
           a sha256 of the state (every leaf's path, dtype, shape and host bytes, in path
           order) and of the metadata in the metadata item (`CHECKSUM_KEY`)
  restore  recomputes it from what was read back: a mismatch, a non-finite leaf or any Orbax
           error is a `DamagedCheckpointError`
  restore_latest_good
           tries the newest step, then the one before, ...; each damaged step is named in one
           warning line (with the step it falls back to) and set aside as `<step>.damaged-<time>`
           (kept for inspection, invisible to Orbax) so training continues past it. If steps
           exist and none restores, it raises instead of starting the phase over silently.

Every process runs the same code on the same files; with several processes the verdict on
each step is agreed (all must succeed) and process 0 renames.

On gs:// Orbax writes through etils.epath (folders, metadata) and tensorstore (arrays), which
`files.configure_remote_libraries` points at the seam's endpoint (GCS or an emulator); the
set-aside renames go through the seam itself.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lpt_jax.errors import ConfigError, DamagedCheckpointError, NonFiniteError
from lpt_jax.storage import files

# In the metadata item: the sha256 (covering the state and the rest of the metadata) and the
# checksum format.
CHECKSUM_KEY = "lpt_state_sha256"
VERSION_KEY = "lpt_checksum_version"
CHECKSUM_VERSION = 1
DAMAGED_SUFFIX = ".damaged"


class PhaseCheckpointer:
    def __init__(self, directory: str, *, every_steps: int, keep: int, asynchronous: bool = True):
        if int(keep) < 1:
            raise ConfigError(
                f"train.keep_checkpoints={keep}: must be at least 1 (with none kept, a stopped "
                "or preempted run could not resume)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), save_interval_steps=max(1, every_steps), create=True,
            enable_async_checkpointing=asynchronous)
        self.directory = files.absolute(directory)  # Orbax wants absolute local paths
        if files.is_remote(self.directory):
            files.configure_remote_libraries()  # Orbax's gs:// traffic: the seam's endpoint
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Mapping, meta: Mapping, *, force: bool = False) -> bool:
        """Saves when due (every N steps) or when `force`d; returns whether it saved. The
        checksum and the finiteness check read the host copy of the state (only on steps that
        save); Orbax then writes asynchronously."""
        if not force and not self._manager.should_save(step):
            return False
        leaves = _host_leaves(state)
        bad = _nonfinite(leaves)
        if bad:
            latest = self.latest_step()
            raise NonFiniteError(
                f"refusing to save checkpoint step {step} in {self.directory}: non-finite values "
                f"in {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                + (f"the newest checkpoint (step {latest}) is untouched and a rerun resumes "
                   "from it" if latest else "no checkpoint of this phase was saved"))
        meta = {k: v for k, v in meta.items() if k not in (CHECKSUM_KEY, VERSION_KEY)}
        meta.update({CHECKSUM_KEY: _digest(leaves, meta), VERSION_KEY: CHECKSUM_VERSION})
        with self._write_errors():  # an earlier asynchronous write's failure surfaces here
            return self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Optional[Mapping]) -> tuple[Any, dict]:
        """(state, meta) of `step`, verified against its checksum; `DamagedCheckpointError`
        (with the reason) if it cannot be read or is not what was saved. A checkpoint saved
        before checksums were recorded (neither checksum key in its metadata) is restored
        unverified, with a warning."""
        where = f"checkpoint step {step} in {self.directory}"
        with _quiet_cleanup():
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore()))
                state, meta, failure = restored["state"], dict(restored["meta"] or {}), None
            except Exception as e:  # noqa: BLE001 - any failure to read is damage to report
                logging.debug("restoring %s failed", where, exc_info=True)
                failure = _short(e)
            if failure is not None:
                # The exception and its frames are gone now: collect the failed reads'
                # leftovers here, quietly, rather than at some later point, loudly.
                gc.collect()
        if failure is not None:
            raise DamagedCheckpointError(f"{where} cannot be restored ({failure})")
        want, version = meta.pop(CHECKSUM_KEY, None), meta.pop(VERSION_KEY, None)
        leaves = _host_leaves(state)
        bad = _nonfinite(leaves)
        if bad:
            raise DamagedCheckpointError(f"{where} holds non-finite values ({bad[0]})")
        if want is None and version is None:
            logging.warning("%s has no checksum (saved by an older lpt_jax): restored "
                            "unverified", where)
        elif version != CHECKSUM_VERSION or not isinstance(want, str):
            # Two keys, so that one damaged key name cannot pass for an old checkpoint.
            raise DamagedCheckpointError(f"{where} has damaged metadata (checksum entries "
                                         f"{CHECKSUM_KEY}={want!r}, {VERSION_KEY}={version!r})")
        elif _digest(leaves, meta) != want:
            raise DamagedCheckpointError(
                f"{where} does not match the checksum recorded when it was saved")
        return state, meta

    def restore_latest_good(self, abstract_state: Optional[Mapping]
                            ) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest checkpoint that restores and verifies; None if
        there is no checkpoint. Each damaged newer step is set aside with one warning line
        naming it, why, and the step resumed from; `DamagedCheckpointError` (nothing changed)
        if checkpoints exist and none is good."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                with _quiet_cleanup():  # also covers late callbacks of an earlier failure
                    state, meta = self.restore(step, abstract_state)
                error = None
            except DamagedCheckpointError as e:
                state, meta, error = None, None, e
            if not _everyone_ok(error is None):
                damaged.append((step, str(error) if error is not None else
                                f"checkpoint step {step} in {self.directory} cannot be "
                                "restored by another process (see its log)"))
                continue
            kept = self._set_aside([s for s, _ in damaged])
            for (_, reason), name in zip(damaged, kept):
                logging.warning("%s; resuming from step %d instead (the damaged step is kept "
                                "as %s)", reason, step, name)
            return step, state, meta
        if damaged:
            raise DamagedCheckpointError(
                "no checkpoint can be restored: " + "; ".join(r for _, r in damaged)
                + f". Nothing was changed: to start the phase over, move {self.directory} aside")
        return None

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames damaged step folders to `<step>.damaged-<time>` (a name Orbax ignores), so
        training can save those steps again; the originals are kept to inspect. Returns the
        new names."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        names = [f"{step}{DAMAGED_SUFFIX}-{stamp}" for step in steps]
        names = [n if not files.exists(os.path.join(self.directory, n)) else f"{n}-{os.getpid()}"
                 for n in names]
        if steps:
            if jax.process_index() == 0:
                for step, name in zip(steps, names):
                    files.rename(os.path.join(self.directory, str(step)),
                                 os.path.join(self.directory, name))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("lpt_checkpoint_set_aside")
            self._manager.reload()
        return names

    def close(self) -> None:
        try:
            with self._write_errors():
                self._manager.wait_until_finished()
        finally:
            with contextlib.suppress(Exception):  # the failure above is the one to report
                self._manager.close()

    @contextlib.contextmanager
    def _write_errors(self):
        """A checkpoint write that failed (in Orbax's background threads: disk full,
        permissions, a bucket gone) as one OSError naming the checkpoint folder, which run.py
        words as one line; what was saved before stays."""
        try:
            yield
        except OSError as e:
            if e.filename is not None:
                raise
            # A file's write() that ran out of space names no file: name the folder.
            raise OSError(e.errno, e.strerror or str(e), self.directory) from None
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise ValueError & co.
            text = str(e)
            full = "No space left on device" in text or "RESOURCE_EXHAUSTED" in text
            why = ("No space left on device" if full else
                   f"the checkpoint could not be written ({_short(e)})")
            raise OSError(errno.ENOSPC if full else errno.EIO, why, self.directory) from None


# ------------------------------------------------------------------------------------------
# Host copies, checksum, finiteness.

def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _to_host(x):
    """A leaf as a numpy array: fully addressable arrays directly, replicated ones from a
    local copy, sharded ones across hosts gathered (every process saves and restores)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if x.is_fully_replicated:
                return x.addressable_data(0)
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(x, tiled=True)
    return x


def _host_leaves(state) -> list[tuple[str, np.ndarray]]:
    """(path, host array) of every leaf, sorted by path: the same order for the typed state
    that is saved and for the tree Orbax restores (with or without a target structure)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names = [_path_name(p) for p, _ in flat]
    values = jax.device_get([_to_host(v) for _, v in flat])
    return sorted(((n, np.asarray(v)) for n, v in zip(names, values)), key=lambda t: t[0])


def _digest(leaves: list[tuple[str, np.ndarray]], meta: Mapping) -> str:
    h = hashlib.sha256()
    for name, a in leaves:
        h.update(f"{name}|{a.dtype.name}|{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    h.update(json.dumps(dict(meta), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _nonfinite(leaves: list[tuple[str, np.ndarray]]) -> list[str]:
    """'path (k of n values)' for each floating leaf holding NaN or inf."""
    bad = []
    for name, a in leaves:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            k = a.size - int(np.count_nonzero(np.isfinite(a)))
            if k:
                bad.append(f"{name} ({k} of {a.size} values)")
    return bad


def _everyone_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@contextlib.contextmanager
def _quiet_cleanup():
    """A failed Orbax restore leaves reads of other arrays behind; their cleanup (when Python
    collects them, or when a TensorStore thread calls back into the closed event loop) would
    print pages of 'Exception ignored in ...' tracebacks. While restoring, such leftovers are
    logged at debug level only (as is the Orbax traceback itself)."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: logging.debug("after a failed restore: %s: %r",
                                                 u.err_msg or "ignored", u.exc_value)
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _short(err: Exception) -> str:
    """An Orbax/TensorStore exception as one short clause: its type and first line."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + " ..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
