"""Checkpoints of what is trained, never the backbone.

* `PhaseCheckpointer`: Orbax manager for the resumable train state of one phase
  ({trainable, opt_state, step, rng}) plus JSON metadata (data position, config fingerprint),
  asynchronous, every N steps and at the end, keeping the last few.
* `export_trained` / `load_export`: one small .npz with the trained prompts/pool/keys/head, the
  config and the backbone checkpoint's identity, which eval and predict load next to the backbone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from lpt_jax import tree

EXPORT_META_KEY = "__lpt_meta__"


class PhaseCheckpointer:
    def __init__(self, directory: str, *, every_steps: int, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True,
            enable_async_checkpointing=asynchronous)
        if "://" not in directory:  # Orbax wants absolute local paths
            directory = os.path.abspath(directory)
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Mapping, meta: Mapping, *, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=force)

    def restore(self, step: int, abstract_state: Mapping) -> tuple[Any, dict]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ------------------------------------------------------------------------------------------
# The exported result of a phase.

def file_fingerprint(path: str) -> dict:
    """Identity of a (possibly huge, possibly remote) file without reading all of it:
    size plus sha256 over its first and last MiB."""
    from lpt_jax.backbone import _open  # one place that knows local vs gs:// paths
    with _open(path) as f:
        head = f.read(1 << 20)
        size = _size(f, path)
        if size > 2 << 20:
            f.seek(size - (1 << 20))
        tail = f.read(1 << 20) if size > 1 << 20 else b""
    return {"path": path, "size": size,
            "sha256_head_tail": hashlib.sha256(head + tail).hexdigest()}


def _size(f, path) -> int:
    if "://" in path:
        import tensorflow as tf
        return tf.io.gfile.stat(path).length
    return os.fstat(f.fileno()).st_size


def export_trained(path: str, trained: Mapping, meta: Mapping) -> None:
    """Writes {path-named arrays} + JSON meta into one .npz (atomically: temp file + rename)."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten(trained).items()}
    flat[EXPORT_META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    _write_atomic(path, buf.getvalue())


def load_export(path: str) -> tuple[dict, dict]:
    """Returns (nested trained params, meta) of an exported file."""
    from lpt_jax.backbone import read_arrays
    arrays = read_arrays(path)
    meta_bytes = arrays.pop(EXPORT_META_KEY, None)
    if meta_bytes is None:
        from lpt_jax.backbone import CheckpointError
        raise CheckpointError(f"{path} is not an lpt_jax export (no {EXPORT_META_KEY})")
    return tree.unflatten(arrays), json.loads(meta_bytes.tobytes().decode())


def _write_atomic(path: str, data: bytes) -> None:
    if "://" in path:
        import tensorflow as tf
        tmp = path + ".tmp"
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(data)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
